"""The GPU benchmarks run end to end on tiny networks (so they work the day an accelerator is lent) and end
with their one JSON line. Slow: `make test-slow`."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import import_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(*args) -> dict:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_speed_counts_both_isc_branches():
    line = run_benchmark("benchmarks/train_speed.py", "--stage", "student_isc", "--tiny", "--batches", "2", "--steps", "4")
    (batch,) = line["batches"]
    assert batch["fits"] and batch["finite"] and batch["step_ms"] > 0
    flops = batch["gflops_per_step"]
    # Split: the student with gradients plus two target evaluations; boundary: plus one teacher evaluation.
    assert flops["split"] > flops["boundary"] > 0


@pytest.mark.slow
def test_sr_speed_against_torch():
    import_torch()
    line = run_benchmark("benchmarks/sr_speed.py", "--tiny", "--cases", "b1,tiled", "--torch",
                         "--torch_compile", "none", "--repeats", "1", "--dtype", "float32")
    for case in line["cases"]:
        assert case["jax"]["finite"]
        # The torch side runs our converted weights: the transformers agree to fp32 rounding.
        assert case["torch"]["eager"]["max_rel_diff_transformer"] < 1e-4, case
    assert line["cases"][1]["tiles"] > 1 and line["speedup"] > 0

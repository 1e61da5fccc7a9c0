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


@pytest.mark.slow
def test_vae_tiling_seams_and_sr_memory_on_tiny_networks():
    line = run_benchmark("benchmarks/vae_tiling_seams.py", "--size", "256", "--tile", "128", "--tiny")
    assert line["decode"]["seamless"] and line["value"] < 1e-4
    seams_only = run_benchmark("benchmarks/vae_tiling_seams.py", "--size", "256", "--tile", "128", "--tiny",
                               "--skip_whole")
    assert seams_only["decode"]["seamless"] and seams_only["value"] is None
    assert run_benchmark("benchmarks/sr_memory.py", "--tiny")["cases"]


@pytest.mark.slow
def test_demo_then_reward_tiny(tmp_path):
    """`make demo` with shortened stages (its report names every method's PSNR, block and detail ratio), then
    the stage-3 benchmark on that workdir."""
    from smfsr_jax import demo
    short = {"teacher_fm": 20, "student_isc": 4, "student_gan": 2}
    report = demo.run(str(tmp_path), short, seed=1)["report"]
    assert set(report["methods"]) == {"bicubic", "teacher_fm_1step", "teacher_fm_16step", "student_isc_1step",
                                      "student_isc_4step", "student_gan_1step"}
    for scores in report["methods"].values():
        assert set(scores) == {"psnr", "psnr_mean", "block_ratio", "detail_ratio"} and scores["detail_ratio"] > 0
    assert os.path.isfile(tmp_path / "outputs" / "chelsea_comparison.png")
    line = run_benchmark("benchmarks/reward_tiny.py", "--workdir", str(tmp_path), "--steps", "2", "--seeds", "2")
    for method in ("nft", "direct"):
        assert set(line[method]) >= {"reward_before", "reward_after", "psnr_before", "psnr_after",
                                     "diversity_before", "diversity_after"}
    assert line["name"] == "reward_tiny" and line["config"]["steps"] == 2


@pytest.mark.slow
def test_mixed_sizes_counts_compilations():
    line = run_benchmark("benchmarks/mixed_sizes.py", "--images", "2")
    assert line["name"] == "mixed_sizes" and line["distinct_sizes"] == 2 and line["compilations"] >= 2
    assert line["first_image_s"] > 0 and line["compiled_per_image_s"] > 0


@pytest.mark.slow
def test_any_size_difference_and_canvas_memory():
    line = run_benchmark("benchmarks/any_size.py", "--sizes", "24x64,40x36")
    short, tiled = line["cases"]
    assert not short["at_least_a_tile"] and tiled["at_least_a_tile"] and line["value"] == tiled["max"] <= 1
    canvas = run_benchmark("benchmarks/sr_memory.py", "--tiny", "--parts", "canvas")
    assert canvas["velocity"]["temporaries_mib"] > 0 and all(case["canvas"] for case in canvas["cases"])


@pytest.mark.slow
def test_three_level_vae_runs_with_default_tiles():
    line = run_benchmark("benchmarks/default_tiles.py", "--lr_side", "32")
    assert line["output"] == [128, 128, 3] and line["vae_tile"] == 1344

"""The tiny SR function and every stage's tiny training step, preview and held-out evaluation (on an 8-device mesh
with its default sharding) lower for CUDA and TPU on this CPU host, the TPU ones with splash attention, the MM-DiT's
default there (benchmarks/lower_accelerators.py; the full-size run is the benchmark itself)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_tiny_sr_function_and_train_steps_lower_for_cuda_and_tpu():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "benchmarks/lower_accelerators.py", "--variant", "tiny"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    cases = lines[:-1]
    stages = ("teacher_fm", "student_isc", "student_gan", "student_reward")
    names = ("sr_b1", "sr_b16", "sr_tiled", *stages, *(f"preview_{s}" for s in stages), "holdout_student_reward")
    assert {(c["case"], c["platform"]) for c in cases} == {
        (f"{name}_tiny", platform) for name in names for platform in ("cuda", "tpu")}
    for case in cases:
        assert case["lowered"], case
        # cuDNN cannot be traced without a GPU; on a TPU the MM-DiT's default is splash attention.
        assert case["flops"] > 0 and case["attention"] == {"cuda": "xla", "tpu": "splash"}[case["platform"]]
        assert case["devices"] == (1 if case["case"].startswith("sr_") else 8)
    assert lines[-1]["value"] == lines[-1]["of"] == 24

"""benchmarks/gpu_suite.sh runs every step end to end with --tiny on this CPU (so the one device call it is made
for runs the day a GPU is lent), each step's JSON line in one results file; its full-size timeouts fit the
8 minutes it is given; and its scripts need none of the packages the GPU machine lacks beyond the carried wheels."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
STEPS = ("imports", "attention", "sr_speed", "train_isc", "train_gan", "train_fm")


def test_the_full_size_steps_fit_in_eight_minutes():
    text = open(SUITE).read()
    timeouts = {name: int(seconds) for name, seconds in re.findall(r"^run (\w+) (\d+) ", text, re.MULTILINE)}
    assert tuple(timeouts) == STEPS
    assert sum(timeouts.values()) <= 8 * 60


@pytest.mark.slow  # ~4 min: every step compiles its tiny networks (`make test-slow`)
def test_the_tiny_suite_writes_one_line_per_step(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(["bash", SUITE, "--tiny", "--out", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [line["suite_step"] for line in lines] == list(STEPS)
    for line in lines:
        assert "status" not in line, line  # a failed or timed-out step would say so
    by_step = {line["suite_step"]: line for line in lines}
    assert by_step["imports"]["backend"] == "cpu"
    assert by_step["sr_speed"]["speedup"] > 0 and by_step["attention"]["results"]
    for step in ("train_isc", "train_gan", "train_fm"):
        assert by_step[step]["batches"][0]["finite"], by_step[step]
    assert (tmp_path / "sr_speed.log").exists()


LENT_MACHINE_LACKS = textwrap.dedent("""
    import importlib.abc, sys
    class Lacking(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in {"tensorflow", "tensorflow_datasets", "clu", "gcsfs", "tensorboard"}:
                raise ImportError(f"{name} is not on the GPU machine")
    sys.meta_path.insert(0, Lacking())
    sys.path.insert(0, ".")
    from benchmarks import attention_speed, harness, sr_speed, train_speed
    from configs import student_gan
    stage, _, state = harness.abstract_stage(student_gan.get_config("sd35m"))
    print("ok", stage.name)
""")


def test_the_suite_needs_none_of_the_packages_the_gpu_machine_lacks():
    # The carried wheels bring grain, array_record, ml_collections and diffusers; TensorFlow, TFDS and clu stay out.
    result = subprocess.run([sys.executable, "-c", LENT_MACHINE_LACKS], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "student_gan"]

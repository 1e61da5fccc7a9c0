"""benchmarks/gpu_suite.sh runs every step end to end with --tiny on this CPU (so the one device call it is made
for runs the day a GPU is lent), each step's JSON line in one results file, and its full-size timeouts fit the
8 minutes it is given."""

import json
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "benchmarks", "gpu_suite.sh")
STEPS = ("imports", "attention", "sr_speed", "train_isc", "train_gan", "train_fm")


def test_the_full_size_steps_fit_in_eight_minutes():
    text = open(SUITE).read()
    timeouts = {name: int(seconds) for name, seconds in re.findall(r"^run (\w+) (\d+) ", text, re.MULTILINE)}
    assert tuple(timeouts) == STEPS
    assert sum(timeouts.values()) <= 8 * 60


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

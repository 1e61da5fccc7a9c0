"""The known-answer ISC experiment (benchmarks/isc_toy.py), shortened: with the default time sampler the
one-step student reaches the multi-step quality and keeps every mode; Algorithm 1's literal sampler does not."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ("--teacher_steps", "3000", "--student_steps", "3000", "--conditions", "4", "--samples", "500")


def run_toy(*args) -> dict:
    result = subprocess.run([sys.executable, "benchmarks/isc_toy.py", *SHORT, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["name"] == "isc_toy" and line["unit"]
    return line["runs"]["this run"]


def test_default_sampler_gives_a_one_step_student():
    run = run_toy()
    student, teacher = run["student"], run["teacher"]
    energy = lambda model, steps: model[str(steps)]["energy_distance"]  # noqa: E731
    # One Euler step of the teacher is the conditional mean: far from a four-mode distribution.
    assert energy(teacher, 1) > 10 * energy(teacher, 50)
    assert student["1"]["modes_kept"] == 4
    assert energy(student, 1) < 2.0 * energy(student, 2)
    assert energy(student, 1) < 4.0 * energy(teacher, 50)


def test_algorithm_1_times_leave_the_one_step_interval_untrained():
    run = run_toy("--time_sampler", "logit_normal", "--anchor_prob", "0", "--boundary_time", "max")
    student = run["student"]
    assert student["1"]["energy_distance"] > 3.0 * student["2"]["energy_distance"]

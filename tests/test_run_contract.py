"""The run contract every stage keeps, run as a cluster runs it: train.py processes with a gs:// workdir, gs://
data and gs:// init bundles (the local emulator), each process with its own TMPDIR and HOME.

- Stopped by SIGTERM, the run exits 0 within a 30-second grace period with a checkpoint of the step it names;
  killed with SIGKILL after a checkpoint, it leaves that checkpoint readable; resumed after both, it ends with
  the weights of an uninterrupted run, bit for bit.
- Two processes (4 devices each) that share no local disk train on a (data 4, fsdp 2) mesh, agree on one step
  when one of them gets SIGTERM, and one process with 8 devices resumes them: the weights of the one-device run
  within float tolerance.

teacher_fm runs on every `make test`; the student stages (minutes each on 2 cores) under `make test-slow`.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from smfsr_jax.core import files
from smfsr_jax.training import checkpoints
from tests.conftest import BUCKET, REPO
from tests.processes import free_port
from tests.test_train import assert_trees_close
from tests.tiny_runs import TINY_OVERRIDES, bundle_params

GRACE_SECONDS = 30
# Sharded runs sum gradients in another order. Adam divides each gradient by its running RMS, so rounding
# differences of tiny gradients become differences of up to a whole step (~lr) on a few weights; 5% of one step
# (the tiny runs' lr is 1e-3) bounds what 12 steps accumulate (measured: 1.2e-5 for student_isc).
SHARDED_ATOL = 0.05 * TINY_OVERRIDES["optimizer.lr"]
# (config, steps, checkpoint_every, overrides beyond TINY_OVERRIDES); {teacher} and {student} are gs:// inputs.
STAGES = {
    "teacher_fm": ("configs/teacher_fm.py:tiny", 12, 4, {}),
    "student_isc": ("configs/student_isc.py:tiny", 12, 4, {"init.teacher": "{teacher}"}),
    "student_gan": ("configs/student_gan.py:tiny", 12, 4, {"init.teacher": "{teacher}",
                                                           "init.student": "{student}/bundle"}),
    "student_reward": ("configs/student_reward.py:tiny", 12, 4, {
        "init.teacher": "{teacher}", "init.student": "{student}", "reward.seeds": 2, "reward.rollout_batches": 3,
        "weights.isc": 0.0, "holdout.every": 4, "holdout.max_crops": 2, "holdout.seeds": 2}),
}


@pytest.fixture
def bucket_inputs(gcs, data_dir, request):
    """The tiny data and the inputs the stage names ({teacher}: the tiny teacher's bundle, {student}: the tiny
    student's workdir) copied into the bucket once per test process."""
    root = f"gs://{BUCKET}/contract-inputs"
    inputs = {"data_dir": files.join(root, "tfds"), "teacher": files.join(root, "teacher"),
              "student": files.join(root, "student")}
    named = " ".join(str(v) for v in STAGES[request.node.callspec.params["stage"]][3].values())
    sources = {"data_dir": (data_dir, ["bundled/1.0.0/dataset_info.json"])}
    if "{teacher}" in named:
        sources["teacher"] = (str(request.getfixturevalue("teacher_run") / "bundle"), ["bundle.json"])
    if "{student}" in named:
        sources["student"] = (str(request.getfixturevalue("student_run")), ["bundle/bundle.json"])
    for name, (source, last) in sources.items():
        if not files.exists(files.join(inputs[name], last[0])):
            files.copy_tree(source, inputs[name], last=last)
    return inputs


class Run:
    """train.py in a subprocess with its own TMPDIR and HOME; its output is read on a thread."""

    def __init__(self, stage: str, inputs: dict, workdir: str, tmp_path, devices: int = 1, process: tuple = (),
                 **extra):
        config, steps, checkpoint_every, overrides = STAGES[stage]
        values = {**TINY_OVERRIDES, "data.data_dir": inputs["data_dir"], "total_steps": steps,
                  "checkpoint_every": checkpoint_every, **overrides, **extra}
        flags = [f"--config.{k}={v.format(**inputs) if isinstance(v, str) else v}" for k, v in values.items()]
        home = tmp_path / f"host-{process[1] if process else 0}-{time.monotonic_ns()}"
        (home / "tmp").mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR" or not process}
        env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", HOME=str(home),
                   TMPDIR=str(home / "tmp"), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        args = [sys.executable, "train.py", "--config", config, "--workdir", workdir, *flags]
        if process:
            args += ["--coordinator_address", process[0], "--process_id", str(process[1]), "--num_processes", "2"]
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_step(self, at_least: int, timeout: float = 600) -> int:
        """Block until the run logs a step >= at_least; returns it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            logged = re.search(r"\] \[(\d+)\] .*loss=", line)
            if logged and int(logged.group(1)) >= at_least:
                return int(logged.group(1))
        pytest.fail(f"no step {at_least} logged:\n{self.output()[-3000:]}")

    def finish(self, timeout: float = 900) -> int:
        self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return self.proc.returncode

    def output(self) -> str:
        return "".join(self.lines)


def _finish_ok(run: Run, timeout: float = 900) -> str:
    assert run.finish(timeout) == 0, run.output()[-4000:]
    return run.output()


def _stopped_step(output: str) -> int:
    stopped = re.findall(r"stopped by SIGTERM after step (\d+) of \d+; checkpoint \1 is in (\S+):", output)
    assert len(stopped) == 1, output[-3000:]
    return int(stopped[0][0])


@pytest.mark.parametrize("stage", [
    "teacher_fm",
    pytest.param("student_isc", marks=pytest.mark.slow),
    pytest.param("student_gan", marks=pytest.mark.slow),
    pytest.param("student_reward", marks=pytest.mark.slow),
])
def test_run_contract(stage, bucket_inputs, bucket_dir, tmp_path):
    steps, checkpoint_every = STAGES[stage][1:3]
    reference = files.join(bucket_dir, "uninterrupted")
    _finish_ok(Run(stage, bucket_inputs, reference, tmp_path))
    expected = bundle_params(reference)

    # SIGTERM, resume, SIGKILL after the next checkpoint, resume: the uninterrupted weights, bit for bit.
    workdir = files.join(bucket_dir, "interrupted")
    run = Run(stage, bucket_inputs, workdir, tmp_path)
    run.wait_for_step(1)
    sent = time.time()
    run.proc.send_signal(signal.SIGTERM)
    output = _finish_ok(run, timeout=GRACE_SECONDS)
    assert time.time() - sent < GRACE_SECONDS
    stopped = _stopped_step(output)
    assert stopped < steps and checkpoints.finished_steps(files.join(workdir, "checkpoints")) == [stopped]
    assert not files.exists(files.join(workdir, "bundle")) and not files.exists(files.join(workdir, "run.lock"))

    run = Run(stage, bucket_inputs, workdir, tmp_path)
    target = (stopped // checkpoint_every + 1) * checkpoint_every
    assert target < steps, "the test needs a periodic checkpoint between the stop and the end"
    deadline = time.time() + 600
    while max(checkpoints.finished_steps(files.join(workdir, "checkpoints"))) < target:
        assert run.proc.poll() is None and time.time() < deadline, run.output()[-3000:]
        time.sleep(0.2)
    run.proc.kill()
    run.finish()
    assert files.exists(files.join(workdir, "run.lock"))  # a killed run leaves its lock: the next one takes it over
    _finish_ok(Run(stage, bucket_inputs, workdir, tmp_path))
    assert_trees_close(bundle_params(workdir), expected, atol=0.0)

    # Two processes without a shared local disk; SIGTERM to one of them; one 8-device process resumes.
    workdir = files.join(bucket_dir, "two_processes")
    coordinator = f"localhost:{free_port()}"
    mesh = "(('data',4),('fsdp',2))"
    pair = [Run(stage, bucket_inputs, workdir, tmp_path, devices=4, process=(coordinator, i), mesh=mesh)
            for i in range(2)]
    pair[1].wait_for_step(1)
    pair[1].proc.send_signal(signal.SIGTERM)
    outputs = [_finish_ok(run) for run in pair]
    stopped = _stopped_step(outputs[0])
    assert _stopped_step(outputs[1]) == stopped and stopped < steps
    assert checkpoints.finished_steps(files.join(workdir, "checkpoints"))[-1] == stopped
    _finish_ok(Run(stage, bucket_inputs, workdir, tmp_path, devices=8, mesh=mesh))
    assert_trees_close(bundle_params(workdir), expected, atol=SHARDED_ATOL)

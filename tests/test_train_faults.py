"""Faults a training run must survive: unreadable checkpoints, two runs on one workdir, missing data, a changed
config on resume, non-finite metrics; and the command line's one-line errors."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from configs import teacher_fm
from smfsr_jax.core import errors, files
from smfsr_jax.data import pipeline
from smfsr_jax.training import checkpoints, loop, run_lock, writers
from tests.conftest import REPO
from tests.test_train import DiesAtBatch, assert_trees_close
from tests.tiny_runs import TINY_OVERRIDES, bundle_params, tiny

STEPS = 4  # checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def two_checkpoints(data_dir, tmp_path_factory):
    """An uninterrupted run with checkpoints at steps 2 and 4 and its bundle (the reference for resumes)."""
    workdir = tmp_path_factory.mktemp("two_checkpoints")
    loop.train(tiny(teacher_fm, data_dir, total_steps=STEPS, checkpoint_every=2), str(workdir))
    assert checkpoints.finished_steps(str(workdir / "checkpoints")) == [2, 4]
    return workdir


def _largest_array_file(step_dir):
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / "state") for name in names
             if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    with open(_largest_array_file(step_dir), "r+b") as f:
        f.truncate(100)


def _delete(step_dir):
    os.remove(_largest_array_file(step_dir))


def _empty_metadata(step_dir):
    open(step_dir / "data" / "metadata", "w").close()


# pytest swaps sys.unraisablehook per test, past the filter that drops the failed reads' stragglers.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("corrupt", [_truncate, _delete, _empty_metadata], ids=["truncated", "deleted", "emptied"])
def test_unreadable_latest_checkpoint_is_moved_aside_and_the_run_resumes(two_checkpoints, data_dir, tmp_path,
                                                                         corrupt, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(two_checkpoints, workdir)
    shutil.rmtree(workdir / "bundle")
    corrupt(workdir / "checkpoints" / "4")
    loop.train(tiny(teacher_fm, data_dir, total_steps=STEPS, checkpoint_every=2), str(workdir))
    aside = [name for name in os.listdir(workdir / "checkpoints") if name.startswith("4.corrupt-")]
    assert len(aside) == 1 and os.listdir(workdir / "checkpoints" / aside[0])  # kept, not deleted
    warning = next(r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage())
    assert "checkpoint step 4" in warning and str(workdir / "checkpoints" / "4") in warning
    # Steps 3-4 were retrained from step 2: the same weights as the uninterrupted run.
    assert checkpoints.finished_steps(str(workdir / "checkpoints")) == [2, 4]
    assert_trees_close(bundle_params(workdir), bundle_params(two_checkpoints), atol=0.0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_in_a_bucket_is_moved_aside_by_the_service(two_checkpoints, data_dir, bucket_dir, gcs):
    config = tiny(teacher_fm, data_dir, total_steps=STEPS, checkpoint_every=2)
    loop.train(config, bucket_dir)
    step = files.join(bucket_dir, "checkpoints", "4")
    arrays = {name: size for name, size in files.sizes(step).items() if "/d/" in f"/{name}"}
    largest = files.join(step, max(arrays, key=arrays.get))
    files.write_bytes(largest, files.read_bytes(largest)[:100])  # truncated
    files.remove_tree(files.join(bucket_dir, "bundle"))
    before = gcs.counts()
    loop.train(config, bucket_dir)
    aside = [name for name in files.listdir(files.join(bucket_dir, "checkpoints")) if name.startswith("4.corrupt-")]
    assert len(aside) == 1 and files.exists(files.join(bucket_dir, "checkpoints", aside[0], "commit_success.txt"))
    assert gcs.counts()["move"] - before.get("move", 0) >= len(files.sizes(files.join(bucket_dir, "checkpoints",
                                                                                        aside[0])))
    assert checkpoints.finished_steps(files.join(bucket_dir, "checkpoints")) == [2, 4]
    assert_trees_close(bundle_params(bucket_dir), bundle_params(two_checkpoints), atol=0.0)


class SignalsAtBatch(DiesAtBatch):
    """A data iterator that sends this process `count` SIGTERMs when asked for its n-th batch."""

    def __init__(self, inner, n, count):
        super().__init__(inner, n)
        self.signals = count

    def __next__(self):
        if self.count + 1 == self.n:
            for _ in range(self.signals):
                os.kill(os.getpid(), signal.SIGTERM)
        self.count += 1
        return next(self.inner)


def test_a_second_sigterm_stops_at_once_and_the_checkpoints_stay_readable(two_checkpoints, data_dir, tmp_path,
                                                                          monkeypatch):
    config = tiny(teacher_fm, data_dir, total_steps=STEPS, checkpoint_every=2)
    original, handler = loop.data_iterator, signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(loop, "data_iterator", lambda cfg: SignalsAtBatch(original(cfg), 3, count=2))
    with pytest.raises(KeyboardInterrupt, match="a second SIGTERM"):
        loop.train(config, str(tmp_path))
    assert checkpoints.finished_steps(str(tmp_path / "checkpoints")) == [2]  # step 3 never finished
    assert signal.getsignal(signal.SIGTERM) is handler and not (tmp_path / "run.lock").exists()
    monkeypatch.setattr(loop, "data_iterator", original)
    loop.train(config, str(tmp_path))
    assert_trees_close(bundle_params(tmp_path), bundle_params(two_checkpoints), atol=0.0)


def test_no_readable_checkpoint_stops_with_every_step_named(two_checkpoints, data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(two_checkpoints, workdir)
    _empty_metadata(workdir / "checkpoints" / "4")
    _truncate(workdir / "checkpoints" / "2")
    with pytest.raises(checkpoints.CheckpointUnreadable, match=r"no readable checkpoint") as raised:
        loop.train(tiny(teacher_fm, data_dir, total_steps=STEPS, checkpoint_every=2), str(workdir))
    assert "step 4 (" in str(raised.value) and "step 2 (" in str(raised.value)
    assert checkpoints.finished_steps(str(workdir / "checkpoints")) == []
    assert len(os.listdir(workdir / "checkpoints")) == 2  # both moved aside, nothing deleted


def test_resume_with_a_changed_config_lists_the_fields(two_checkpoints, data_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(two_checkpoints, workdir)
    saved = (workdir / "config.json").read_text()
    changed = tiny(teacher_fm, data_dir, total_steps=STEPS, checkpoint_every=2, **{"optimizer.lr": 2e-3,
                                                                                   "log_every": 2})
    with pytest.raises(loop.ConfigChanged) as raised:
        loop.train(changed, str(workdir))
    message = str(raised.value)
    assert "optimizer.lr: 0.001 -> 0.002" in message and "log_every: 1 -> 2" in message
    assert "--allow_config_change" in message and "total_steps" not in message
    assert (workdir / "config.json").read_text() == saved
    loop.train(changed, str(workdir), allow_config_change=True)  # nothing left to train: re-exports the bundle
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["lr"] == 2e-3


@pytest.mark.parametrize("kind", ["missing", "empty", "unset"])
def test_missing_data_fails_before_anything_is_written(tmp_path, kind, monkeypatch):
    data_dir = {"missing": str(tmp_path / "no_such_dir"), "empty": str(tmp_path), "unset": None}[kind]
    monkeypatch.setattr(loop.stages, "build_stage", lambda *a: pytest.fail("the stage was built"))
    workdir = tmp_path / "workdir"
    with pytest.raises(pipeline.DataNotPrepared) as raised:
        loop.train(tiny(teacher_fm, data_dir), str(workdir))
    assert "python -m smfsr_jax.data.build --dataset bundled --data_dir" in str(raised.value)
    if data_dir:
        assert data_dir in str(raised.value)
    assert not workdir.exists()


def test_a_missing_split_is_named(data_dir):
    with pytest.raises(pipeline.DataNotPrepared, match=r"no split 'validation' \(it has train, holdout\)"):
        pipeline.check_prepared("bundled", "validation", data_dir)


def _train_cli(workdir, data_dir, *extra, **overrides):
    config = {**TINY_OVERRIDES, "data.data_dir": data_dir, **overrides}
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "train.py", "--config", "configs/teacher_fm.py:tiny", "--workdir",
                             str(workdir), *(f"--config.{k}={v}" for k, v in config.items()), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_cli_missing_data_is_one_line_with_status_2(tmp_path):
    workdir = tmp_path / "workdir"
    proc = _train_cli(workdir, str(tmp_path / "no_tfds"))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert f"error: data_dir {tmp_path / 'no_tfds'} does not exist; build it with: python -m smfsr_jax.data.build" \
           " --dataset bundled" in output
    assert not workdir.exists()


def test_second_run_on_a_workdir_exits_naming_the_first(data_dir, tmp_path):
    workdir = tmp_path / "workdir"
    first = _train_cli(workdir, data_dir, total_steps=40, log_every=10, checkpoint_every=20)
    lock = workdir / "run.lock"
    deadline = time.time() + 300
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    holder = json.loads(lock.read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    second = _train_cli(workdir, data_dir, total_steps=40, log_every=10, checkpoint_every=20)
    second_output = second.communicate(timeout=300)[0]
    first_running = first.poll() is None
    first_output = first.communicate(timeout=600)[0]
    assert first_running, "the first run ended before the second was refused; the test proves nothing"
    assert second.returncode == 2, second_output
    assert f"is in use by pid {first.pid} on {socket.gethostname()}" in second_output
    assert "Traceback" not in second_output
    assert first.returncode == 0, first_output[-3000:]
    steps = [record["step"] for record in writers.read_jsonl(str(workdir / "metrics.jsonl")) if "loss" in record]
    assert steps == [10, 20, 30, 40]  # one run's lines only
    assert not lock.exists()
    # orbax's INFO lines are hidden by default; the loss lines are what a user reads.
    assert "checkpoint_manager.py" not in first_output and "loss=" in first_output


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "earlier"}))
    path = run_lock.acquire(str(tmp_path))
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert any("took over the run lock" in r.getMessage() for r in caplog.records)
    with pytest.raises(run_lock.WorkdirLocked, match=f"in use by pid {os.getpid()}"):
        run_lock.acquire(str(tmp_path))
    run_lock.release(path)
    assert os.listdir(tmp_path) == []


def test_lock_from_another_host_is_not_taken(tmp_path):
    (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid(), "started": "x"}))
    with pytest.raises(run_lock.WorkdirLocked, match="on elsewhere .*delete the lock file"):
        run_lock.acquire(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["run.lock"]


@pytest.mark.parametrize("where", ["local", "gs"])
def test_run_writers_write_tensorboard_events_and_metrics_anywhere(where, tmp_path, request):
    """The events (scalars and images) read back with TensorBoard's own reader; in a bucket too."""
    from tensorboard.backend.event_processing import event_accumulator
    workdir = str(tmp_path / "run") if where == "local" else request.getfixturevalue("bucket_dir")
    image = np.random.default_rng(0).integers(0, 256, (2, 6, 10, 3), np.uint8)
    writer = writers.make_run_writer(workdir)
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_images(1, {"lr_sr_hr": image})
    writer.write_scalars(2, {"loss": 0.25})
    writer.flush()
    assert writers.read_jsonl(files.join(workdir, "metrics.jsonl")) == [{"step": 1, "loss": 0.5},
                                                                        {"step": 2, "loss": 0.25}]
    local = files.stage(workdir) if where == "gs" else workdir
    events = event_accumulator.EventAccumulator(local, size_guidance={event_accumulator.IMAGES: 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.5), (2, 0.25)]
    decoded = [np.asarray(Image.open(io.BytesIO(events.Images(f"lr_sr_hr/image/{i}")[0].encoded_image_string)))
               for i in range(2)]
    np.testing.assert_array_equal(np.stack(decoded), image)


def test_metrics_jsonl_is_strict_json(tmp_path):
    writer = writers.JsonlWriter(str(tmp_path / "metrics.jsonl"))
    writer.write_scalars(1, {"loss": 0.5, "grad_norm": 1.0})
    writer.write_scalars(2, {"loss": float("nan"), "grad_norm": float("inf")})

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=reject) for line in lines]
    assert records == [{"step": 1, "loss": 0.5, "grad_norm": 1.0},
                       {"step": 2, "loss": None, "grad_norm": None, "nonfinite": ["grad_norm", "loss"]}]


def test_run_cli_prints_one_line_and_the_status(capsys):
    def fails():
        raise loop.NonFiniteError("non-finite loss or gradient at step 3; no checkpoint was written after it")

    assert errors.run_cli(fails) == 1
    assert capsys.readouterr().err == "error: non-finite loss or gradient at step 3; no checkpoint was written " \
                                      "after it\n"
    assert errors.run_cli(lambda: (_ for _ in ()).throw(checkpoints.CheckpointUnreadable("bad"))) == 2
    with pytest.raises(loop.NonFiniteError):
        errors.run_cli(fails, debug=True)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        errors.run_cli(lambda: {}["x"])

    def interrupted():
        raise KeyboardInterrupt("a second SIGTERM: stopping at once")

    capsys.readouterr()
    assert errors.run_cli(interrupted) == 130
    assert capsys.readouterr().err == "interrupted: a second SIGTERM: stopping at once\n"


def test_lock_in_a_bucket_admits_one_run_and_takes_over_a_dead_ones(bucket_dir, caplog):
    """A bucket has no flock: the lock is an object created only if absent, and a stale one is deleted only if
    unchanged since it was read."""
    results = []

    def take():
        try:
            results.append(run_lock.acquire(bucket_dir))
        except run_lock.WorkdirLocked as e:
            results.append(e)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [r for r in results if isinstance(r, str)]
    assert len(held) == 1 and all(f"in use by pid {os.getpid()}" in str(r) for r in results if r not in held)
    run_lock.release(held[0])
    assert not files.exists(held[0])

    lock = files.join(bucket_dir, "run.lock")
    files.write_text(lock, json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": "earlier"}))
    assert run_lock.acquire(bucket_dir) == lock
    assert json.loads(files.read_text(lock))["pid"] == os.getpid()
    assert any("took over the run lock" in r.getMessage() for r in caplog.records)
    run_lock.release(lock)
    files.write_text(lock, json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(run_lock.WorkdirLocked, match="on elsewhere .*delete the lock file"):
        run_lock.acquire(bucket_dir)


def _raise(error):
    def fail(*args, **kwargs):
        raise error
    return fail


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied", "checkpoints/4/state/manifest.ocdbt"),
    ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes"),
    ValueError('UNAVAILABLE: Error reading "params.x" in OCDBT database at gs://b/run/checkpoints/4/state/: '
               "Connection refused"),
    TimeoutError("timed out reading gs://b/run/checkpoints/4/data/metadata"),
], ids=["permission", "out_of_memory", "unreachable", "timeout"])
@pytest.mark.parametrize("where", ["metadata", "arrays"])
def test_a_checkpoint_unreadable_for_the_environment_is_not_moved(two_checkpoints, data_dir, tmp_path, monkeypatch,
                                                                   error, where):
    workdir = tmp_path / "run"
    shutil.copytree(two_checkpoints, workdir)
    target = (checkpoints, "_saved_shapes") if where == "metadata" else (checkpoints.Checkpointer, "restore")
    monkeypatch.setattr(*target, _raise(error))
    with pytest.raises(checkpoints.CheckpointUnreachable, match="checkpoint step 4 could not be read, and not because "
                                                                "it is damaged.*Nothing was moved"):
        loop.train(tiny(teacher_fm, data_dir, total_steps=STEPS, checkpoint_every=2), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert not (workdir / "run.lock").exists()


def test_damage_and_environment_are_told_apart_by_what_the_reads_report():
    damaged = [  # what the truncated, deleted and emptied-metadata cases above report
        ValueError('OUT_OF_RANGE: Error reading "params.k" in OCDBT database at local file "/r/4/state/": Requested '
                   "byte range [838475, 842307) is not valid for value of size 100"),
        ValueError('FAILED_PRECONDITION: Error reading "params.k" in OCDBT database at local file "/r/4/state/": '
                   "Truncated Zstd-compressed stream; at byte 0"),
        checkpoints._BadMetadata("/r/4/data/metadata: Expecting value: line 1 column 1 (char 0)"),
        FileNotFoundError(2, "No such file or directory", "/r/4/data/metadata"),
        ValueError('DATA_LOSS: Error reading "params.k": checksum mismatch'),
    ]
    environment = [MemoryError(), ConnectionResetError(), ValueError("DEADLINE_EXCEEDED: gs://b/r/4/state"),
                   ValueError("PERMISSION_DENIED: gs://b/r/4/state"), RuntimeError("something else entirely")]
    assert all(checkpoints.is_damage(e) for e in damaged)
    assert not any(checkpoints.is_damage(e) for e in environment)
    wrapped = RuntimeError("restore failed")
    wrapped.__cause__ = damaged[0]
    assert checkpoints.is_damage(wrapped)

"""Watch mode: follow a training workdir and evaluate each finished checkpoint once, as it appears
(`evaluate.py --watch`). Results go to WORKDIR/eval/<step>/, the first seed's dataset means to TensorBoard
(the "eval" run) and WORKDIR/eval/metrics.jsonl; WORKDIR/eval/state.json remembers the evaluated steps. WORKDIR may be
in a bucket (gs://...).

With several processes, all run `watch` with the same arguments: process 0's view of the workdir and clock decides
which steps are evaluated and when to stop, every process takes part in each evaluation (runner.py), and process 0
alone writes the state, TensorBoard and metrics.jsonl."""

import json
import time

import jax
from absl import logging

from smfsr_jax.core import distributed, errors, files
from smfsr_jax.core import workdir as workdir_lib
from smfsr_jax.evaluation import runner
from smfsr_jax.evaluation.results import writing
from smfsr_jax.training import checkpoints, inference, stages
from smfsr_jax.weights import bundle as bundle_lib


def _read_state(path: str) -> list[int]:
    if not files.exists(path):
        return []
    try:
        return [int(step) for step in json.loads(files.read_text(path))["evaluated"]]
    except (ValueError, KeyError, TypeError) as e:
        raise errors.UserError(f"{path}: expected {{\"evaluated\": [steps]}} ({type(e).__name__}: {e}); delete "
                               "it to evaluate every checkpoint again") from None


def _write_state(path: str, evaluated: list[int]):
    # Written whole: a killed watcher never leaves half a file.
    files.write_text(path, json.dumps({"evaluated": sorted(evaluated)}) + "\n")


def _eval_writer(workdir: str):
    """TensorBoard events in WORKDIR/eval (the "eval" run beside training's) and WORKDIR/eval/metrics.jsonl."""
    from smfsr_jax.training import writers  # imports clu and TensorBoard: only watch mode pays for them

    eval_dir = workdir_lib.eval_dir(workdir)
    return writers.make_writer(eval_dir, workdir_lib.metrics_path(eval_dir))


def watch(workdir: str, run: runner.BenchmarkRun, *, poll_seconds: float = 60, stop_after_seconds: float | None = None,
          once: bool = False, show_progress: bool = True, sleep=time.sleep) -> list[int]:
    """Watch mode (module docstring): evaluate the finished checkpoints of `workdir` not evaluated yet, until a
    stop condition; returns the steps evaluated by this call."""
    config = inference.read_config(workdir)  # also checks that workdir is a training workdir
    eval_dir = workdir_lib.eval_dir(workdir)
    checkpoint_dir = workdir_lib.checkpoints_dir(workdir)
    files.makedirs(eval_dir)
    state_path = files.join(eval_dir, "state.json")
    evaluated = _read_state(state_path)
    deadline = None if stop_after_seconds is None else time.monotonic() + stop_after_seconds
    network = writer = None
    evaluated_now = []
    try:
        while True:
            # Looked at before listing: once the bundle exists, every checkpoint listed after it is final.
            run_finished = files.is_file(files.join(workdir_lib.bundle_dir(workdir), bundle_lib.BUNDLE_FILE))
            pending = [s for s in checkpoints.finished_steps(checkpoint_dir) if s not in evaluated]
            run_finished, pending = distributed.from_process0([run_finished, pending])
            for step in pending:
                if distributed.from_process0(deadline is not None and time.monotonic() >= deadline):
                    break
                if network is None:  # frozen weights, loaded once
                    network = stages.build_network(config)
                try:
                    bundle = inference.load_checkpoint(workdir, step, network)
                except Exception:  # keep_checkpoints may delete an old step while it is read: skip only that
                    if step in checkpoints.finished_steps(checkpoint_dir):
                        raise
                    bundle = None
                if not all(distributed.gather(bundle is not None)):  # skipped by every process, or by none
                    logging.warning("step %d was deleted (keep_checkpoints) before it could be evaluated", step)
                    continue
                logging.info("evaluating step %d of %s", step, workdir)
                built = runner.evaluate_model(bundle, run, files.join(eval_dir, str(step)), show_progress)
                evaluated.append(step)
                evaluated_now.append(step)
                if jax.process_index() > 0:
                    continue
                scalars = {f"{dataset}/{metric}": value for dataset, row in built["table1"]["datasets"].items()
                           for metric, value in row["mean"].items()}
                if writer is None:
                    writer = _eval_writer(workdir)
                writer.write_scalars(step, scalars)
                writer.flush()
                with writing(state_path, f"step {step} is evaluated but not recorded: a restarted watcher "
                                         "evaluates it again"):
                    _write_state(state_path, evaluated)
            all_done = not set(checkpoints.finished_steps(checkpoint_dir)) - set(evaluated)
            remaining = None if deadline is None else deadline - time.monotonic()
            finished, remaining = distributed.from_process0([once or (run_finished and all_done), remaining])
            if finished:
                return evaluated_now
            if remaining is not None and remaining <= 0:
                logging.info("watch: stopping after %s s", stop_after_seconds)
                return evaluated_now
            sleep(poll_seconds if remaining is None else min(poll_seconds, remaining))
    finally:
        if writer is not None:
            writer.close()

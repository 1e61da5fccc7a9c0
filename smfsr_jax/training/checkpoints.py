"""orbax checkpoints of a training run: train state + data-iterator state, async, keep K.

Layout: WORKDIR/checkpoints/<step>/{state, data}; WORKDIR may be a bucket URL (orbax writes arrays through
TensorStore, and every process writes its own shards). A step counts only once it is complete: locally orbax
writes it under a temporary name and renames it, in a bucket (no rename) it writes COMMIT_FILE last, so a
reader (`finished_steps`, the evaluator's watch mode) never sees a half-written checkpoint.

A step whose data is damaged or incomplete (a truncated or missing file, emptied metadata) is moved aside to
`<step>.corrupt-<time>`, never deleted, and the run resumes from the newest readable one
(`Checkpointer.restore_latest`). A step that could not be read because of the environment (out of memory, no
permission, the storage unreachable) is not damaged: the run stops with one line and moves nothing.
"""

import contextlib
import gc
import json
import logging as py_logging
import re
import sys
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from smfsr_jax.core import errors, files


# orbax's marker of a complete step in a bucket (its CommitFileTemporaryPath).
COMMIT_FILE = "commit_success.txt"


class CheckpointUnreadable(errors.UserError):
    """No checkpoint of the run can be read, or the newest was written by a different network."""


class CheckpointUnreachable(errors.RunFailure):
    """A checkpoint could not be read for a reason outside it (memory, permissions, storage): nothing was moved."""


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = files.absolute(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_state_handlers()),
                           "data": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, data_state: dict):
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
            data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, Optional[dict]]:
        """(step, state, data state) of the newest readable step, or (0, None, None) when the run has none.

        Steps whose data is damaged are moved aside with a warning naming the step and the failure; when
        none is left, CheckpointUnreadable lists them. A step whose saved shapes differ from `abstract_state`
        is a config mismatch, not damage: it stops the run and nothing is moved; so does a read that failed
        for the environment's sake (CheckpointUnreachable).
        """
        moved = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = files.join(self.directory, str(step))
            try:
                saved_shapes = _saved_shapes(step_dir)
            except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many types for one bad file)
                moved.append(self._move_aside(step, e))
                continue
            if saved_shapes != sorted(tuple(x.shape) for x in jax.tree.leaves(abstract_state)):
                raise CheckpointUnreadable(f"{step_dir}: the saved train state has other shapes than this "
                                           "run's network; the config changed since it was written")
            try:
                with _quiet_failed_reads():
                    state, data_state = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001
                moved.append(self._move_aside(step, e))
                continue
            return step, state, data_state
        if moved:
            raise CheckpointUnreadable(f"no readable checkpoint left in {self.directory}; moved aside: "
                                       + "; ".join(moved))
        return 0, None, None

    def _move_aside(self, step: int, error: BaseException) -> str:
        """Move a damaged step aside; raise CheckpointUnreachable instead when `error` is not about its data."""
        source = files.join(self.directory, str(step))
        reason = _reason(error)
        if not is_damage(error):
            raise CheckpointUnreachable(
                f"checkpoint step {step} could not be read, and not because it is damaged: {reason}. Nothing was "
                f"moved; fix the cause and rerun (if the step is damaged after all, move {source} aside).") from error
        aside = f"{source}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            files.move(source, aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()
        logging.warning("checkpoint step %d cannot be read (%s); moved it to %s", step, reason, aside)
        return f"step {step} ({reason}) -> {aside}"

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _state_handlers():
    """orbax's writers for the leaves of a train state. On CPU all devices share one host's memory, so
    replica-parallel writing (each copy of a replicated array writes a slice of it) spreads no I/O, while it
    compiles one slice per array shape: ~15 s blocking the first save of a tiny 8-device run. There one copy
    writes each array; accelerators keep orbax's default."""
    replica_parallel = False if jax.default_backend() == "cpu" else None  # None: orbax's choice
    handlers = ocp.type_handlers
    return handlers.create_type_handler_registry(
        (int, handlers.ScalarHandler()), (float, handlers.ScalarHandler()), (np.number, handlers.ScalarHandler()),
        (np.ndarray, handlers.NumpyHandler()), (str, handlers.StringHandler()),
        (jax.Array, handlers.ArrayHandler(use_replica_parallel=replica_parallel)))


@contextlib.contextmanager
def _quiet_failed_reads():
    """A failed restore leaves orbax's other reads of the step in flight; as they fail and are collected they
    print hundreds of tracebacks ("Event loop is closed", "exception was never retrieved"). From the first
    failure on, those reports — and only those — are dropped: the caller reports the cause once."""
    try:
        yield
    except Exception:
        if not isinstance(sys.unraisablehook, _DropFailedReads):
            sys.unraisablehook = _DropFailedReads(sys.unraisablehook)
            py_logging.getLogger("asyncio").addFilter(_is_not_failed_read)
        gc.collect()
        raise


def _from_failed_read(exc: BaseException | None) -> bool:
    while exc is not None:
        if "Event loop is closed" in str(exc) or "error while reading array" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _DropFailedReads:
    def __init__(self, hook):
        self.hook = hook

    def __call__(self, report):
        if not _from_failed_read(report.exc_value):
            self.hook(report)


def _is_not_failed_read(record: py_logging.LogRecord) -> bool:
    return not (record.exc_info and _from_failed_read(record.exc_info[1]))


class _BadMetadata(ValueError):
    """A step's metadata file does not parse."""


def _saved_shapes(step_dir: str) -> list[tuple]:
    """The shapes of a step's saved train state, read from its metadata; raises naming the file that is bad."""
    data = files.join(step_dir, "data", "metadata")
    try:
        json.loads(files.read_text(data))
    except ValueError as e:
        raise _BadMetadata(f"{data}: {e}") from None
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / "state")
    return sorted(tuple(x.shape) for x in jax.tree.leaves(metadata))


# What a read reports when the cause is outside the data (absl status codes in TensorStore's messages,
# Python's own exceptions): checked first, since damage can be reported through the same exception types.
_ENVIRONMENT_CODES = ("PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                      "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED")
_ENVIRONMENT_TYPES = (MemoryError, PermissionError, TimeoutError, ConnectionError)
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "INVALID_ARGUMENT")
_DAMAGE_TYPES = (FileNotFoundError, _BadMetadata)


def is_damage(error: BaseException) -> bool:
    """True when a failed checkpoint read says the step's data is damaged or incomplete (a truncated or missing
    file, bad metadata); False for the environment (memory, permissions, network, timeouts) and for anything
    not recognised, so that a good checkpoint is never moved aside by mistake."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, _ENVIRONMENT_TYPES) for e in chain) or any(
            re.search(rf"\b{code}\b", text) for code in _ENVIRONMENT_CODES) or "out of memory" in text.lower():
        return False
    return any(isinstance(e, _DAMAGE_TYPES) for e in chain) or any(
        re.search(rf"\b{code}\b", text) for code in _DAMAGE_CODES)


def _reason(error: BaseException) -> str:
    """The most specific line of an exception chain: the first naming a file, else the outermost."""
    lines = []
    while error is not None:
        lines.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        error = error.__cause__ or error.__context__
    named = [line for line in lines if "/" in line]
    return (named or lines)[0][:400]


def finished_steps(directory: str) -> list[int]:
    """Complete checkpoint steps in `directory`. Locally orbax renames a step's folder to the bare step number
    only once it is complete; in a bucket (no rename) it writes the step in place and adds COMMIT_FILE last. So a
    save in progress, or a step moved aside, is never listed."""
    if not files.is_dir(directory):
        return []
    steps = sorted(int(name) for name in files.listdir(directory) if name.isdigit())
    if files.is_remote(directory):
        steps = [step for step in steps if files.exists(files.join(directory, str(step), COMMIT_FILE))]
    return steps


def restore_subtree(directory: str, step: int, target: dict) -> dict:
    """Part of a step's train state, e.g. {"ema_params": shapes}: the rest (optimizer moments, other parts) is
    not read."""
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), target)
    manager = ocp.CheckpointManager(files.absolute(directory), options=ocp.CheckpointManagerOptions(read_only=True),
                                    item_names=("state", "data"))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)))
    finally:
        manager.close()
    return restored["state"]


def abstract_of(tree):
    """ShapeDtypeStructs (with shardings) of a live tree, the target for `restore`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

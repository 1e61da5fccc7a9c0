"""The training loop shared by every stage: build the stage, shard it over the mesh, resume from the newest
readable checkpoint, run the jitted step, log, checkpoint and export the bundle (layout: core/workdir.py).

Before anything is written to the workdir the data is checked (a missing build fails at once with the
command that makes it) and the workdir's run lock is taken (one run per workdir). A resume checks that the
config equals the one the run was started with. The workdir and the data may be bucket URLs (gs://): process
0 writes the shared files, every process writes its checkpoint shards, no local disk is shared.

SIGTERM (training/preemption.py) stops the run after a step all processes agree on, with a checkpoint of
that step and exit status 0; rerunning the same command resumes from it.
"""

import json

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions
from jax.experimental import multihost_utils

from smfsr_jax.core import errors, files
from smfsr_jax.core import mesh as mesh_lib
from smfsr_jax.core import workdir as workdir_lib
from smfsr_jax.data import captions, pipeline
from smfsr_jax.training import checkpoints, preemption, run_lock, sharding, stages, writers
from smfsr_jax.training import state as state_lib
from smfsr_jax.training.stages import batch as batch_lib
from smfsr_jax.training.stages import preview as preview_lib
from smfsr_jax.training.stages import stage as stage_lib
from smfsr_jax.weights import bundle

# Batch fields the jitted step reads; the rest (indices, names) stay on the host.
MODEL_INPUTS = ("hr", "lr", "lr_up", "prompt_embeds", "pooled_prompt_embeds")


class NonFiniteError(errors.RunFailure, FloatingPointError):
    """A loss or gradient was NaN/Inf: the run stops before any checkpoint holds the bad state."""


def raise_if_nonfinite(first_bad: int):
    """`first_bad`: the state's first non-finite step (0-based), -1 while every step was finite."""
    if first_bad >= 0:
        raise NonFiniteError(f"non-finite loss or gradient at step {first_bad + 1}; no checkpoint was written "
                             "after it")


class ConfigChanged(errors.UserError):
    """A resume whose config differs from the one in the workdir."""


def write_config(config: ml_collections.ConfigDict, path: str):
    if jax.process_index() == 0:
        files.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def config_changes(config: ml_collections.ConfigDict, path: str) -> list[str]:
    """'field: saved -> new' for every field where `config` differs from the config saved at `path`."""
    saved = _flat(json.loads(files.read_text(path)))
    new = _flat(json.loads(config.to_json_best_effort()))
    def show(flat, key):
        return json.dumps(flat[key]) if key in flat else "(absent)"

    return [f"{key}: {show(saved, key)} -> {show(new, key)}" for key in sorted(set(saved) | set(new))
            if show(saved, key) != show(new, key)]


def check_config(config: ml_collections.ConfigDict, workdir: str, allow_change: bool):
    """A run resuming from checkpoints must have the config it was started with, unless allowed."""
    path = workdir_lib.config_path(workdir)
    if not (files.is_file(path) and checkpoints.finished_steps(workdir_lib.checkpoints_dir(workdir))):
        return
    changes = config_changes(config, path)
    if changes and not allow_change:
        raise ConfigChanged(f"the config differs from {path}, which the checkpoints in {workdir} were trained "
                            "with:\n  " + "\n  ".join(changes) + "\nPass --allow_config_change to resume with "
                            "the new values, or use another --workdir.")
    if changes:
        logging.warning("resuming with a changed config (--allow_config_change): %s", "; ".join(changes))


def hold_workdir(workdir: str) -> str | None:
    """Process 0 takes the workdir's run lock; every process stops when it could not."""
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = run_lock.acquire(workdir)
        except run_lock.WorkdirLocked as e:
            error = e
    if jax.process_count() > 1 and not multihost_utils.broadcast_one_to_all(np.int32(error is None)):
        error = error or run_lock.WorkdirLocked(f"workdir {workdir} is in use by another run (process 0 says)")
    if error is not None:
        raise error
    return lock


def data_iterator(config: ml_collections.ConfigDict):
    source = pipeline.open_source(config.data.dataset, config.data.split, config.data.data_dir)
    embeddings = (captions.CaptionEmbeddings.for_dataset(config.data.dataset, config.data.split, config.data.data_dir,
                                                         config.text.t5_max_length) if config.data.captions else None)
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
    batches = pipeline.train_pipeline(
        source, batch_size=config.batch_size // jax.process_count(), seed=batch_lib.data_seed(config),
        degradation_config=config.data.degradation, text_dropout=config.data.text_dropout, embeddings=embeddings,
        worker_count=config.data.worker_count, worker_buffer_size=config.data.worker_buffer_size)
    return iter(batches)


def device_batch(batch: dict, mesh) -> dict:
    """The step's inputs as global arrays; images stay uint8 (4x less to copy), the rest float32."""
    return sharding.to_global_batch(
        {k: v if v.dtype == np.uint8 else np.asarray(v, np.float32) for k, v in batch.items() if k in MODEL_INPUTS},
        mesh)


def train(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> dict:
    """Run (or resume) the stage in `config` until config.total_steps, or until SIGTERM; returns the last
    metrics."""
    jax.config.update("jax_threefry_partitionable", True)
    pipeline.check_prepared(config.data.dataset, config.data.split, config.data.data_dir)
    if config.get("holdout") and config.holdout.get("dataset"):  # a stage's held-out set (student_reward)
        pipeline.check_prepared(config.holdout.dataset, config.holdout.split,
                                config.holdout.get("data_dir") or config.data.data_dir)
    workdir = files.absolute(workdir)
    files.makedirs(workdir)
    lock = hold_workdir(workdir)
    stop = preemption.Preemption()
    try:
        check_config(config, workdir, allow_config_change)
        write_config(config, workdir_lib.config_path(workdir))
        return _train(config, workdir, stop)
    finally:
        stop.close()
        if lock is not None:
            run_lock.release(lock)


# With several processes, they meet at a barrier once a function is compiled (or, for a Python function that
# compiles inside, after its first call): they finish compiling up to minutes apart, and XLA:CPU's gloo
# reduce-scatter gives up after 30 s whatever the collective timeout, so the next collective must start together.
def _compile_together(jitted, name: str, *args):
    compiled = jitted.lower(*args).compile()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"{name} compiled")
    return compiled


class _SyncedFirstCall:
    def __init__(self, fn, name: str):
        self.fn, self.name, self.called = fn, name, False

    def __call__(self, *args):
        result = self.fn(*args)
        if not self.called and jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"{self.name} compiled")
        self.called = True
        return result


def _train(config: ml_collections.ConfigDict, workdir: str, stop: preemption.Preemption) -> dict:
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = [tuple(rule) for rule in config.sharding_rules]

    with errors.as_user_error(f"stage {config.stage}"):  # a missing or mismatched input named in the config
        stage = stages.build_stage(config)
    logging.info("stage %s", json.dumps(stage_lib.describe(stage)))
    optimizer = state_lib.make_optimizer(config.optimizer, stage.parts)
    state, state_shardings = state_lib.init_state(stage.trainable, optimizer, config.ema_decay is not None, mesh,
                                                  rules, stage.model_state)
    frozen_shardings = sharding.param_shardings(stage.frozen, mesh, rules)
    frozen = sharding.put(stage.frozen, frozen_shardings)
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state.params, msg="trainable parameters")

    with errors.as_user_error("data"):  # e.g. no caption cache: the message names the command that builds it
        batches = data_iterator(config)
    checkpointer = checkpoints.Checkpointer(workdir_lib.checkpoints_dir(workdir), keep=config.keep_checkpoints)
    start, restored, data_state = checkpointer.restore_latest(checkpoints.abstract_of(state))
    if start:
        state = restored
        batches.set_state(data_state)
        logging.info("resumed from step %d", start)

    update = state_lib.jit_train_step(
        state_lib.make_train_step(stage.loss_fn, optimizer, seed=config.seed, ema_decay=config.ema_decay),
        state_shardings, frozen_shardings, mesh)
    writer = writers.make_run_writer(workdir)
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)]
    if config.profile and jax.process_index() == 0:
        # The profiler writes through TensorFlow's file system: traces of a bucket workdir stay on this host.
        profile_dir = files.scratch_dir("profile") if files.is_remote(workdir) else workdir
        logging.info("profile traces go to %s", profile_dir)
        hooks.append(periodic_actions.Profile(logdir=profile_dir, num_profile_steps=5, first_profile=start + 10))

    preview, compiled_preview = preview_lib.make_preview_fn(stage, mesh), None
    evaluate = _SyncedFirstCall(stage.evaluate, "held-out evaluation") if stage.evaluate is not None else None
    compiled, pending, last, stopped_at = None, None, {}, None
    if evaluate is not None and start == 0:
        writer.write_scalars(0, evaluate(state.params, frozen, mesh))
    try:
        for step in range(start + 1, config.total_steps + 1):
            batch = device_batch(next(batches), mesh)
            if compiled is None:  # ahead-of-time: surfaces OOM and compile time before the loop runs
                compiled = _compile_together(update, "train step", state, frozen, batch)
                logging.info("step compiled; memory: %s", compiled.memory_analysis())
            state, metrics = compiled(state, frozen, batch)
            # Metrics are read one step late: the host never waits for the step it just dispatched.
            if pending is not None and pending[0] % config.log_every == 0:
                last = write_metrics(writer, *pending)
            pending = (step, metrics)
            for hook in hooks:
                hook(step)
            if evaluate is not None and (step % stage.evaluate_every == 0 or step == config.total_steps):
                writer.write_scalars(step, evaluate(state.params, frozen, mesh))
            if step % config.image_every == 0:
                args = (state.params, frozen, batch, jax.random.PRNGKey(step))
                compiled_preview = compiled_preview or _compile_together(preview, "preview", *args)
                rows = compiled_preview(*args)
                writer.write_images(step, {"lr_sr_hr": multihost_utils.process_allgather(rows, tiled=True)})
            preempted = stop.reached(step)
            if preempted or step % config.checkpoint_every == 0 or step == config.total_steps:
                raise_if_nonfinite(int(jax.device_get(state.nonfinite_step)))
                checkpointer.save(step, state, batches.get_state())
                writer.flush()
            if preempted:
                stopped_at = step
                break
        if pending is not None:
            last = write_metrics(writer, *pending)
            raise_if_nonfinite(int(jax.device_get(state.nonfinite_step)))
    finally:  # an interrupted run still completes the saves already started
        checkpointer.wait()
        checkpointer.close()
        batches.close()
        writer.flush()
    if stopped_at is not None:
        logging.warning("stopped by SIGTERM after step %d of %d; checkpoint %d is in %s: rerun the same command to "
                        "resume", stopped_at, config.total_steps, stopped_at, workdir_lib.checkpoints_dir(workdir))
        return last
    export_bundle(stage, state, config, workdir_lib.bundle_dir(workdir))
    return last


def export_bundle(stage: stage_lib.Stage, state: state_lib.TrainState, config: ml_collections.ConfigDict, dst: str):
    """Write the trained network (EMA weights when kept) as a model bundle for SR and the next stage."""
    trainable = state.ema_params if config.ema_decay is not None else state.params
    trainable = multihost_utils.process_allgather(trainable, tiled=True)  # every process takes part
    if jax.process_index() != 0:
        return
    null = stage.frozen["null"]
    bundle.save_bundle(dst, student_config=stage.model_config, student_params=stage.model_params(trainable),
                       autoencoder_config=stage.autoencoder_config, autoencoder_params=stage.frozen["autoencoder"],
                       null_embeddings=(null["prompt_embeds"], null["pooled_prompt_embeds"]),
                       text_encoders_dir=config.text.get("encoders"),
                       meta=stage_lib.bundle_meta(stage.name, stage.autoencoder_config, config,
                                                  int(jax.device_get(state.step))))
    logging.info("wrote %s", dst)


def write_metrics(writer, step: int, metrics: dict) -> dict:
    """Write one step's metrics; stops the run (before any further checkpoint) once a step was non-finite."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    first_bad = int(scalars.pop("first_nonfinite_step"))
    writer.write_scalars(step, scalars)
    raise_if_nonfinite(first_bad)
    return scalars

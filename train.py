r"""Train one SMFSR stage: teacher flow matching, ISC student, or GAN refinement.

  python train.py --config configs/teacher_fm.py:tiny --workdir runs/tiny_teacher --config.data.data_dir=runs/tfds
  python train.py --config configs/student_isc.py:sd35m --workdir runs/student --config.init.teacher=... ...

The config module's docstring holds its launch command and expected result. Any field can be
overridden with --config.a.b=value. Re-running with the same --workdir resumes from its latest
checkpoint (train state, data-iterator state and step-folded rng: the resumed run equals an
uninterrupted one). Several processes (multi-host): pass --num_processes/--process_id/
--coordinator_address, or --distributed on a cluster where jax.distributed auto-detects them.

WORKDIR holds config.json, checkpoints/<step>/, TensorBoard events, metrics.jsonl and, at the end,
bundle/ (the model for `python -m smfsr_jax.sr` and for the next stage).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from clu import parameter_overview, periodic_actions  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from smfsr_jax.data import captions, pipeline  # noqa: E402
from smfsr_jax.sampling import bundle  # noqa: E402
from smfsr_jax.training import checkpoints, sharding, stages, writers  # noqa: E402
from smfsr_jax.training import state as state_lib  # noqa: E402

# Batch fields the jitted step reads; the rest (indices, names) stay on the host.
MODEL_INPUTS = ("hr", "lr_up", "prompt_embeds", "pooled_prompt_embeds", "hr_latents", "lr_latents")


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN/Inf: the run stops before any checkpoint holds the bad state."""


def check_finite(state: state_lib.TrainState, up_to_step: int):
    first_bad = int(jax.device_get(state.nonfinite_step))
    if first_bad >= 0:
        raise NonFiniteError(f"non-finite loss or gradient at step {first_bad + 1} (checked up to step "
                             f"{up_to_step}); no checkpoint was written after it")


def write_config(config: ml_collections.ConfigDict, path: str):
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def data_iterator(config: ml_collections.ConfigDict):
    source = pipeline.open_source(config.data.dataset, config.data.split, config.data.data_dir)
    embeddings = (captions.CaptionEmbeddings.for_dataset(config.data.dataset, config.data.split, config.data.data_dir,
                                                         config.text.t5_max_length) if config.data.captions else None)
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {jax.process_count()} processes")
    batches = pipeline.train_pipeline(
        source, batch_size=config.batch_size // jax.process_count(), seed=stages.data_seed(config),
        degradation_config=config.data.degradation, text_dropout=config.data.text_dropout, embeddings=embeddings,
        worker_count=config.data.worker_count, worker_buffer_size=config.data.worker_buffer_size)
    return iter(batches)


def device_batch(batch: dict, mesh) -> dict:
    """The step's inputs as global arrays; images stay uint8 (4x less to copy), the rest float32."""
    return sharding.to_global_batch(
        {k: v if v.dtype == np.uint8 else np.asarray(v, np.float32) for k, v in batch.items() if k in MODEL_INPUTS},
        mesh)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume) the stage in `config` until config.total_steps; returns the last metrics."""
    jax.config.update("jax_threefry_partitionable", True)
    paths = stages.workdir_paths(workdir)
    os.makedirs(workdir, exist_ok=True)
    write_config(config, paths["config"])
    mesh = sharding.make_mesh(config.mesh)
    rules = [tuple(rule) for rule in config.sharding_rules]

    stage = stages.build_stage(config)
    logging.info("stage %s", json.dumps(stages.describe(stage)))
    optimizer = state_lib.make_optimizer(config.optimizer, stage.parts)
    state, state_shardings = state_lib.init_state(stage.trainable, optimizer, config.ema_decay is not None, mesh,
                                                  rules, stage.model_state)
    frozen_shardings = sharding.param_shardings(stage.frozen, mesh, rules)
    frozen = sharding.put(stage.frozen, frozen_shardings)
    if jax.process_index() == 0:
        parameter_overview.log_parameter_overview(state.params, msg="trainable parameters")

    batches = data_iterator(config)
    checkpointer = checkpoints.Checkpointer(paths["checkpoints"], keep=config.keep_checkpoints)
    start = checkpointer.latest_step() or 0
    if start:
        state, data_state = checkpointer.restore(start, checkpoints.abstract_of(state))
        batches.set_state(data_state)
        logging.info("resumed from step %d", start)

    update = state_lib.jit_train_step(
        state_lib.make_train_step(stage.loss_fn, optimizer, seed=config.seed, ema_decay=config.ema_decay),
        state_shardings, frozen_shardings, mesh)
    writer = writers.make_writer(workdir)
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                             every_steps=config.log_every)]
    if config.profile and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5, first_profile=start + 10))

    preview = stages.make_preview_fn(stage)
    compiled, pending, last = None, None, {}
    try:
        for step in range(start + 1, config.total_steps + 1):
            batch = device_batch(next(batches), mesh)
            if compiled is None:  # ahead-of-time: surfaces OOM and compile time before the loop runs
                compiled = update.lower(state, frozen, batch).compile()
                logging.info("step compiled; memory: %s", compiled.memory_analysis())
            state, metrics = compiled(state, frozen, batch)
            # Metrics are read one step late: the host never waits for the step it just dispatched.
            if pending is not None and pending[0] % config.log_every == 0:
                last = write_metrics(writer, *pending)
            pending = (step, metrics)
            for hook in hooks:
                hook(step)
            if step % config.image_every == 0:
                rows = preview(state.params, frozen, batch, jax.random.PRNGKey(step))
                writer.write_images(step, {"lr_sr_hr": multihost_utils.process_allgather(rows, tiled=True)})
            if step % config.checkpoint_every == 0 or step == config.total_steps:
                check_finite(state, step)
                checkpointer.save(step, state, batches.get_state())
        if pending is not None:
            last = write_metrics(writer, *pending)
            check_finite(state, pending[0])
    finally:  # an interrupted run still completes the saves already started
        checkpointer.wait()
        checkpointer.close()
        batches.close()
    export_bundle(stage, state, config, paths["bundle"])
    writer.flush()
    return last


def export_bundle(stage: stages.Stage, state: state_lib.TrainState, config: ml_collections.ConfigDict, dst: str):
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
                       meta=stages.bundle_meta(stage, config, int(jax.device_get(state.step))))
    logging.info("wrote %s", dst)


def write_metrics(writer, step: int, metrics: dict) -> dict:
    """Write one step's metrics; stops the run (before any further checkpoint) once a step was non-finite."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    first_bad = int(scalars.pop("first_nonfinite_step"))
    writer.write_scalars(step, scalars)
    if first_bad >= 0:
        raise NonFiniteError(f"non-finite loss or gradient at step {first_bad + 1}; no checkpoint was written after it")
    return scalars


def main(argv):
    del argv
    if flags.FLAGS.num_processes > 1:
        jax.distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                   flags.FLAGS.process_id)
    elif flags.FLAGS.distributed:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    train(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Stage config (configs/<stage>.py:<variant>).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (created; resumed when it holds checkpoints).")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster auto-detection.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several local processes.")
    flags.DEFINE_integer("num_processes", 1, "Number of processes.")
    flags.DEFINE_integer("process_id", 0, "This process's index.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

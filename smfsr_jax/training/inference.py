"""The network of a training run at any finished checkpoint, ready for sampling.

A checkpoint holds only the trainable weights (and optimizer state); the frozen parts come from the stage's
initial weights named in WORKDIR/config.json. `load_checkpoint` rebuilds the stage from that config, restores
the step and merges the two, returning the same fields as a model bundle (sampling/bundle.py), so
`SRPipeline(...)` and the evaluator treat checkpoints and bundles alike.
"""

import json
import os
from typing import Optional

import jax
import ml_collections

from smfsr_jax.sampling import bundle as bundle_lib
from smfsr_jax.training import checkpoints, stages
from smfsr_jax.training import state as state_lib


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = stages.workdir_paths(workdir)["config"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir}: not a training workdir (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_checkpoint(workdir: str, step: Optional[int] = None, stage: Optional[stages.Stage] = None,
                    use_ema: bool = True) -> bundle_lib.Bundle:
    """The trained network of `workdir` at `step` (default: the latest finished checkpoint).

    Pass `stage` (`stages.build_stage(read_config(workdir))`) to reuse its frozen weights across checkpoints.
    """
    config = read_config(workdir)
    stage = stage or stages.build_stage(config)
    directory = stages.workdir_paths(workdir)["checkpoints"]
    finished = checkpoints.finished_steps(directory)
    if not finished:
        raise FileNotFoundError(f"{directory}: no finished checkpoint")
    step = finished[-1] if step is None else step
    if step not in finished:
        raise FileNotFoundError(f"{directory}: step {step} is not a finished checkpoint (have {finished})")
    optimizer = state_lib.make_optimizer(config.optimizer, stage.parts)
    with_ema = config.get("ema_decay") is not None
    abstract = jax.eval_shape(lambda p, m: state_lib.create_state(p, optimizer, with_ema, m), stage.trainable,
                              stage.model_state)
    checkpointer = checkpoints.Checkpointer(directory, async_save=False)
    try:
        state, _ = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    trainable = jax.device_get(state.ema_params if (with_ema and use_ema) else state.params)
    null = stage.frozen["null"]
    return bundle_lib.Bundle(
        path=os.path.abspath(workdir), transformer_config=stage.model_config,
        transformer_params=stage.model_params(trainable), autoencoder_config=stage.autoencoder_config,
        autoencoder_params=stage.frozen["autoencoder"],
        null_embeddings=(null["prompt_embeds"], null["pooled_prompt_embeds"]), negative_embeddings=None,
        text_encoders_dir=config.text.get("encoders"), meta=stages.bundle_meta(stage, config, step))

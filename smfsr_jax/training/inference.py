"""The network of a training run at any finished checkpoint, ready for sampling.

A checkpoint holds the trainable weights (and optimizer state); the frozen parts come from the stage's
initial weights named in WORKDIR/config.json. `load_checkpoint` builds only the stage's network (no teacher,
LPIPS or discriminator), restores just the network's trainable weights of the step and merges the two,
returning the same fields as a model bundle (weights/bundle.py), so `SRModel(...)` (the SR core) and the evaluator treat
checkpoints and bundles alike.
"""

import json
from typing import Optional

import jax
import ml_collections

from smfsr_jax.core import files
from smfsr_jax.core import workdir as workdir_lib
from smfsr_jax.training import checkpoints, stages
from smfsr_jax.training.stages import stage as stage_lib
from smfsr_jax.weights import bundle as bundle_lib


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = workdir_lib.config_path(workdir)
    if not files.exists(path):
        raise FileNotFoundError(f"{workdir}: not a training workdir (no {workdir_lib.CONFIG})")
    return ml_collections.ConfigDict(json.loads(files.read_text(path)))


def load_checkpoint(workdir: str, step: Optional[int] = None, network: Optional[stage_lib.Network] = None,
                    use_ema: bool = True) -> bundle_lib.Bundle:
    """The trained network of `workdir` at `step` (default: the latest finished checkpoint).

    Pass `network` (`stages.build_network(read_config(workdir))`) to reuse its frozen weights across checkpoints.
    """
    config = read_config(workdir)
    network = network or stages.build_network(config)
    directory = workdir_lib.checkpoints_dir(workdir)
    finished = checkpoints.finished_steps(directory)
    if not finished:
        raise FileNotFoundError(f"{directory}: no finished checkpoint")
    step = finished[-1] if step is None else step
    if step not in finished:
        raise FileNotFoundError(f"{directory}: step {step} is not a finished checkpoint (have {finished})")
    field = "ema_params" if (config.get("ema_decay") is not None and use_ema) else "params"
    part, target = network.part, stage_lib.shapes(network.trainable)
    trainable = checkpoints.restore_subtree(directory, step, {field: {part: target} if part else target})[field]
    trainable = jax.device_get(trainable[part] if part else trainable)
    null = network.frozen["null"]
    return bundle_lib.Bundle(
        path=files.absolute(workdir), transformer_config=network.model_config,
        transformer_params=network.params(trainable), autoencoder_config=network.autoencoder_config,
        autoencoder_params=network.frozen["autoencoder"],
        null_embeddings=(null["prompt_embeds"], null["pooled_prompt_embeds"]), negative_embeddings=None,
        text_encoders_dir=config.text.get("encoders"),
        meta=stage_lib.bundle_meta(config.stage, network.autoencoder_config, config, step))

"""The records a stage builder returns (Network: what sampling needs; Stage: what a training step needs) and what
operates on them generically: a network's full parameters from its trainable and frozen parts, the
trainable/frozen split, the frozen weights' dtype, the runtime fields of a loaded architecture, and what a run
logs and exports of its stage.

Frozen parts are one dict with fixed keys, passed to every step without donation:
    base         the shared frozen MM-DiT weights (SD3.5-M for real runs), used by teacher and student;
    own          the trained network's frozen extras (e.g. `to_k_control` in double-norm mode);
    teacher      the teacher's own weights on top of `base` (control + time embedding; student stages);
    teacher_base only when a student's frozen weights are not the teacher's base: the teacher's (else `base`);
    autoencoder  the VAE (or pixel autoencoder) params;
    adapted      only with LoRA (student_reward): the frozen weights the trainable adapters apply to;
    null         NULL text embeddings {'prompt_embeds': (L, D), 'pooled_prompt_embeds': (P,)};
and, in `student_gan`, regularizer / lpips / dinov3.
"""

import dataclasses
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from smfsr_jax.models import mmdit, vae
from smfsr_jax.training import lora as lora_lib
from smfsr_jax.training import partition

# Fields of `config.model` that change how a loaded network runs, not its weights.
RUNTIME_FIELDS = ("dtype", "attention", "remat_policy", "lr_key_bug")
# A student stage's frozen["teacher"]: the teacher's own weights, the rest of it being its base.
TEACHER_OWN = ("control", r"^time_text_embed/")
# Frozen leaves kept in fp32 when the rest is held in bf16: the positional table is added to every token.
FROZEN_FP32 = (r"(^|/)pos_embed/pos_embed$",)


@dataclasses.dataclass
class Network:
    """What sampling needs of a stage's trained network: its config, initial trainable weights and the frozen
    `base`, `own`, `autoencoder` and `null` parts (module docstring)."""
    model_config: mmdit.MMDiTConfig
    autoencoder_config: vae.VAEConfig
    trainable: dict
    frozen: dict
    part: Optional[str] = None  # the key of these weights in the stage's trainable tree, if it has parts
    lora: Optional[tuple] = None  # (alpha, rank) when the trainable weights are LoRA adapters

    def params(self, trainable) -> dict:
        return model_weights(trainable, self.frozen, self.lora)


@dataclasses.dataclass
class Stage:
    name: str
    model_config: mmdit.MMDiTConfig
    trainable: dict  # host arrays (or shapes): initial trainable params
    frozen: dict  # host arrays (or shapes), keys as in the module docstring
    loss_fn: Callable
    autoencoder_config: vae.VAEConfig
    teacher_config: Optional[mmdit.MMDiTConfig] = None
    model_state: dict = dataclasses.field(default_factory=dict)  # non-trained variables the step updates
    parts: tuple = ()  # top-level trainable parts with their own optimizers (student_gan)
    student_part: Optional[str] = None  # the part holding the exported network's trainable weights
    # Held-out evaluation the loop runs before training and every `evaluate_every` steps:
    # evaluate(trainable, frozen, mesh) -> {name: float} (student_reward).
    evaluate: Optional[Callable] = None
    evaluate_every: int = 0
    lora: Optional[tuple] = None  # (alpha, rank) when the trainable weights are LoRA adapters

    def model_params(self, trainable, frozen=None) -> dict:
        """Full parameters of the trained network."""
        frozen = self.frozen if frozen is None else frozen
        trainable = trainable[self.student_part] if self.student_part else trainable
        return model_weights(trainable, frozen, self.lora)


def model_weights(trainable, frozen: dict, lora: Optional[tuple] = None) -> dict:
    """The network's full parameters from its trainable weights (LoRA adapters `{"lora": ...}` applied to
    frozen["adapted"] when `lora` = (alpha, rank)) and the frozen `base` and `own`."""
    if lora is not None:
        trainable = lora_lib.apply_lora(frozen["adapted"], trainable["lora"], *lora)
    return partition.merge(trainable, frozen["base"], frozen["own"])


def teacher_params(frozen: dict) -> dict:
    """The frozen teacher's full parameters."""
    return partition.merge(frozen.get("teacher_base", frozen["base"]), frozen["teacher"])


def shapes(tree, dtype=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), tree)


def runtime_config(loaded: mmdit.MMDiTConfig, config_model: ml_collections.ConfigDict) -> mmdit.MMDiTConfig:
    """The loaded architecture with the config's runtime fields; any other disagreement is an error."""
    wanted = mmdit.MMDiTConfig.from_dict(config_model.to_dict())
    arch = {f: getattr(wanted, f) for f in loaded.to_dict() if f not in RUNTIME_FIELDS + ("time_scale", "sample_size")}
    mismatched = {f: (v, getattr(loaded, f)) for f, v in arch.items() if getattr(loaded, f) != v}
    if mismatched:
        raise ValueError(f"config.model disagrees with the loaded weights (config, weights): {mismatched}")
    return loaded.replace(**{f: getattr(wanted, f) for f in RUNTIME_FIELDS})


def unused_keys(model_config: mmdit.MMDiTConfig) -> tuple:
    """Trainable-pattern leaves that get no gradient: in double-norm mode `to_k_control` is computed but unused,
    so it is frozen (and escapes weight decay)."""
    return ("to_k_control",) if model_config.lr_key_bug and model_config.qk_norm else ()


def split(params, config, model_config):
    """(trainable, frozen) by the config's `trainable` regexes."""
    return partition.partition(params, tuple(config.trainable), unused_keys(model_config))


def frozen_cast(tree, config):
    """Frozen weights in `config.frozen_dtype` (fp32 kept for FROZEN_FP32)."""
    if not config.get("frozen_dtype"):
        return tree
    return partition.cast(tree, np.dtype(config.frozen_dtype), keep=FROZEN_FP32)


def describe(stage: Stage) -> dict:
    return {"stage": stage.name, "trainable": partition.count(stage.trainable),
            **{f"frozen_{k}": partition.count(v) for k, v in stage.frozen.items() if k != "null"}}


def bundle_meta(name: str, autoencoder_config: vae.VAEConfig, config: ml_collections.ConfigDict, step: int) -> dict:
    """What a model bundle records of its run; `tile_size` is the latent side of the training crops, the tile
    SR uses by default."""
    return {"stage": name, "step": step, "variant": config.variant,
            "tile_size": config.data.degradation.crop_size // autoencoder_config.downscale}

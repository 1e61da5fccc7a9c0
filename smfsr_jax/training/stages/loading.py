"""Loaders of a stage's networks, each with an abstract (shapes-only) mode, and checks of what they load: the
autoencoder, the NULL text embeddings, teacher and student transformers (a bundle, converted directory or
finished workdir), LPIPS and random initial weights; that the NULL embeddings in use are the teacher's; the pooled
embeddings a student's interval-embedding fit covers.

`abstract=True` builds every tree as jax.ShapeDtypeStructs from the config alone (no file is read): what
benchmarks and memory estimates lower the step with.
"""

import io
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from smfsr_jax.convert import transformer as convert_transformer
from smfsr_jax.core import files
from smfsr_jax.core import workdir as workdir_lib
from smfsr_jax.models import lpips as lpips_lib
from smfsr_jax.models import mmdit, vae
from smfsr_jax.training import partition
from smfsr_jax.training.stages.stage import (RUNTIME_FIELDS, TEACHER_OWN, Network, frozen_cast, runtime_config,
                                             shapes, split)
from smfsr_jax.weights import bundle

# Rows of pooled caption embeddings the student's interval-embedding fit covers (besides NULL).
FIT_POOLED_ROWS = 1024
CLIP_TOKENS = 77  # SD3's context: 77 CLIP tokens followed by the T5 tokens


def load_autoencoder(config: ml_collections.ConfigDict, abstract: bool = False) -> tuple[vae.VAEConfig, dict]:
    if config.kind == "pixel" and not config.get("path"):
        return vae.VAEConfig.pixel(downscale=config.downscale, latent_channels=config.latent_channels,
                                   pixel_basis=config.pixel_basis,
                                   band_scales=tuple(config.get("band_scales") or ())), {}
    # remat: the stages that back-propagate through the decoder (student_gan, student_reward) would otherwise
    # keep every full-resolution activation; the memory benchmarks lower the same setting.
    overrides = {"remat": True, **({"dtype": config.dtype} if config.get("dtype") else {})}
    if abstract:
        from smfsr_jax.convert.vae import abstract_params
        ae_config = vae.VAEConfig.sd3(**overrides)
        return ae_config, shapes(abstract_params(ae_config), jnp.dtype(ae_config.dtype))
    if not config.get("path"):
        raise ValueError("autoencoder.path is required unless autoencoder.kind == 'pixel'")
    from smfsr_jax.convert.vae import load_vae
    return load_vae(config.path, **overrides)


def null_embeddings(config: ml_collections.ConfigDict, model_config: mmdit.MMDiTConfig, data_config,
                    abstract: bool = False) -> dict:
    """NULL prompt embeddings: from the dataset's caption cache, an .npz file, or a fixed placeholder.

    The placeholder (seeded normal) is for tiny runs that have no text encoders: it is the one
    condition every example sees, so it only has to be fixed.
    """
    source = config.null
    if abstract:
        tokens = config.context_length if source == "placeholder" else CLIP_TOKENS + config.t5_max_length
        return {"prompt_embeds": jax.ShapeDtypeStruct((tokens, model_config.joint_attention_dim), jnp.float32),
                "pooled_prompt_embeds": jax.ShapeDtypeStruct((model_config.pooled_projection_dim,), jnp.float32)}
    if source == "placeholder":
        rng = np.random.default_rng(0)
        return {"prompt_embeds": rng.normal(size=(config.context_length, model_config.joint_attention_dim)).astype(np.float32),
                "pooled_prompt_embeds": rng.normal(size=(model_config.pooled_projection_dim,)).astype(np.float32)}
    if source == "dataset":
        from smfsr_jax.data.captions import CaptionEmbeddings
        prompt, pooled = CaptionEmbeddings.for_dataset(data_config.dataset, data_config.split, data_config.data_dir,
                                                       config.t5_max_length).null
        return {"prompt_embeds": np.asarray(prompt, np.float32), "pooled_prompt_embeds": np.asarray(pooled, np.float32)}
    with np.load(io.BytesIO(files.read_bytes(source))) as f:
        return {"prompt_embeds": f["prompt_embeds"].astype(np.float32),
                "pooled_prompt_embeds": f["pooled_prompt_embeds"].astype(np.float32)}


def load_transformer(path: str, config: ml_collections.ConfigDict, require=None):
    """A converted / diffusers / bundle MM-DiT, run with this config's runtime fields; `require(cfg, path)` raises
    when the weights are not the kind the stage needs (`require_teacher`, `require_student`)."""
    cfg, params = convert_transformer.load_transformer(path)
    if require is not None:
        require(cfg, path)
    overrides = {f: config.model[f] for f in RUNTIME_FIELDS if f in config.model}
    return cfg.replace(**overrides), params


def require_teacher(cfg: mmdit.MMDiTConfig, source: str):
    """Raise unless `cfg` is a DiT4SR-style teacher (the LR stream, single time conditioning)."""
    if cfg.time_conditioning != "single" or not cfg.lr_stream:
        raise ValueError(f"{source}: not a DiT4SR-style teacher (lr_stream with single time conditioning)")


def require_student(cfg: mmdit.MMDiTConfig, source: str):
    """Raise unless `cfg` is an SMFSR student (interval time conditioning)."""
    if cfg.time_conditioning != "interval":
        raise ValueError(f"{source}: not an SMFSR student (interval time conditioning)")


def weights_path(path: str) -> str:
    """A bundle or converted directory as given; a training workdir (it has checkpoints/) as its exported
    bundle. Each may be a bucket URL."""
    if files.is_dir(workdir_lib.checkpoints_dir(path)):
        exported = workdir_lib.bundle_dir(path)
        if not files.is_file(os.path.join(exported, bundle.BUNDLE_FILE)):
            raise FileNotFoundError(f"{path}: a training workdir without an exported bundle ({exported}); "
                                    "let the run finish, or point at a bundle")
        return exported
    return path


def load_student(config: ml_collections.ConfigDict, abstract: bool = False):
    """The student the stage starts from (config.init.student: a bundle, converted directory or finished
    workdir); as shapes, the config's architecture."""
    if abstract:
        cfg = mmdit.MMDiTConfig.from_dict(config.model.to_dict()).replace(time_conditioning="interval",
                                                                          time_scale=1000.0)
        return cfg, mmdit.abstract_params(cfg)
    cfg, params = load_transformer(weights_path(config.init.student), config, require_student)
    return runtime_config(cfg, config.model), params


def student_parts(config: ml_collections.ConfigDict, abstract: bool = False):
    """(student config, trainable, own, base) of config.init.student, uncast: `own` holds the frozen leaves that
    match the trainable patterns (e.g. `to_k_control` in double-norm mode), `base` the rest."""
    student_config, params = load_student(config, abstract)
    trainable, frozen = split(params, config, student_config)
    own, base = partition.partition(frozen, tuple(config.trainable))
    return student_config, trainable, own, base


def student_network(config: ml_collections.ConfigDict, abstract: bool = False, part: Optional[str] = None) -> Network:
    """The student alone, as the stages that fine-tune a student (`student_gan`, `student_reward`) export it."""
    ae_config, ae_params = load_autoencoder(config.autoencoder, abstract)
    student_config, trainable, own, base = student_parts(config, abstract)
    null = null_embeddings(config.text, student_config, config.data, abstract)
    return Network(student_config, ae_config, trainable, {
        "base": frozen_cast(base, config), "own": frozen_cast(own, config), "autoencoder": ae_params,
        "null": null}, part=part)


def teacher_for_student(config: ml_collections.ConfigDict, student_config: mmdit.MMDiTConfig, student_base: dict,
                        null: dict, abstract: bool = False):
    """(teacher config, teacher params, frozen entries {"teacher"[, "teacher_base"]}, uncast) of config.init.teacher
    for a student stage: checked against the student (NULL embeddings, lr_key_bug), its base shared with the
    student's when they are equal."""
    teacher_config, teacher_params = load_teacher(config, abstract)
    if not abstract:
        check_null_embeddings(config, config.init.teacher, null)
    if student_config.lr_key_bug != teacher_config.lr_key_bug:
        raise ValueError("teacher and student must share lr_key_bug (whether the LR stream's key is normalised "
                         "by the image stream's norm, docs/design.md#lr_key_bug)")
    teacher_own, base = partition.partition(teacher_params, TEACHER_OWN)
    entries = {"teacher": teacher_own}
    if not abstract and not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(student_base),
                                                                        jax.tree.leaves(base))):
        # Not one shared base (e.g. a student converted from other weights): the teacher keeps its own copy.
        logging.warning("the student's frozen weights differ from the teacher's base; keeping a separate copy")
        entries["teacher_base"] = base
    return teacher_config, teacher_params, entries


def load_teacher(config: ml_collections.ConfigDict, abstract: bool = False):
    """The stage's frozen teacher (config.init.teacher: a bundle, converted directory or finished workdir); as
    shapes, the config's architecture at x1000 times."""
    if abstract:
        cfg = mmdit.MMDiTConfig.from_dict(config.model.to_dict()).replace(time_conditioning="single",
                                                                          time_scale=1000.0)
        return cfg, mmdit.abstract_params(cfg)
    return load_transformer(weights_path(config.init.teacher), config, require_teacher)


def load_lpips(config: ml_collections.ConfigDict, abstract: bool = False):
    """LPIPS for a reconstruction term: converted / published weights, or (tiny runs only) fixed random
    weights."""
    lpips_config = lpips_lib.LPIPSConfig(net=config.net)
    dummy = jnp.zeros((1, 64, 64, 3))
    if abstract:
        return lpips_config, jax.eval_shape(
            lambda: lpips_lib.LPIPS(lpips_config).init(jax.random.PRNGKey(0), dummy, dummy)["params"])
    if config.get("weights"):
        from smfsr_jax.convert.lpips import load_lpips_from
        return load_lpips_from(config.weights, config.net)
    if not config.get("random_init"):
        raise ValueError(f"rec.lpips.weights is required (python -m smfsr_jax.convert lpips --net {config.net} ...); "
                         "rec.lpips.random_init=True is for tiny runs without pretrained weights")
    params = jax.device_get(lpips_lib.LPIPS(lpips_config).init(jax.random.PRNGKey(1), dummy, dummy)["params"])
    # Random trunk; uniform positive lin weights (1/C), so the result stays a distance.
    for name in [k for k in params if k.startswith("lin")]:
        kernel = params[name]["kernel"]
        params[name] = {"kernel": np.full(kernel.shape, 1.0 / kernel.shape[-2], np.float32)}
    return lpips_config, params


def random_params(model_config: mmdit.MMDiTConfig, seed: int, abstract: bool = False) -> dict:
    if abstract:
        return mmdit.abstract_params(model_config)
    return jax.device_get(jax.jit(mmdit.init_params, static_argnums=0)(model_config, jax.random.PRNGKey(seed)))


def check_null_embeddings(config: ml_collections.ConfigDict, teacher_path: str, null: dict):
    """The NULL embeddings in use must be those the teacher was trained with: text dropout taught it that
    condition, and the CFG of the boundary and VSD terms contrasts against it.

    A teacher bundle of this project stores its NULL; a released teacher (DiT4SR, SMFSR's Teacher) was trained
    with DiT4SR's published NULL_*.pt, compared when `text.published_null` names their folder (or when the
    caption cache stored them); otherwise this says it cannot check.
    """
    in_use = (np.asarray(null["prompt_embeds"], np.float32), np.asarray(null["pooled_prompt_embeds"], np.float32))
    teacher_path = weights_path(teacher_path)
    if files.is_file(os.path.join(teacher_path, bundle.BUNDLE_FILE)):
        expected, source = bundle.read_null_embeddings(teacher_path), f"the teacher bundle {teacher_path}"
    elif config.text.get("published_null"):
        from smfsr_jax.convert.text import load_null_embeddings
        expected, source = load_null_embeddings(config.text.published_null), config.text.published_null
    else:
        cached_null = config.text.null == "dataset" and config.data.captions and _caption_cache(config).info.get("null")
        if cached_null != "published":
            logging.warning("cannot check the NULL embeddings (text.null=%r) against the ones the released teacher "
                            "%s was trained with (DiT4SR's NULL_*.pt): pass --config.text.published_null=DIR",
                            config.text.null, teacher_path)
        return
    for name, ours, theirs in zip(("prompt_embeds", "pooled"), in_use, expected):
        theirs = np.asarray(theirs, np.float32)
        # The caption cache stores fp16: agreement to its rounding is agreement.
        if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=2e-3, atol=2e-3 * np.abs(theirs).max()):
            diff = "shape " + str(ours.shape) if ours.shape != theirs.shape else f"max |diff| {np.abs(ours - theirs).max():.3g}"
            raise ValueError(f"NULL {name} in use (text.null={config.text.null!r}) differ from those of {source} "
                             f"({diff}); point --config.text.null at the teacher's NULL embeddings")


def _caption_cache(config):
    from smfsr_jax.data.captions import CaptionEmbeddings
    return CaptionEmbeddings.for_dataset(config.data.dataset, config.data.split, config.data.data_dir,
                                         config.text.t5_max_length)


def fit_pooled(config: ml_collections.ConfigDict, null: dict) -> np.ndarray:
    """The pooled text embeddings a student will see: NULL, plus cached caption rows when captions are on."""
    rows = [np.asarray(null["pooled_prompt_embeds"], np.float32)[None]]
    if config.data.captions:
        rows.append(_caption_cache(config).pooled_rows(FIT_POOLED_ROWS))
    return np.concatenate(rows)

"""Per-stage setup: networks, initial parameters, the trainable/frozen split and the loss function.

Frozen parts are one dict with fixed keys, passed to every step without donation:
    base         the shared frozen MM-DiT weights (SD3.5-M for real runs), used by teacher and student;
    own          the trained network's frozen extras (e.g. `to_k_control` in double-norm mode);
    teacher      the teacher's own weights on top of `base` (control + time embedding; stage 1);
    autoencoder  the VAE (or pixel autoencoder) params;
    null         NULL text embeddings {'prompt_embeds': (L, D), 'pooled_prompt_embeds': (P,)}.
"""

import dataclasses
import os
import zlib
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from smfsr_jax.convert import transformer as convert_transformer
from smfsr_jax.models import mmdit, vae
from smfsr_jax.objectives import flow_matching, isc
from smfsr_jax.sampling import bundle
from smfsr_jax.training import partition, student_init

# Fields of `config.model` that change how a loaded network runs, not its weights.
RUNTIME_FIELDS = ("dtype", "attention", "remat_policy", "lr_key_bug")
TEACHER_OWN = ("control", r"^time_text_embed/")
# Frozen leaves kept in fp32 when the rest is held in bf16: the positional table is added to every token.
FROZEN_FP32 = (r"(^|/)pos_embed/pos_embed$",)
# Rows of pooled caption embeddings the student's interval-embedding fit covers (besides NULL).
FIT_POOLED_ROWS = 1024


@dataclasses.dataclass
class Stage:
    name: str
    model_config: mmdit.MMDiTConfig
    trainable: dict  # host arrays: initial trainable params
    frozen: dict  # host arrays, keys as in the module docstring
    loss_fn: Callable
    autoencoder_config: vae.VAEConfig
    teacher_config: Optional[mmdit.MMDiTConfig] = None
    model_state: dict = dataclasses.field(default_factory=dict)  # non-trained variables the step updates
    parts: tuple = ()  # top-level trainable parts with their own optimizers (stage 2)
    student_part: Optional[str] = None  # the part holding the exported network's trainable weights

    def model_params(self, trainable, frozen=None) -> dict:
        """Full parameters of the trained network."""
        frozen = self.frozen if frozen is None else frozen
        trainable = trainable[self.student_part] if self.student_part else trainable
        return partition.merge(trainable, frozen["base"], frozen["own"])

    def teacher_params(self, frozen=None) -> dict:
        frozen = self.frozen if frozen is None else frozen
        return partition.merge(frozen["base"], frozen["teacher"])


# ---------------------------------------------------------------------------------------------
# Shared pieces.

def load_autoencoder(config: ml_collections.ConfigDict) -> tuple[vae.VAEConfig, dict]:
    if config.get("path"):
        from smfsr_jax.convert.vae import load_vae
        return load_vae(config.path, **({"dtype": config.dtype} if config.get("dtype") else {}))
    if config.kind != "pixel":
        raise ValueError("autoencoder.path is required unless autoencoder.kind == 'pixel'")
    return vae.VAEConfig.pixel(downscale=config.downscale, latent_channels=config.latent_channels,
                               pixel_basis=config.pixel_basis), {}


def null_embeddings(config: ml_collections.ConfigDict, model_config: mmdit.MMDiTConfig, data_config) -> dict:
    """NULL prompt embeddings: from the dataset's caption cache, an .npz file, or a fixed placeholder.

    The placeholder (seeded normal) is for tiny runs that have no text encoders: it is the one
    condition every example sees, so it only has to be fixed.
    """
    source = config.null
    if source == "placeholder":
        rng = np.random.default_rng(0)
        return {"prompt_embeds": rng.normal(size=(config.context_length, model_config.joint_attention_dim)).astype(np.float32),
                "pooled_prompt_embeds": rng.normal(size=(model_config.pooled_projection_dim,)).astype(np.float32)}
    if source == "dataset":
        from smfsr_jax.data.captions import CaptionEmbeddings
        prompt, pooled = CaptionEmbeddings.for_dataset(data_config.dataset, data_config.split, data_config.data_dir,
                                                       config.t5_max_length).null
        return {"prompt_embeds": np.asarray(prompt, np.float32), "pooled_prompt_embeds": np.asarray(pooled, np.float32)}
    with np.load(source) as f:
        return {"prompt_embeds": f["prompt_embeds"].astype(np.float32),
                "pooled_prompt_embeds": f["pooled_prompt_embeds"].astype(np.float32)}


def encode_images(ae_config: vae.VAEConfig, ae_params, images_u8, rng):
    """uint8 NHWC images -> normalised latents from a posterior sample (the frozen encoder)."""
    x = images_u8.astype(jnp.float32) / 127.5 - 1.0
    mean, logvar = vae.make_autoencoder(ae_config).apply({"params": ae_params}, x, method="encode")
    return vae.normalize_latents(vae.sample_latent(rng, mean, logvar), ae_config)


def batch_latents(ae_config, frozen, batch, rng):
    """(HR latents, LR latents) of a batch: precomputed when the dataset has them, else encoded here."""
    if "hr_latents" in batch:
        return batch["hr_latents"], batch["lr_latents"]
    rng_hr, rng_lr = jax.random.split(rng)
    ae = jax.lax.stop_gradient(frozen["autoencoder"])
    return encode_images(ae_config, ae, batch["hr"], rng_hr), encode_images(ae_config, ae, batch["lr_up"], rng_lr)


def text_condition(frozen, batch, batch_size: int):
    """(context, pooled) per sample: cached caption embeddings (NULL already swapped in for dropped
    captions by the pipeline), or the NULL embeddings when the dataset has no captions."""
    if "prompt_embeds" in batch:
        return batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    null = frozen["null"]
    return (jnp.broadcast_to(null["prompt_embeds"], (batch_size, *null["prompt_embeds"].shape)),
            jnp.broadcast_to(null["pooled_prompt_embeds"], (batch_size, *null["pooled_prompt_embeds"].shape)))


def _runtime_config(loaded: mmdit.MMDiTConfig, config_model: ml_collections.ConfigDict) -> mmdit.MMDiTConfig:
    wanted = mmdit.MMDiTConfig.from_dict(config_model.to_dict())
    arch = {f: getattr(wanted, f) for f in loaded.to_dict() if f not in RUNTIME_FIELDS + ("time_scale", "sample_size")}
    mismatched = {f: (v, getattr(loaded, f)) for f, v in arch.items() if getattr(loaded, f) != v}
    if mismatched:
        raise ValueError(f"config.model disagrees with the loaded weights (config, weights): {mismatched}")
    return loaded.replace(**{f: getattr(wanted, f) for f in RUNTIME_FIELDS})


def _split(params, config, model_config):
    exclude = tuple(config.get("exclude_from_training", ()))
    if model_config.lr_key_bug and model_config.qk_norm:
        exclude += ("to_k_control",)  # computed but unused: no gradient, and no weight decay either
    return partition.partition(params, tuple(config.trainable), exclude)


def _frozen_cast(tree, config):
    return partition.cast(tree, np.dtype(config.frozen_dtype), keep=FROZEN_FP32) if config.get("frozen_dtype") else tree


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The data pipeline's seed: the run seed with the stage name folded in, so that the stages of one recipe
    see different crops and degradations for the same (epoch, record)."""
    state = np.random.SeedSequence([config.seed, zlib.crc32(config.stage.encode())]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def check_null_embeddings(config: ml_collections.ConfigDict, teacher_path: str, null: dict):
    """The NULL embeddings in use must be those the teacher was trained with: text dropout taught it that
    condition, and the CFG of the boundary and VSD terms contrasts against it.

    A teacher bundle of this project stores its NULL; a released teacher (DiT4SR, SMFSR's Teacher) was trained
    with DiT4SR's published NULL_*.pt, compared when `text.published_null` names their folder (or when the
    caption cache stored them); otherwise this says it cannot check.
    """
    in_use = (np.asarray(null["prompt_embeds"], np.float32), np.asarray(null["pooled_prompt_embeds"], np.float32))
    if os.path.isfile(os.path.join(teacher_path, bundle.BUNDLE_FILE)):
        expected, source = bundle.read_null_embeddings(teacher_path), f"the teacher bundle {teacher_path}"
    elif config.text.get("published_null"):
        from smfsr_jax.convert.text import load_null_embeddings
        expected, source = load_null_embeddings(config.text.published_null), config.text.published_null
    else:
        if not (config.text.null == "dataset" and config.data.captions and _cache_null(config) == "published"):
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


def _cache_null(config) -> str:
    from smfsr_jax.data.captions import CaptionEmbeddings
    return CaptionEmbeddings.for_dataset(config.data.dataset, config.data.split, config.data.data_dir,
                                         config.text.t5_max_length).info.get("null", "")


def fit_pooled(config: ml_collections.ConfigDict, null: dict) -> np.ndarray:
    """The pooled text embeddings a student will see: NULL, plus cached caption rows when captions are on."""
    rows = [np.asarray(null["pooled_prompt_embeds"], np.float32)[None]]
    if config.data.captions:
        from smfsr_jax.data.captions import CaptionEmbeddings
        rows.append(CaptionEmbeddings.for_dataset(config.data.dataset, config.data.split, config.data.data_dir,
                                                  config.text.t5_max_length).pooled_rows(FIT_POOLED_ROWS))
    return np.concatenate(rows)


def isc_times(isc_config: ml_collections.ConfigDict) -> dict:
    """The time-sampler keywords of `isc.isc_loss` from a stage's `isc` config."""
    return {name: isc_config[name] for name in isc.DEFAULT_TIMES}


# ---------------------------------------------------------------------------------------------
# Stage 0: teacher flow matching.

def teacher_stage(config: ml_collections.ConfigDict) -> Stage:
    ae_config, ae_params = load_autoencoder(config.autoencoder)
    if config.init.get("base"):
        base_cfg, base_params = convert_transformer.load_transformer(config.init.base)
        if not base_cfg.lr_stream:
            base_cfg, base_params = convert_transformer.teacher_from_base(base_cfg, base_params)
        model_config = _runtime_config(base_cfg, config.model)
        params = base_params
    elif config.init.get("random"):
        model_config = mmdit.MMDiTConfig.from_dict(config.model.to_dict())
        params = jax.device_get(jax.jit(mmdit.init_params, static_argnums=0)(model_config, jax.random.PRNGKey(config.seed)))
    else:
        raise ValueError("the teacher needs initial weights: set --config.init.base (SD3.5-M in any layout) "
                         "or --config.init.random=True")
    trainable, frozen_model = _split(params, config, model_config)
    frozen = {"base": _frozen_cast(frozen_model, config), "own": {}, "teacher": {}, "autoencoder": ae_params,
              "null": null_embeddings(config.text, model_config, config.data)}
    return Stage("teacher", model_config, trainable, frozen, make_teacher_loss(config, model_config, ae_config),
                 ae_config)


def make_teacher_loss(config, model_config: mmdit.MMDiTConfig, ae_config: vae.VAEConfig):
    """The stage-0 loss_fn (state.LossFn): flow matching (config.flow_matching) on the batch's HR latents."""
    model = mmdit.MMDiT(model_config)
    fm = config.flow_matching
    flow_matching.check_options(fm.loss, fm.sigma_sampler)

    def loss_fn(trainable_params, model_state, frozen, batch, rng):
        rng_latents, rng_loss = jax.random.split(rng)
        hr, lr = batch_latents(ae_config, frozen, batch, rng_latents)
        context, pooled = text_condition(frozen, batch, hr.shape[0])
        params = partition.merge(trainable_params, frozen["base"], frozen["own"])
        velocity = lambda z, t: model.apply({"params": params}, z, context=context, pooled=pooled, t=t,  # noqa: E731
                                            lr_latents=lr)
        loss, metrics = flow_matching.teacher_fm_loss(velocity, hr, rng_loss, loss=fm.loss,
                                                      sigma_sampler=fm.sigma_sampler, shift=fm.shift)
        return loss, (metrics, model_state)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Stage 1: ISC student.

def load_teacher(path: str, config: ml_collections.ConfigDict):
    """A converted / diffusers / bundle teacher, run with this config's runtime fields."""
    cfg, params = convert_transformer.load_transformer(path)
    if cfg.time_conditioning != "single" or not cfg.lr_stream:
        raise ValueError(f"{path}: not a DiT4SR-style teacher (lr_stream with single time conditioning)")
    overrides = {f: config.model[f] for f in RUNTIME_FIELDS if f in config.model}
    return cfg.replace(**overrides), params


def student_stage(config: ml_collections.ConfigDict) -> Stage:
    ae_config, ae_params = load_autoencoder(config.autoencoder)
    teacher_config, teacher_params = load_teacher(config.init.teacher, config)
    null = null_embeddings(config.text, teacher_config, config.data)
    check_null_embeddings(config, config.init.teacher, null)
    student_config, student_params = student_init.student_from_teacher(
        teacher_config, teacher_params, interval_init=config.init.interval, pooled=fit_pooled(config, null),
        seed=config.seed)
    student_config = _runtime_config(student_config, config.model)
    teacher_own, base = partition.partition(teacher_params, TEACHER_OWN)
    trainable, student_frozen = _split(student_params, config, student_config)
    student_own, _ = partition.partition(student_frozen, tuple(config.trainable))  # the rest is `base`
    frozen = {"base": _frozen_cast(base, config), "own": _frozen_cast(student_own, config),
              "teacher": _frozen_cast(teacher_own, config), "autoencoder": ae_params, "null": null}
    logging.info("student: %d trainable, %d frozen-own, %d shared base, %d teacher-own parameters",
                 partition.count(trainable), partition.count(student_own), partition.count(base),
                 partition.count(teacher_own))
    return Stage("student", student_config, trainable, frozen,
                 make_student_loss(config, student_config, teacher_config, ae_config), ae_config, teacher_config)


def make_student_loss(config, student_config: mmdit.MMDiTConfig, teacher_config: mmdit.MMDiTConfig,
                      ae_config: vae.VAEConfig):
    """The stage-1 loss_fn (state.LossFn): ISC + boundary against the frozen teacher."""
    student, teacher = mmdit.MMDiT(student_config), mmdit.MMDiT(teacher_config)
    isc_config = config.isc
    isc.check_times(**isc_times(isc_config))

    def loss_fn(trainable_params, model_state, frozen, batch, rng):
        rng_latents, rng_loss = jax.random.split(rng)
        hr, lr = batch_latents(ae_config, frozen, batch, rng_latents)
        context, pooled = text_condition(frozen, batch, hr.shape[0])
        student_params = partition.merge(trainable_params, frozen["base"], frozen["own"])
        teacher_params = jax.lax.stop_gradient(partition.merge(frozen["base"], frozen["teacher"]))

        def u_fn(z, r, t):
            return student.apply({"params": student_params}, z, context=context, pooled=pooled, t=t, r=r,
                                 lr_latents=lr)

        def teacher_fn(z, t, ctx=context, pool=pooled):
            return teacher.apply({"params": teacher_params}, z, context=ctx, pooled=pool, t=t, lr_latents=lr)

        uncond_fn = None
        if isc_config.get("boundary_cfg") is not None:
            null_ctx, null_pooled = text_condition(frozen, {}, hr.shape[0])
            uncond_fn = lambda z, t: teacher_fn(z, t, null_ctx, null_pooled)  # noqa: E731
        loss, metrics = isc.isc_loss(u_fn, teacher_fn, hr, rng_loss, p_boundary=isc_config.p_boundary,
                                     per_sample=isc_config.per_sample, uncond_fn=uncond_fn,
                                     boundary_cfg=isc_config.get("boundary_cfg"), **isc_times(isc_config))
        return loss, (metrics, model_state)

    return loss_fn


STAGES = {"teacher": teacher_stage, "student": student_stage}


def build_stage(config: ml_collections.ConfigDict) -> Stage:
    if config.stage == "gan":
        from smfsr_jax.training import gan  # stage 2 builds on this module
        return gan.gan_stage(config)
    if config.stage not in STAGES:
        raise ValueError(f"unknown stage {config.stage!r}; expected one of {sorted(STAGES) + ['gan']}")
    return STAGES[config.stage](config)


def bundle_meta(stage: Stage, config: ml_collections.ConfigDict, step: int) -> dict:
    """What a model bundle records of its run; `tile_size` is the latent side of the training crops, the tile
    SR uses by default."""
    return {"stage": stage.name, "step": step, "variant": config.variant,
            "tile_size": config.data.degradation.crop_size // stage.autoencoder_config.downscale}


def describe(stage: Stage) -> dict:
    return {"stage": stage.name, "trainable": partition.count(stage.trainable),
            **{f"frozen_{k}": partition.count(v) for k, v in stage.frozen.items() if k != "null"}}


def workdir_paths(workdir: str) -> dict:
    return {"checkpoints": os.path.join(workdir, "checkpoints"), "bundle": os.path.join(workdir, "bundle"),
            "config": os.path.join(workdir, "config.json"), "metrics": os.path.join(workdir, "metrics.jsonl")}


# ---------------------------------------------------------------------------------------------
# Image summaries.

def make_preview_fn(stage: Stage, teacher_steps: int = 8, count: int = 4):
    """jitted (trainable, frozen, batch, rng) -> (count, S, 3S, 3) uint8 rows of [LR x4 | SR | HR].

    The student samples in one step (x = eps - u(eps, 0, 1)); a teacher with `teacher_steps` Euler steps on
    the SD3 grid, without CFG.
    """
    from smfsr_jax.sampling import samplers, schedules
    model = mmdit.MMDiT(stage.model_config)
    autoencoder = vae.make_autoencoder(stage.autoencoder_config)

    def preview(trainable, frozen, batch, rng):
        batch = {k: v[:count] for k, v in batch.items()}
        rng_latents, rng_noise = jax.random.split(rng)
        lr = encode_images(stage.autoencoder_config, frozen["autoencoder"], batch["lr_up"], rng_latents)
        context, pooled = text_condition(frozen, batch, lr.shape[0])
        apply = lambda z, **kw: model.apply({"params": stage.model_params(trainable, frozen)}, z, **kw)  # noqa: E731
        noise = jax.random.normal(rng_noise, lr.shape)
        cond = {samplers.CONTEXT: context, samplers.POOLED: pooled}
        if stage.model_config.time_conditioning == "interval":
            z = samplers.one_step(samplers.student_velocity(apply), noise, lr, cond)
        else:
            z = samplers.euler_sample(samplers.teacher_velocity(apply), noise, lr, cond,
                                      schedules.sd3_sampling_sigmas(teacher_steps))
        x = autoencoder.apply({"params": frozen["autoencoder"]}, vae.denormalize_latents(z, stage.autoencoder_config),
                              method="decode")
        sr = jnp.round(jnp.clip(x / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)
        return jnp.concatenate([batch["lr_up"], sr, batch["hr"]], axis=2)

    return jax.jit(preview)

"""Stage `student_isc` (stage 1): the SMFSR student trained by Interval Splitting Consistency plus the boundary
loss against its frozen teacher (`isc.isc_loss`, config.isc).

The student starts as its teacher. Its time embedding is e(r, t) = interval_embedder([E(r, p) ; E(t, p)]) with E
the teacher's timestep + pooled-text embedder (copied). Every other tensor is the teacher's, so the student equals
the teacher exactly when e(t, t) = E(t, p), i.e. when the new two-layer interval MLP (Linear, SiLU, Linear) is
the identity on the embeddings the teacher produces. `init.interval`:

- "fit" (default): the student keeps the teacher's time scale (x1000), and the MLP is built in closed form
  to be that identity: hidden unit i reads coordinate i of E(t, p) (the t half; the r half starts at zero
  weight and is learnt), scaled so that over the observed range of that coordinate the pre-activation stays
  within +-0.2 of SiLU's inflection point x* (x tanh(x/2) = 2), where SiLU is linear up to a cubic term;
  the second layer undoes the affine map. On the tiny config e(t, t) matches E to 3e-4 of its largest
  entry. (A regression from random weights reached only 3-5% in 5000 Adam steps: the embeddings vary by a
  few percent around a large mean, which a generic fit does not resolve.)
- "torch_default": PyTorch's default Linear init U(+-1/sqrt(fan_in)) and raw times (time_scale 1), as the
  released SMFSR module code implies. The student then starts far from the teacher: its copied embedder
  was trained for x1000 times.
Released SMFSR students (time_scale 1) are loaded as they are and never pass through here.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from smfsr_jax.models import mmdit, vae
from smfsr_jax.objectives import isc
from smfsr_jax.training import partition
from smfsr_jax.training.stages import batch as batch_lib
from smfsr_jax.training.stages import loading
from smfsr_jax.training.stages import stage as stage_lib

NAME = "student_isc"
INTERVAL_INITS = ("fit", "torch_default")
SILU_INFLECTION = 2.399357280515486  # root of x tanh(x / 2) = 2, where silu'' = 0
FIT_AMPLITUDE = 0.2  # half-width of the pre-activations around the inflection point
FIT_POINTS = 4096
RANGE_MARGIN = 1.25  # widen the observed range so that unseen pooled vectors stay in the linear part


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def teacher_time_embeddings(teacher_config: mmdit.MMDiTConfig, time_params: dict, pooled: np.ndarray,
                            points: int = FIT_POINTS) -> np.ndarray:
    """(points, hidden) fp32 E(time_scale * t, p) for t on a uniform grid of [0, 1], pooled rows cycled."""
    pooled = np.asarray(pooled, np.float32).reshape(-1, teacher_config.pooled_projection_dim)
    t = np.linspace(0.0, 1.0, points, dtype=np.float32)
    rows = pooled[np.arange(points) % len(pooled)]
    embed = mmdit.TimestepTextEmbedding(teacher_config.hidden_size, jnp.float32)
    return np.asarray(embed.apply({"params": time_params}, jnp.asarray(t * teacher_config.time_scale),
                                  jnp.asarray(rows)), np.float64)


def fit_interval_embedder(embeddings: np.ndarray) -> dict:
    """interval_embedder params with MLP([e ; e]) = e on the rows of `embeddings` (module docstring)."""
    d = embeddings.shape[1]
    hi, lo = embeddings.max(0), embeddings.min(0)
    centre = (hi + lo) / 2
    half = np.maximum(RANGE_MARGIN * (hi - lo) / 2, 1e-6)
    scale = FIT_AMPLITUDE / half
    slope = _sigmoid(SILU_INFLECTION) * (1 + SILU_INFLECTION * (1 - _sigmoid(SILU_INFLECTION)))
    value = SILU_INFLECTION * _sigmoid(SILU_INFLECTION)
    kernel_1 = np.zeros((2 * d, d))
    kernel_1[d:] = np.diag(scale)  # rows d.. read E(t); the E(r) rows start at zero
    return {"linear_1": {"kernel": kernel_1.astype(np.float32),
                         "bias": (SILU_INFLECTION - scale * centre).astype(np.float32)},
            "linear_2": {"kernel": np.diag(1 / (scale * slope)).astype(np.float32),
                         "bias": (centre - value / (scale * slope)).astype(np.float32)}}


def torch_default_interval_embedder(d: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def linear(fan_in, fan_out):
        bound = 1.0 / np.sqrt(fan_in)
        return {"kernel": rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32),
                "bias": rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)}

    return {"linear_1": linear(2 * d, d), "linear_2": linear(d, d)}


def student_from_teacher(teacher_config: mmdit.MMDiTConfig, teacher_params: dict, *, interval_init: str = "fit",
                         pooled: np.ndarray | None = None, seed: int = 0):
    """(student config, params): every teacher tensor, the time embedder moved under
    `time_text_embed_interval`, and a new `interval_embedder` (module docstring).

    `pooled`: the pooled text embeddings the student will see (the NULL row, caption rows), rows of
    (pooled_projection_dim,); the fit covers their range. Required for "fit".
    """
    if teacher_config.time_conditioning != "single":
        raise ValueError("the teacher must use single time conditioning")
    if interval_init not in INTERVAL_INITS:
        raise ValueError(f"init.interval must be one of {INTERVAL_INITS}, got {interval_init!r}")
    time_params = teacher_params["time_text_embed"]
    if interval_init == "fit":
        if pooled is None:
            raise ValueError("interval_init='fit' needs the pooled text embeddings the student will see")
        config = teacher_config.replace(time_conditioning="interval")
        interval = fit_interval_embedder(teacher_time_embeddings(teacher_config, time_params, pooled))
    else:
        config = teacher_config.replace(time_conditioning="interval", time_scale=1.0)
        interval = torch_default_interval_embedder(teacher_config.hidden_size, seed)
    params = {k: v for k, v in teacher_params.items() if k != "time_text_embed"}
    params["time_text_embed_interval"] = {"time_text_embed": time_params, "interval_embedder": interval}
    return config, params


# ---------------------------------------------------------------------------------------------
# The stage.

def _student(config, teacher_config, teacher_params, null, abstract: bool, fit: bool):
    """(student config, params) started from the teacher; `fit=False` skips the interval fit (its weights are
    replaced by a checkpoint's), keeping the config it implies."""
    if abstract:
        student_config = teacher_config.replace(
            time_conditioning="interval", **({} if config.init.interval == "fit" else {"time_scale": 1.0}))
        return stage_lib.runtime_config(student_config, config.model), mmdit.abstract_params(student_config)
    pooled = loading.fit_pooled(config, null) if fit else np.asarray(null["pooled_prompt_embeds"], np.float32)[None]
    student_config, params = student_from_teacher(teacher_config, teacher_params, interval_init=config.init.interval,
                                                  pooled=pooled, seed=config.seed)
    return stage_lib.runtime_config(student_config, config.model), params


def _parts(config, abstract: bool, fit: bool):
    ae_config, ae_params = loading.load_autoencoder(config.autoencoder, abstract)
    teacher_config, teacher_params = loading.load_teacher(config, abstract)
    null = loading.null_embeddings(config.text, teacher_config, config.data, abstract)
    if fit and not abstract:
        loading.check_null_embeddings(config, config.init.teacher, null)
    student_config, student_params = _student(config, teacher_config, teacher_params, null, abstract, fit)
    teacher_own, base = partition.partition(teacher_params, stage_lib.TEACHER_OWN)
    trainable, student_frozen = stage_lib.split(student_params, config, student_config)
    student_own, _ = partition.partition(student_frozen, tuple(config.trainable))  # the rest is `base`
    net = stage_lib.Network(student_config, ae_config, trainable, {
        "base": stage_lib.frozen_cast(base, config), "own": stage_lib.frozen_cast(student_own, config),
        "autoencoder": ae_params, "null": null})
    return net, teacher_config, teacher_own


def network(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Network:
    return _parts(config, abstract, fit=False)[0]


def build(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Stage:
    net, teacher_config, teacher_own = _parts(config, abstract, fit=True)
    frozen = dict(net.frozen, teacher=stage_lib.frozen_cast(teacher_own, config))
    logging.info("student: %d trainable, %d frozen-own, %d shared base, %d teacher-own parameters",
                 partition.count(net.trainable), partition.count(frozen["own"]), partition.count(frozen["base"]),
                 partition.count(teacher_own))
    return stage_lib.Stage(NAME, net.model_config, net.trainable, frozen,
                           make_loss(config, net.model_config, teacher_config, net.autoencoder_config),
                           net.autoencoder_config, teacher_config)


def make_loss(config, student_config: mmdit.MMDiTConfig, teacher_config: mmdit.MMDiTConfig,
              ae_config: vae.VAEConfig):
    """The loss_fn (state.LossFn): ISC + boundary against the frozen teacher."""
    student, teacher = mmdit.MMDiT(student_config), mmdit.MMDiT(teacher_config)
    isc_config = config.isc
    isc.check_options(**batch_lib.isc_options(isc_config))

    def loss_fn(trainable_params, model_state, frozen, batch, rng):
        rng_latents, rng_loss = jax.random.split(rng)
        hr, lr = batch_lib.batch_latents(ae_config, frozen, batch, rng_latents)
        context, pooled = batch_lib.text_condition(frozen, batch, hr.shape[0])
        student_params = partition.merge(trainable_params, frozen["base"], frozen["own"])
        teacher_params = jax.lax.stop_gradient(partition.merge(frozen["base"], frozen["teacher"]))

        u_fn = mmdit.average_velocity(student, student_params, context=context, pooled=pooled, lr_latents=lr)
        teacher_fn = mmdit.velocity(teacher, teacher_params, context=context, pooled=pooled, lr_latents=lr)
        uncond_fn = None
        if isc_config.get("boundary_cfg") is not None:
            null_ctx, null_pooled = batch_lib.text_condition(frozen, {}, hr.shape[0])
            uncond_fn = mmdit.velocity(teacher, teacher_params, context=null_ctx, pooled=null_pooled, lr_latents=lr)
        loss, metrics = isc.isc_loss(u_fn, teacher_fn, hr, rng_loss, p_boundary=isc_config.p_boundary,
                                     per_sample=isc_config.per_sample, uncond_fn=uncond_fn,
                                     boundary_cfg=isc_config.get("boundary_cfg"), **batch_lib.isc_options(isc_config))
        return loss, (metrics, model_state)

    return loss_fn

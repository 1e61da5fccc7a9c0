"""Stage-1 initialisation: an SMFSR student that, before its first step, is its teacher.

The student's time embedding is e(r, t) = interval_embedder([E(r, p) ; E(t, p)]) with E the teacher's
timestep + pooled-text embedder (copied). Every other tensor is the teacher's, so the student equals the
teacher exactly when e(t, t) = E(t, p), i.e. when the new two-layer interval MLP (Linear, SiLU, Linear) is
the identity on the embeddings the teacher produces. `interval_init`:

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

import jax.numpy as jnp
import numpy as np

from smfsr_jax.models import mmdit

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

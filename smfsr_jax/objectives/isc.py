"""Stage 1: Interval Splitting Consistency with the boundary loss (SMFSR Algorithm 1, Eq. 9-13).

Normalised form (Eq. 11): with s = (1 - lam) t + lam r,
    L_split    = || u(z_t, r, t) - sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] ||^2,
    z_s        = z_t - (t - s) u(z_t, s, t);
    L_boundary = || u(z_t, t, t) - sg[v_teacher(z_t, t)] ||^2   (Eq. 12-13, no CFG by default).
One branch per step: q ~ U(0, 1) from a key every device shares; boundary when q < p_boundary (0.6, the
paper's text). `per_sample=True` computes both targets and mixes per sample.

Times. The paper does not publish its (r, t) sampler. Sorting two draws of a base sampler (uniform, or
logit-normal sigmoid(N(time_mean, 1))) almost never yields the interval the one-step sampler uses,
(r, t) = (0, 1), so with probability `anchor_prob` a split draw is anchored: (r, t) = (0, 1) ("interval"),
r = 0 with t kept ("start"), or one of the 1- and 2-step cosine-grid intervals (0, 1), (0, 0.5), (0.5, 1)
("grid", the public SplitMeanFlow code's fixed intervals). The boundary branch takes t as the larger of the
pair ("max", Algorithm 1 literally) or as its own draw ("independent").

Weighting. `adaptive_p` > 0 divides each sample's squared error by sg[(error + 0.01)^p] (MeanFlow's adaptive
loss weighting; p = 0 is the plain mean). The defaults are the ones measured best on the known-answer toys
(docs/experiments.md).
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from smfsr_jax.core import flow
from smfsr_jax.objectives.flow_matching import batch_broadcast, interpolate

# u(z, r, t) of the student (differentiable), and v(z, t) of the teacher; conditioning closed over.
AverageVelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

TIME_SAMPLERS = ("logit_normal", "uniform")
ANCHORS = ("interval", "start", "grid")
BOUNDARY_TIMES = ("max", "independent")
# The (r, t) intervals of the 1- and 2-step cosine grids (schedules.cosine_grid), drawn equally by "grid".
GRID_INTERVALS = ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0))
ADAPTIVE_EPS = 0.01
DEFAULT_OPTIONS = dict(time_sampler="uniform", time_mean=0.0, anchor_prob=0.25, anchor="interval",
                       boundary_time="independent", adaptive_p=0.0)


def check_options(time_sampler: str, time_mean: float, anchor_prob: float, anchor: str, boundary_time: str,
                  adaptive_p: float):
    """ValueError naming the bad ISC option."""
    for name, value, allowed in (("time_sampler", time_sampler, TIME_SAMPLERS), ("anchor", anchor, ANCHORS),
                                 ("boundary_time", boundary_time, BOUNDARY_TIMES)):
        if value not in allowed:
            raise ValueError(f"isc.{name} must be one of {allowed}, got {value!r}")
    if not 0.0 <= anchor_prob <= 1.0:
        raise ValueError(f"isc.anchor_prob must be in [0, 1], got {anchor_prob}")
    if time_mean != 0.0 and time_sampler != "logit_normal":
        raise ValueError(f"isc.time_mean={time_mean} needs isc.time_sampler='logit_normal', got {time_sampler!r}")
    if adaptive_p < 0.0:
        raise ValueError(f"isc.adaptive_p must be >= 0, got {adaptive_p}")


def draw_times(rng, shape, sampler: str, mean: float = 0.0):
    """Flow times in (0, 1): sigmoid(N(mean, 1)) ("logit_normal") or U(0, 1) ("uniform")."""
    if sampler == "logit_normal":
        return jax.nn.sigmoid(mean + jax.random.normal(rng, shape))
    return jax.random.uniform(rng, shape)


def sample_isc_times(rng, batch: int, *, time_sampler: str = DEFAULT_OPTIONS["time_sampler"],
                     time_mean: float = DEFAULT_OPTIONS["time_mean"],
                     anchor_prob: float = DEFAULT_OPTIONS["anchor_prob"], anchor: str = DEFAULT_OPTIONS["anchor"]):
    """(r, t, lam, s) of the split branch: r <= t sorted from two base draws, anchored with `anchor_prob`;
    lam ~ U(0, 1); s = (1 - lam) t + lam r."""
    rng_pair, rng_lam, rng_anchor = jax.random.split(rng, 3)
    both = draw_times(rng_pair, (2, batch), time_sampler, time_mean)
    r, t = both.min(0), both.max(0)
    anchored = jax.random.uniform(rng_anchor, (batch,)) < anchor_prob
    if anchor == "grid":
        pick = jax.random.randint(jax.random.fold_in(rng_anchor, 1), (batch,), 0, len(GRID_INTERVALS))
        grid_r, grid_t = (jnp.asarray(v, jnp.float32)[pick] for v in zip(*GRID_INTERVALS))
        r, t = jnp.where(anchored, grid_r, r), jnp.where(anchored, grid_t, t)
    else:
        r = jnp.where(anchored, 0.0, r)
        if anchor == "interval":
            t = jnp.where(anchored, 1.0, t)
    lam = jax.random.uniform(rng_lam, (batch,))
    return r, t, lam, (1 - lam) * t + lam * r


def sample_boundary_times(rng, batch: int, *, time_sampler: str = DEFAULT_OPTIONS["time_sampler"],
                          time_mean: float = DEFAULT_OPTIONS["time_mean"],
                          boundary_time: str = DEFAULT_OPTIONS["boundary_time"]):
    """t of the boundary branch: the larger of two base draws ("max") or one draw ("independent")."""
    if boundary_time == "max":
        return draw_times(rng, (2, batch), time_sampler, time_mean).max(0)
    return draw_times(rng, (batch,), time_sampler, time_mean)


def weighted_mean(error, adaptive_p: float):
    """Mean squared error; with p > 0 each sample's mean is divided by sg[(mean + ADAPTIVE_EPS)^p]."""
    if adaptive_p == 0.0:
        return jnp.mean(jnp.square(error))
    per_sample = jnp.mean(jnp.square(error), axis=tuple(range(1, error.ndim)))
    weight = jax.lax.stop_gradient(1.0 / (per_sample + ADAPTIVE_EPS) ** adaptive_p)
    return jnp.mean(weight * per_sample)


def split_target(u_fn: AverageVelocityFn, z_t, r, s, t, lam):
    """sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] with z_s from one backward Euler step (Eq. 10)."""
    u_st = u_fn(z_t, s, t)
    z_s = z_t - batch_broadcast(t - s, z_t) * u_st
    u_rs = u_fn(z_s, r, s)
    return jax.lax.stop_gradient(batch_broadcast(1 - lam, z_t) * u_rs + batch_broadcast(lam, z_t) * u_st)


def boundary_target(teacher_fn: VelocityFn, z_t, t, *, uncond_fn: Optional[VelocityFn] = None,
                    cfg_scale: Optional[float] = None):
    """sg[v_teacher(z_t, t)], optionally with CFG v_u + w (v_c - v_u) against `uncond_fn` (Eq. 13)."""
    v = teacher_fn(z_t, t)
    if cfg_scale is not None:
        v = flow.cfg_mix(uncond_fn(z_t, t), v, cfg_scale)
    return jax.lax.stop_gradient(v)


def isc_loss(u_fn: AverageVelocityFn, teacher_fn: VelocityFn, x0, rng, *, p_boundary: float = 0.6,
             per_sample: bool = False, uncond_fn: Optional[VelocityFn] = None,
             boundary_cfg: Optional[float] = None, time_sampler: str = DEFAULT_OPTIONS["time_sampler"],
             time_mean: float = DEFAULT_OPTIONS["time_mean"], anchor_prob: float = DEFAULT_OPTIONS["anchor_prob"],
             anchor: str = DEFAULT_OPTIONS["anchor"], boundary_time: str = DEFAULT_OPTIONS["boundary_time"],
             adaptive_p: float = DEFAULT_OPTIONS["adaptive_p"]):
    """(loss, metrics) of Algorithm 1 on clean latents x0 (B, ...).

    `rng` must be identical on every device (it decides the branch); per-sample draws come from it too,
    and sharded arrays keep them consistent under `jax_threefry_partitionable`.
    """
    check_options(time_sampler, time_mean, anchor_prob, anchor, boundary_time, adaptive_p)
    rng_times, rng_noise, rng_branch, rng_boundary = jax.random.split(rng, 4)
    batch = x0.shape[0]
    r, t, lam, s = sample_isc_times(rng_times, batch, time_sampler=time_sampler, time_mean=time_mean,
                                    anchor_prob=anchor_prob, anchor=anchor)
    t_boundary = sample_boundary_times(rng_boundary, batch, time_sampler=time_sampler, time_mean=time_mean,
                                       boundary_time=boundary_time)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)

    def boundary():
        z_t = interpolate(x0, noise, t_boundary)
        target = boundary_target(teacher_fn, z_t, t_boundary, uncond_fn=uncond_fn, cfg_scale=boundary_cfg)
        return u_fn(z_t, t_boundary, t_boundary), target

    def split():
        z_t = interpolate(x0, noise, t)
        return u_fn(z_t, r, t), split_target(u_fn, z_t, r, s, t, lam)

    if per_sample:
        use_boundary = jax.random.uniform(rng_branch, (batch,)) < p_boundary
        u_b, target_b = boundary()
        u_s, target_s = split()
        pick = lambda a, b: jnp.where(batch_broadcast(use_boundary, a), a, b)  # noqa: E731
        u, target = pick(u_b, u_s), pick(target_b, target_s)
        boundary_fraction = use_boundary.mean()
    else:
        use_boundary = jax.random.uniform(rng_branch) < p_boundary
        u, target = jax.lax.cond(use_boundary, boundary, split)
        boundary_fraction = use_boundary.astype(jnp.float32)
    loss = weighted_mean(u - target, adaptive_p)
    return loss, {"loss": loss, "isc_loss": loss, "boundary_fraction": boundary_fraction,
                  "interval_mean": (t - r).mean()}

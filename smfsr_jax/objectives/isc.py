"""Stage 1: Interval Splitting Consistency with the boundary loss (SMFSR Algorithm 1, Eq. 9-13).

Normalised form (Eq. 11): with s = (1 - lam) t + lam r,
    L_split    = || u(z_t, r, t) - sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] ||^2,
    z_s        = z_t - (t - s) u(z_t, s, t);
    L_boundary = || u(z_t, t, t) - sg[v_teacher(z_t, t)] ||^2   (Eq. 12-13, no CFG by default).
One branch per step: q ~ U(0, 1) from a key every device shares; boundary when q < p_boundary (0.6, the
paper's text). `per_sample=True` computes both targets and mixes per sample.

Times. The paper does not publish its (r, t) sampler. Sorting two draws of a base sampler almost never
yields the interval the one-step sampler uses, (r, t) = (0, 1), so with probability `anchor_prob` a split
draw is anchored: (r, t) = (0, 1) ("interval") or r = 0 with t kept ("start"). The boundary branch takes t
as the larger of the pair ("max", Algorithm 1 literally) or as its own draw ("independent"). The defaults
are the ones measured best on the known-answer toy (docs/experiments.md).
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
ANCHORS = ("interval", "start")
BOUNDARY_TIMES = ("max", "independent")
DEFAULT_TIMES = dict(time_sampler="uniform", anchor_prob=0.25, anchor="interval", boundary_time="independent")


def check_times(time_sampler: str, anchor_prob: float, anchor: str, boundary_time: str):
    """ValueError naming the bad ISC time option."""
    for name, value, allowed in (("time_sampler", time_sampler, TIME_SAMPLERS), ("anchor", anchor, ANCHORS),
                                 ("boundary_time", boundary_time, BOUNDARY_TIMES)):
        if value not in allowed:
            raise ValueError(f"isc.{name} must be one of {allowed}, got {value!r}")
    if not 0.0 <= anchor_prob <= 1.0:
        raise ValueError(f"isc.anchor_prob must be in [0, 1], got {anchor_prob}")


def draw_times(rng, shape, sampler: str):
    """Flow times in (0, 1): sigmoid(N(0, 1)) ("logit_normal") or U(0, 1) ("uniform")."""
    if sampler == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(rng, shape))
    return jax.random.uniform(rng, shape)


def sample_isc_times(rng, batch: int, *, time_sampler: str = DEFAULT_TIMES["time_sampler"],
                     anchor_prob: float = DEFAULT_TIMES["anchor_prob"], anchor: str = DEFAULT_TIMES["anchor"]):
    """(r, t, lam, s) of the split branch: r <= t sorted from two base draws, anchored with `anchor_prob`;
    lam ~ U(0, 1); s = (1 - lam) t + lam r."""
    rng_pair, rng_lam, rng_anchor = jax.random.split(rng, 3)
    both = draw_times(rng_pair, (2, batch), time_sampler)
    r, t = both.min(0), both.max(0)
    anchored = jax.random.uniform(rng_anchor, (batch,)) < anchor_prob
    r = jnp.where(anchored, 0.0, r)
    if anchor == "interval":
        t = jnp.where(anchored, 1.0, t)
    lam = jax.random.uniform(rng_lam, (batch,))
    return r, t, lam, (1 - lam) * t + lam * r


def sample_boundary_times(rng, batch: int, *, time_sampler: str = DEFAULT_TIMES["time_sampler"],
                          boundary_time: str = DEFAULT_TIMES["boundary_time"]):
    """t of the boundary branch: the larger of two base draws ("max") or one draw ("independent")."""
    if boundary_time == "max":
        return draw_times(rng, (2, batch), time_sampler).max(0)
    return draw_times(rng, (batch,), time_sampler)


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
             boundary_cfg: Optional[float] = None, time_sampler: str = DEFAULT_TIMES["time_sampler"],
             anchor_prob: float = DEFAULT_TIMES["anchor_prob"], anchor: str = DEFAULT_TIMES["anchor"],
             boundary_time: str = DEFAULT_TIMES["boundary_time"]):
    """(loss, metrics) of Algorithm 1 on clean latents x0 (B, ...).

    `rng` must be identical on every device (it decides the branch); per-sample draws come from it too,
    and sharded arrays keep them consistent under `jax_threefry_partitionable`.
    """
    check_times(time_sampler, anchor_prob, anchor, boundary_time)
    rng_times, rng_noise, rng_branch, rng_boundary = jax.random.split(rng, 4)
    batch = x0.shape[0]
    r, t, lam, s = sample_isc_times(rng_times, batch, time_sampler=time_sampler, anchor_prob=anchor_prob,
                                    anchor=anchor)
    t_boundary = sample_boundary_times(rng_boundary, batch, time_sampler=time_sampler, boundary_time=boundary_time)
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
    loss = jnp.mean(jnp.square(u - target))
    return loss, {"loss": loss, "isc_loss": loss, "boundary_fraction": boundary_fraction,
                  "interval_mean": (t - r).mean()}

"""Stage 1: Interval Splitting Consistency with the boundary loss (SMFSR Algorithm 1, Eq. 9-13).

Normalised form (Eq. 11): with s = (1 - lam) t + lam r,
    L_split    = || u(z_t, r, t) - sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] ||^2,
    z_s        = z_t - (t - s) u(z_t, s, t);
    L_boundary = || u(z_t, t, t) - sg[v_teacher(z_t, t)] ||^2   (Eq. 12-13, no CFG by default).
One branch per step (training.md §0): q ~ U(0, 1) from a key every device shares; boundary when
q < p_boundary (0.6, the paper's text). `per_sample=True` computes both targets and mixes per sample.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from smfsr_jax.objectives.flow_matching import interpolate

# u(z, r, t) of the student (differentiable), and v(z, t) of the teacher; conditioning closed over.
AverageVelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def sample_isc_times(rng, batch: int):
    """r <= t from sorted sigmoid(N(0, 1)) draws; lam ~ U(0, 1); s = (1 - lam) t + lam r."""
    rng_n, rng_lam = jax.random.split(rng)
    both = jax.nn.sigmoid(jax.random.normal(rng_n, (2, batch)))
    r, t = both.min(0), both.max(0)
    lam = jax.random.uniform(rng_lam, (batch,))
    return r, t, lam, (1 - lam) * t + lam * r


def _bcast(x, like):
    return x.reshape(-1, *([1] * (like.ndim - 1)))


def split_target(u_fn: AverageVelocityFn, z_t, r, s, t, lam):
    """sg[(1 - lam) u(z_s, r, s) + lam u(z_t, s, t)] with z_s from one backward Euler step (Eq. 10)."""
    u_st = u_fn(z_t, s, t)
    z_s = z_t - _bcast(t - s, z_t) * u_st
    u_rs = u_fn(z_s, r, s)
    return jax.lax.stop_gradient(_bcast(1 - lam, z_t) * u_rs + _bcast(lam, z_t) * u_st)


def boundary_target(teacher_fn: VelocityFn, z_t, t, *, uncond_fn: Optional[VelocityFn] = None,
                    cfg_scale: Optional[float] = None):
    """sg[v_teacher(z_t, t)], optionally with CFG v_u + w (v_c - v_u) against `uncond_fn` (Eq. 13)."""
    v = teacher_fn(z_t, t)
    if cfg_scale is not None:
        v_u = uncond_fn(z_t, t)
        v = v_u + cfg_scale * (v - v_u)
    return jax.lax.stop_gradient(v)


def isc_loss(u_fn: AverageVelocityFn, teacher_fn: VelocityFn, x0, rng, *, p_boundary: float = 0.6,
             per_sample: bool = False, uncond_fn: Optional[VelocityFn] = None,
             boundary_cfg: Optional[float] = None):
    """(loss, metrics) of Algorithm 1 on clean latents x0 (B, H, W, C).

    `rng` must be identical on every device (it decides the branch); per-sample draws come from it too,
    and sharded arrays keep them consistent under `jax_threefry_partitionable`.
    """
    rng_times, rng_noise, rng_branch = jax.random.split(rng, 3)
    r, t, lam, s = sample_isc_times(rng_times, x0.shape[0])
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    z_t = interpolate(x0, noise, t)

    def boundary():
        target = boundary_target(teacher_fn, z_t, t, uncond_fn=uncond_fn, cfg_scale=boundary_cfg)
        return u_fn(z_t, t, t), target

    def split():
        return u_fn(z_t, r, t), split_target(u_fn, z_t, r, s, t, lam)

    if per_sample:
        use_boundary = jax.random.uniform(rng_branch, (x0.shape[0],)) < p_boundary
        u_b, target_b = boundary()
        u_s, target_s = split()
        pick = lambda a, b: jnp.where(_bcast(use_boundary, a), a, b)  # noqa: E731
        u, target = pick(u_b, u_s), pick(target_b, target_s)
        boundary_fraction = use_boundary.mean()
    else:
        use_boundary = jax.random.uniform(rng_branch) < p_boundary
        u, target = jax.lax.cond(use_boundary, boundary, split)
        boundary_fraction = use_boundary.astype(jnp.float32)
    loss = jnp.mean(jnp.square(u - target))
    return loss, {"loss": loss, "isc_loss": loss, "boundary_fraction": boundary_fraction,
                  "interval_mean": (t - r).mean()}

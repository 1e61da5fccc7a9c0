"""Pure samplers over a velocity function (docs/design.md#sampling). Jittable; no host sync inside.

A velocity function is `velocity_fn(z, lr_latents, cond, t, r) -> u`, with z and lr_latents (B, h, w, C)
normalised latents, `cond` a dict of per-image conditioning arrays with leading axis B, and t, r scalar flow
times (t = current, r = next). `student_velocity` and `teacher_velocity` build one from an MM-DiT apply function
`apply_fn(latents, *, context, pooled, t, r, lr_latents)`, e.g. `functools.partial(MMDiT(cfg).apply,
{'params': params})`; `tiling.tiled_velocity` wraps any of them.

`euler_sample` runs z ← z + (r − t)·u(z, r, t) over a descending grid. With the student's cosine grid that is
SMFSR's N-step sampler (u is the average velocity over [r, t]); with the SD3 sigmas and a teacher it is diffusers'
flow-match Euler step x ← x + (σ_next − σ)·v.
"""

import jax
import jax.numpy as jnp

from smfsr_jax.core import flow

# cond keys: the conditional text, and for CFG the unconditional (negative prompt or NULL) text.
CONTEXT, POOLED = "context", "pooled"
NEGATIVE_CONTEXT, NEGATIVE_POOLED = "negative_context", "negative_pooled"


def _batch_times(value, batch: int):
    return jnp.full((batch,), value, jnp.float32)


def student_velocity(apply_fn):
    """u(z, r, t) of an interval-time (SMFSR student) MM-DiT; times raw in [0, 1]."""
    def velocity(z, lr_latents, cond, t, r):
        b = z.shape[0]
        return apply_fn(z, context=cond[CONTEXT], pooled=cond[POOLED], t=_batch_times(t, b),
                        r=_batch_times(r, b), lr_latents=lr_latents)
    return velocity


def teacher_velocity(apply_fn, guidance_scale: float = 1.0):
    """v(z, t) of a single-time (teacher) MM-DiT with classifier-free guidance v_u + w·(v_c − v_u).

    Both branches run as one 2B batch [unconditional; conditional], the unconditional text being
    cond['negative_context'/'negative_pooled'] (the negative prompt, or NULL). As in diffusers, guidance
    applies only when w > 1; r is ignored.
    """
    def velocity(z, lr_latents, cond, t, r):
        del r
        b = z.shape[0]
        if guidance_scale <= 1.0:
            return apply_fn(z, context=cond[CONTEXT], pooled=cond[POOLED], t=_batch_times(t, b),
                            lr_latents=lr_latents)
        v = apply_fn(jnp.concatenate([z, z]),
                     context=jnp.concatenate([cond[NEGATIVE_CONTEXT], cond[CONTEXT]]),
                     pooled=jnp.concatenate([cond[NEGATIVE_POOLED], cond[POOLED]]),
                     t=_batch_times(t, 2 * b), lr_latents=jnp.concatenate([lr_latents, lr_latents]))
        return flow.cfg_mix(v[:b], v[b:], guidance_scale)
    return velocity


def euler_sample(velocity_fn, noise, lr_latents, cond, times):
    """z_{k+1} = z_k + (times[k+1] − times[k])·velocity_fn(z_k, lr_latents, cond, times[k], times[k+1])."""
    times = jnp.asarray(times, jnp.float32)

    def step(k, z):
        t, r = times[k], times[k + 1]
        return z + (r - t) * velocity_fn(z, lr_latents, cond, t, r)

    return jax.lax.fori_loop(0, times.shape[0] - 1, step, noise)


def one_step(velocity_fn, noise, lr_latents, cond):
    """SMFSR's default sampler: x̂ = ε − u(ε, r = 0, t = 1)."""
    return flow.one_step(lambda z, r, t: velocity_fn(z, lr_latents, cond, t, r), noise)

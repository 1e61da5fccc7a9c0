"""Stage 0: LR-conditioned flow matching of the teacher.

Path z_sigma = (1 - sigma) x0 + sigma eps; the network predicts v = eps - x0. Two settings:
- DiT4SR's, for fine-tuning SD3.5 (whose base already knows the low-noise velocity): sigma from SD3.5's
  shift-3 training grid at index floor(1000 sigmoid(n)), n ~ N(0, 1) (`sigma_sampler="sd3"`), and the
  x0-space MSE mean((x0_hat - x0)^2) = mean(sigma^2 (v_hat - v)^2) (`loss="x0"`);
- the paper's Eq. 3, for networks trained from scratch: sigma ~ U(0, 1) and the plain velocity MSE. The x0
  loss gives the low-noise end (sigma -> 0) almost no weight, so a network that starts from nothing
  never learns the last steps of sampling there.
`sigma_sampler="logit_normal"` is sigmoid(N(0, 1)) without shift or grid.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from smfsr_jax.core import schedules

# Velocity of the network: (z, t) -> v, with t the flow time in [0, 1]; conditioning is closed over.
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

LOSSES = ("x0", "velocity")
SIGMA_SAMPLERS = ("sd3", "uniform", "logit_normal")


def check_options(loss: str, sigma_sampler: str):
    if loss not in LOSSES:
        raise ValueError(f"flow_matching.loss must be one of {LOSSES}, got {loss!r}")
    if sigma_sampler not in SIGMA_SAMPLERS:
        raise ValueError(f"flow_matching.sigma_sampler must be one of {SIGMA_SAMPLERS}, got {sigma_sampler!r}")


def sample_logit_normal_sigmas(rng, batch: int, num_train_timesteps: int = 1000, shift: float = 3.0):
    """sigma = grid[min(floor(N sigmoid(n)), N - 1)], n ~ N(0, 1), one per sample."""
    grid = jnp.asarray(schedules.sd3_training_sigmas(num_train_timesteps, shift))
    u = jax.nn.sigmoid(jax.random.normal(rng, (batch,)))
    index = jnp.minimum(jnp.floor(num_train_timesteps * u).astype(jnp.int32), num_train_timesteps - 1)
    return grid[index]


def sample_sigmas(rng, batch: int, sigma_sampler: str = "sd3", *, num_train_timesteps: int = 1000,
                  shift: float = 3.0):
    """One sigma per sample from the named sampler (module docstring)."""
    if sigma_sampler == "sd3":
        return sample_logit_normal_sigmas(rng, batch, num_train_timesteps, shift)
    if sigma_sampler == "uniform":
        return jax.random.uniform(rng, (batch,))
    return jax.nn.sigmoid(jax.random.normal(rng, (batch,)))


def batch_broadcast(x, like):
    """(B,) values shaped to broadcast against a (B, ...) batch."""
    return x.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0, noise, t):
    """z_t = (1 - t) x0 + t noise with per-sample t."""
    t = batch_broadcast(t, x0)
    return (1 - t) * x0 + t * noise


def teacher_fm_loss(velocity_fn: VelocityFn, x0, rng, *, loss: str = "x0", sigma_sampler: str = "sd3",
                    num_train_timesteps: int = 1000, shift: float = 3.0):
    """(loss, metrics) of one flow-matching step on clean samples x0 (B, ...)."""
    check_options(loss, sigma_sampler)
    rng_sigma, rng_noise = jax.random.split(rng)
    sigma = sample_sigmas(rng_sigma, x0.shape[0], sigma_sampler, num_train_timesteps=num_train_timesteps,
                          shift=shift)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    z = interpolate(x0, noise, sigma)
    v = velocity_fn(z, sigma)
    if loss == "x0":
        x0_hat = z - batch_broadcast(sigma, x0) * v
        value = jnp.mean(jnp.square(x0_hat - x0))
    else:
        value = jnp.mean(jnp.square(v - (noise - x0)))
    return value, {"loss": value, "fm_loss": value, "sigma_mean": sigma.mean()}

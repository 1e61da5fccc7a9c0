"""Stage 0: LR-conditioned flow matching of the DiT4SR teacher (training.md §2).

Path z_sigma = (1 - sigma) x0 + sigma eps; the network predicts v = eps - x0. sigma comes from SD3.5's
shift-3 training grid at index floor(1000 sigmoid(n)), n ~ N(0, 1) (DiT4SR's logit-normal sampler), and
the loss is the x0-space MSE, mean((x0_hat - x0)^2) = mean(sigma^2 (v_hat - v)^2).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from smfsr_jax.sampling import schedules

# Velocity of the network: (z, t) -> v, with t the flow time in [0, 1]; conditioning is closed over.
VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def sample_logit_normal_sigmas(rng, batch: int, num_train_timesteps: int = 1000, shift: float = 3.0):
    """sigma = grid[min(floor(N sigmoid(n)), N - 1)], n ~ N(0, 1), one per sample."""
    grid = jnp.asarray(schedules.sd3_training_sigmas(num_train_timesteps, shift))
    u = jax.nn.sigmoid(jax.random.normal(rng, (batch,)))
    index = jnp.minimum(jnp.floor(num_train_timesteps * u).astype(jnp.int32), num_train_timesteps - 1)
    return grid[index]


def interpolate(x0, noise, t):
    """z_t = (1 - t) x0 + t noise with per-sample t."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def teacher_fm_loss(velocity_fn: VelocityFn, x0, rng, *, num_train_timesteps: int = 1000, shift: float = 3.0):
    """(loss, metrics) of one flow-matching step on clean latents x0 (B, H, W, C)."""
    rng_sigma, rng_noise = jax.random.split(rng)
    sigma = sample_logit_normal_sigmas(rng_sigma, x0.shape[0], num_train_timesteps, shift)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    z = interpolate(x0, noise, sigma)
    v = velocity_fn(z, sigma)
    x0_hat = z - sigma.reshape(-1, 1, 1, 1) * v
    loss = jnp.mean(jnp.square(x0_hat - x0))
    return loss, {"loss": loss, "fm_loss": loss, "sigma_mean": sigma.mean()}

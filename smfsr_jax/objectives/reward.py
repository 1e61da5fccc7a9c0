"""Stage 3: reward fine-tuning of the one-step student, as pure functions (docs/design.md#student_reward).

Two methods:
- DiffusionNFT ("nft"): rollouts of K seeds per LR image from the old policy θ_old, rewards turned into
  group-normalised advantages and an optimality weight r ∈ [0, 1], then a regression on the forward process:
      x_t = (1 − t) x0 + t ε,      u = u(x_t, 0, t)  (the average velocity from t down to 0),
      u⁺ = β u_θ + (1 − β) u_old,  u⁻ = (1 + β) u_old − β u_θ,   x̂± = x_t − t u±,
      w± = sg(max(mean |x̂± − x0|, 1e-5))  per sample,
      L = A_max · mean[(r mean (x̂⁺ − x0)² / w⁺ + (1 − r) mean (x̂⁻ − x0)² / w⁻) / β] + λ_KL mean (u_θ − u_ref)².
  With the average-velocity head x̂ at t = 1 is exactly the deployed one-step map ε − u(ε, 0, 1).
- direct ("direct"): the one-step map is differentiable end to end, so −Σ_k w_k R_k(D(ε − u_θ(ε, 0, 1))) has
  an exact gradient.
"""

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from smfsr_jax.objectives.flow_matching import batch_broadcast, interpolate

METHODS = ("nft", "direct")
ADVANTAGE_STD = ("group", "global")
WEIGHT_FLOOR = 1e-5  # DiffusionNFT's floor on the adaptive weights
STD_EPS = 1e-4  # added to the reward spread before dividing


def _per_sample_mean(x):
    return x.mean(axis=tuple(range(1, x.ndim)))


def group_advantages(rewards: Mapping[str, jax.Array], weights: Mapping[str, float], *, std: str = "group",
                     clip: float = 5.0):
    """(advantage (B, K), optimality weight r (B, K)) from per-reward scores (B, K): B LR images, K seeds each.

    Each reward is normalised on its own within the K seeds of its image (mean subtracted; divided by the
    spread of that group, or of the whole batch with `std="global"`), so that the reward with the largest
    spread does not dominate; then weighted, summed, clipped to ±clip and mapped to r = A / clip / 2 + 1/2.
    """
    if std not in ADVANTAGE_STD:
        raise ValueError(f"reward.advantage_std must be one of {ADVANTAGE_STD}, got {std!r}")
    total = 0.0
    for name, weight in weights.items():
        score = rewards[name].astype(jnp.float32)
        centred = score - score.mean(axis=1, keepdims=True)
        spread = centred.std(axis=1, keepdims=True) if std == "group" else centred.std()
        total = total + weight * centred / (spread + STD_EPS)
    advantage = jnp.clip(total, -clip, clip)
    return advantage, jnp.clip(advantage / clip / 2 + 0.5, 0.0, 1.0)


def nft_loss(u_theta, u_old, u_ref, x_t, x0, t, r, *, beta: float = 1.0, clip: float = 5.0, kl_weight: float = 0.0):
    """(loss, metrics) of DiffusionNFT through the average-velocity head (module docstring).

    `u_theta` carries the gradient; `u_old` (rollout policy) and `u_ref` (frozen reference) are held fixed.
    `t`, `r`: (N,). All other arrays (N, ...).
    """
    u_old, u_ref = jax.lax.stop_gradient(u_old), jax.lax.stop_gradient(u_ref)
    scale = batch_broadcast(t, x_t)
    x_pos = x_t - scale * (beta * u_theta + (1 - beta) * u_old)
    x_neg = x_t - scale * ((1 + beta) * u_old - beta * u_theta)

    def weighted_error(x_hat):
        weight = jax.lax.stop_gradient(jnp.maximum(_per_sample_mean(jnp.abs(x_hat - x0)), WEIGHT_FLOOR))
        return _per_sample_mean(jnp.square(x_hat - x0)) / weight

    positive, negative = weighted_error(x_pos), weighted_error(x_neg)
    policy = clip * jnp.mean((r * positive + (1 - r) * negative) / beta)
    kl = jnp.mean(jnp.square(u_theta - u_ref))
    loss = policy + kl_weight * kl
    return loss, {"nft_policy_loss": policy, "kl": kl, "nft_positive": positive.mean(),
                  "nft_negative": negative.mean()}


def sample_nft_times(rng, n: int, p_one: float):
    """t ∈ (0, 1], one per sample: t = 1 (the deployed one-step map) with probability `p_one`, else U(0, 1]."""
    rng_t, rng_one = jax.random.split(rng)
    t = 1.0 - jax.random.uniform(rng_t, (n,))  # (0, 1]
    return jnp.where(jax.random.uniform(rng_one, (n,)) < p_one, 1.0, t)


def nft_regression(u_fn: Callable, u_old_fn: Callable, u_ref_fn: Callable, x0, r, rng, *, p_one: float,
                   beta: float, clip: float, kl_weight: float):
    """`nft_loss` on clean rollout latents x0 (N, ...) with fresh (t, ε); `u_*_fn(z, r, t)` are average
    velocities (the student, the old policy and the reference, the last two without gradient)."""
    rng_t, rng_noise = jax.random.split(rng)
    n = x0.shape[0]
    t = sample_nft_times(rng_t, n, p_one)
    x_t = interpolate(x0, jax.random.normal(rng_noise, x0.shape, x0.dtype), t)
    zero = jnp.zeros((n,), jnp.float32)
    loss, metrics = nft_loss(u_fn(x_t, zero, t), u_old_fn(x_t, zero, t), u_ref_fn(x_t, zero, t), x_t, x0, t, r,
                             beta=beta,
                             clip=clip, kl_weight=kl_weight)
    return loss, dict(metrics, nft_t_mean=t.mean())


def direct_reward_loss(z0, decode_fn: Callable, reward_fn: Callable, weights: Mapping[str, float]):
    """(loss, rewards, images) of one-step latents z0 = ε − u_θ(ε, 0, 1) (carrying the gradient):
    x̂ = decode(z0), L = −Σ_k w_k mean R_k(x̂), `reward_fn(images) -> {name: (N,)}`. The gradient reaches u_θ
    exactly, through the decoder and every reward."""
    images = decode_fn(z0)
    rewards = reward_fn(images)
    loss = -sum(weight * rewards[name].mean() for name, weight in weights.items())
    return loss, rewards, images

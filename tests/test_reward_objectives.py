"""Stage-3 objectives as pure functions: the DiffusionNFT loss against a direct numpy transcription, the sign of
its gradient, group advantages, the direct loss and the reward registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.objectives import reward, rewards


def nft_loss_numpy(v_theta, v_old, v_ref, x_t, x0, t, r, beta, a_max, kl_weight):
    """DiffusionNFT's policy loss written out sample by sample, with the average velocity as v."""
    total = 0.0
    n = len(x0)
    for i in range(n):
        v_pos = beta * v_theta[i] + (1 - beta) * v_old[i]
        v_neg = (1 + beta) * v_old[i] - beta * v_theta[i]
        x_pos = x_t[i] - t[i] * v_pos
        x_neg = x_t[i] - t[i] * v_neg
        w_pos = max(np.mean(np.abs(x_pos - x0[i])), 1e-5)
        w_neg = max(np.mean(np.abs(x_neg - x0[i])), 1e-5)
        total += (r[i] * np.mean((x_pos - x0[i]) ** 2) / w_pos + (1 - r[i]) * np.mean((x_neg - x0[i]) ** 2) / w_neg) / beta
    kl = np.mean((v_theta - v_ref) ** 2)
    return a_max * total / n + kl_weight * kl


@pytest.mark.parametrize("beta,r_kind", [(1.0, "random"), (0.1, "random"), (1.0, "zeros"), (1.0, "ones"),
                                         (2.5, "ones")])
def test_nft_loss_matches_the_transcription(beta, r_kind):
    rng = np.random.default_rng(0)
    shape = (6, 4, 4, 3)
    v_theta, v_old, v_ref, x_t, x0 = (rng.normal(size=shape) for _ in range(5))
    t = rng.uniform(0.05, 1.0, 6)
    t[0] = 1.0
    r = {"random": rng.uniform(size=6), "zeros": np.zeros(6), "ones": np.ones(6)}[r_kind]
    loss, metrics = reward.nft_loss(*(jnp.asarray(a, jnp.float32) for a in (v_theta, v_old, v_ref, x_t, x0, t, r)),
                                    beta=beta, clip=5.0, kl_weight=1e-4)
    expected = nft_loss_numpy(v_theta, v_old, v_ref, x_t, x0, t, r, beta, 5.0, 1e-4)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), np.mean((v_theta - v_ref) ** 2), rtol=1e-5)


def test_nft_step_makes_a_positive_sample_more_likely_and_a_negative_one_less():
    """One SGD step on u (a free tensor per sample, starting at the old policy): the one-step regression error
    of the r = 1 sample falls, that of the r = 0 sample rises."""
    rng = jax.random.PRNGKey(0)
    x0 = jax.random.normal(rng, (2, 4, 4, 3))
    noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
    t = jnp.ones(2)
    x_t = noise  # t = 1: the deployed one-step map
    u_old = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    r = jnp.array([1.0, 0.0])

    def loss(u):
        return reward.nft_loss(u, u_old, u_old, x_t, x0, t, r, beta=1.0)[0]

    def error(u):
        return jnp.mean(jnp.square(x_t - u - x0), axis=(1, 2, 3))

    before = error(u_old)
    after = error(u_old - 0.05 * jax.grad(loss)(u_old))
    assert after[0] < before[0] and after[1] > before[1], (before, after)


def test_group_advantages_normalise_each_reward_within_its_images_seeds():
    scores = {"a": jnp.array([[1.0, 2.0, 3.0, 4.0], [100.0, 100.0, 100.0, 104.0]]),
              "b": jnp.array([[0.0, 0.0, 0.0, 0.0], [1e-3, 2e-3, 3e-3, 4e-3]])}
    advantage, r = reward.group_advantages(scores, {"a": 1.0, "b": 2.0}, std="group", clip=5.0)
    def z(x):
        x = np.asarray(x, np.float64)
        c = x - x.mean(axis=1, keepdims=True)
        return c / (c.std(axis=1, keepdims=True) + reward.STD_EPS)
    expected = np.clip(z(scores["a"]) + 2 * z(scores["b"]), -5, 5)
    np.testing.assert_allclose(advantage, expected, rtol=1e-5, atol=1e-5)
    # Each group's advantages sum to zero; a reward of tiny spread counts as much as one of large spread.
    np.testing.assert_allclose(np.asarray(advantage).sum(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(r, np.clip(expected / 10 + 0.5, 0, 1), rtol=1e-6)
    global_adv, _ = reward.group_advantages(scores, {"a": 1.0}, std="global", clip=5.0)
    centred = np.asarray(scores["a"]) - np.asarray(scores["a"]).mean(axis=1, keepdims=True)
    np.testing.assert_allclose(global_adv, centred / (centred.std() + reward.STD_EPS), rtol=1e-5)
    with pytest.raises(ValueError, match="advantage_std"):
        reward.group_advantages(scores, {"a": 1.0}, std="batch")


def test_clipped_advantages_saturate_the_optimality_weight():
    advantage, r = reward.group_advantages({"a": jnp.array([[0.0, 0.0, 0.0, 1.0]])}, {"a": 10.0}, clip=5.0)
    assert float(advantage.max()) == 5.0 and float(r.max()) == 1.0 and float(r.min()) >= 0.0


def test_nft_times_include_the_one_step_map():
    t = np.asarray(reward.sample_nft_times(jax.random.PRNGKey(0), 4000, p_one=0.25))
    assert t.min() > 0 and t.max() == 1.0
    assert abs((t == 1.0).mean() - 0.25) < 0.03


def test_direct_loss_gradient_reaches_u_through_decoder_and_reward():
    noise = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 1))

    def loss(scale):
        z0 = noise - scale * noise  # one step of u(z, 0, 1) = scale * z
        return reward.direct_reward_loss(z0, lambda z: 2 * z, lambda x: {"neg_energy": -jnp.sum(x ** 2, (1, 2, 3))},
                                         {"neg_energy": 1.0})[0]

    # x = 2 (1 - scale) noise; -R = 4 (1 - scale)^2 |noise|^2 per sample: d/dscale at 0.5 = -4 mean |noise|^2.
    expected = -4 * float(jnp.mean(jnp.sum(noise ** 2, (1, 2, 3))))
    np.testing.assert_allclose(float(jax.grad(loss)(0.5)), expected, rtol=1e-5)


def test_analytic_rewards():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    lr = hr.reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4)).round().astype(np.uint8)
    batch = {"hr": jnp.asarray(hr), "lr": jnp.asarray(lr)}
    signed = jnp.asarray(hr, jnp.float32) / 127.5 - 1
    consistency = rewards.lr_consistency(None, signed, batch)
    assert consistency.shape == (2,) and float(consistency.min()) > -0.5 / 255 - 1e-6  # only LR rounding left
    flat = jnp.zeros_like(signed)
    assert float(rewards.hf_energy(None, flat, batch).max()) == 0.0
    assert float(rewards.hf_energy(None, signed, batch).min()) > 0.0
    assert float(rewards.lr_consistency(None, flat, batch).max()) < float(consistency.min())


def test_registry_names_networks_and_refuses_unknown_rewards():
    assert {spec.network for spec in rewards.REWARDS.values()} == {None, "musiq", "maniqa", "clipiqa", "lpips"}
    with pytest.raises(ValueError, match="unknown reward.*sharpness"):
        rewards.check_names(["musiq", "sharpness"])

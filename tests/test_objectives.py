"""Objectives as pure functions: the teacher's time grid and loss identity, ISC branches and times."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.objectives import flow_matching, isc
from smfsr_jax.core import schedules
from tests.conftest import import_torch


def test_training_grid_matches_diffusers_scheduler():
    import_torch()
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    np.testing.assert_allclose(schedules.sd3_training_sigmas(), scheduler.sigmas.numpy(), rtol=0, atol=0)


def test_logit_normal_sigmas_come_from_the_grid():
    sigmas = np.asarray(flow_matching.sample_logit_normal_sigmas(jax.random.PRNGKey(0), 4096))
    grid = schedules.sd3_training_sigmas()
    assert np.isin(sigmas, grid).all()
    # sigmoid(N(0,1)) has median 1/2: the grid index median is ~500, sigma = shift(1/2) = 0.75.
    assert abs(np.median(sigmas) - 0.75) < 0.02


def test_x0_loss_equals_sigma_weighted_velocity_loss():
    x0 = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 3))
    velocity_fn = lambda z, t: 0.5 * z - 0.1  # noqa: E731
    rng = jax.random.PRNGKey(2)
    loss, _ = flow_matching.teacher_fm_loss(velocity_fn, x0, rng)
    rng_sigma, rng_noise = jax.random.split(rng)
    sigma = flow_matching.sample_logit_normal_sigmas(rng_sigma, 6)[:, None, None, None]
    noise = jax.random.normal(rng_noise, x0.shape)
    z = (1 - sigma) * x0 + sigma * noise
    np.testing.assert_allclose(loss, jnp.mean(sigma ** 2 * (velocity_fn(z, sigma) - (noise - x0)) ** 2), rtol=1e-5)


def test_isc_times_are_ordered_and_the_branch_rate_is_the_papers():
    r, t, lam, s = isc.sample_isc_times(jax.random.PRNGKey(3), 1000)
    assert bool(jnp.all((r <= s) & (s <= t))) and bool(jnp.all((lam >= 0) & (lam <= 1)))
    x0 = jnp.zeros((2, 2, 2, 1))
    u_fn = lambda z, r, t: z  # noqa: E731
    teacher_fn = lambda z, t: z  # noqa: E731
    branch = jax.jit(jax.vmap(lambda key: isc.isc_loss(u_fn, teacher_fn, x0, key)[1]["boundary_fraction"]))
    fractions = np.asarray(branch(jax.vmap(jax.random.PRNGKey)(jnp.arange(400))))
    assert abs(np.mean(fractions) - 0.6) < 0.07
    per_sample = isc.isc_loss(u_fn, teacher_fn, jnp.zeros((512, 1, 1, 1)), jax.random.PRNGKey(0), per_sample=True)
    assert abs(float(per_sample[1]["boundary_fraction"]) - 0.6) < 0.07


def test_isc_time_options_put_their_draws_where_they_say():
    r, t, _, _ = isc.sample_isc_times(jax.random.PRNGKey(0), 30000, anchor="grid", anchor_prob=0.3)
    pairs = np.stack([np.asarray(r), np.asarray(t)], 1)
    for interval in isc.GRID_INTERVALS:  # each a third of the anchored draws (std of the rate ~0.0016)
        rate = np.mean(np.all(pairs == np.asarray(interval, np.float32), axis=1))
        assert abs(rate - 0.1) < 0.01, (interval, rate)
    # logit-normal(-0.4, 1): the median of one draw is sigmoid(-0.4); of the larger of two, sigmoid(-0.4 + 0.545).
    t = isc.sample_boundary_times(jax.random.PRNGKey(1), 30000, time_sampler="logit_normal", time_mean=-0.4)
    assert abs(float(jnp.median(t)) - float(jax.nn.sigmoid(-0.4))) < 0.01


def test_adaptive_weighting_divides_each_sample_by_its_own_error():
    error = jnp.asarray([[1.0, 1.0], [3.0, 3.0]])[:, :, None]  # per-sample mean squares 1 and 9
    assert float(isc.weighted_mean(error, 0.0)) == 5.0
    np.testing.assert_allclose(float(isc.weighted_mean(error, 1.0)), (1 / 1.01 + 9 / 9.01) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(isc.weighted_mean(error, 0.5)), (1 / 1.01 ** 0.5 + 9 / 9.01 ** 0.5) / 2,
                               rtol=1e-6)
    # The weight is a constant: the gradient is the plain one scaled per sample.
    grad = jax.grad(lambda e: isc.weighted_mean(e, 1.0))(error)
    np.testing.assert_allclose(np.asarray(grad)[:, 0, 0], [2 * 1 / 2 / 1.01 / 2, 2 * 3 / 2 / 9.01 / 2], rtol=1e-6)


def test_bad_isc_options_are_named():
    for bad, message in ((dict(anchor="middle"), "isc.anchor"), (dict(time_mean=-0.4), "isc.time_mean"),
                         (dict(adaptive_p=-1.0), "isc.adaptive_p"), (dict(anchor_prob=2.0), "isc.anchor_prob")):
        with pytest.raises(ValueError, match=message):
            isc.check_options(**isc.DEFAULT_OPTIONS | bad)


def test_boundary_cfg_mixes_against_the_unconditional_teacher():
    z = jnp.ones((2, 2, 2, 1))
    t = jnp.full((2,), 0.5)
    target = isc.boundary_target(lambda z, t: 3 * z, z, t, uncond_fn=lambda z, t: z, cfg_scale=4.5)
    np.testing.assert_allclose(target, 1 + 4.5 * (3 - 1))

"""The known-answer toys of the ISC experiments (benchmarks/toys.py): their truth is what they say it is."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import isc_toy, toys


@pytest.mark.parametrize("name", ["modes", "ring"])
def test_truth_fills_its_bins_with_the_stated_weights_and_stays_on_its_support(name):
    toy = toys.TOYS[name]()
    assert toy.weights.sum() == pytest.approx(1.0, abs=1e-6)
    cond, x = toy.train_pairs(jax.random.PRNGKey(0), 20000)
    index, off = toy.bins(cond, x)
    freq = np.bincount(np.asarray(index), minlength=len(toy.weights)) / len(index)
    # Multinomial sampling error of 20000 draws: std <= 0.0036 per bin.
    np.testing.assert_allclose(freq, toy.weights, atol=0.015)
    assert float(off.mean()) < 1e-3


@pytest.mark.parametrize("name", ["modes", "ring"])
def test_a_collapsed_sampler_is_far_from_the_truth(name):
    """The energy distance separates the truth's twin (the floor) from the conditional mean, which a one-step
    teacher produces."""
    toy = toys.TOYS[name]()
    case = toy.cases(0, 500)[0]
    floor = isc_toy.floor([case])
    mean = jnp.broadcast_to(case.twin.mean(0), case.twin.shape)
    collapsed = float(isc_toy.energy_distance(jnp.concatenate([case.cond, mean], -1), case.truth))
    assert collapsed > 10 * floor


def test_patch_toy_pairs_each_hr_patch_with_its_box_downscale():
    toy = toys.patches_toy(held_out=200)
    cond, hr = toy.train_pairs(jax.random.PRNGKey(1), 16)
    assert cond.shape == (16, 12) and hr.shape == (16, 8 * 8 * 3)
    image = np.asarray(hr[0]).reshape(8, 8, 3)
    np.testing.assert_allclose(np.asarray(cond[0]).reshape(2, 2, 3)[1, 0], image[4:, :4].mean((0, 1)), atol=1e-6)
    assert -1.0 <= float(hr.min()) and float(hr.max()) <= 1.0
    (case,) = toy.cases(0, 200)
    # The truth and its twin are different held-out patches; neither is in training (disjoint by construction).
    assert case.truth.shape == (200, 12 + 192) and not np.allclose(case.truth[:, 12:], case.twin)


def test_a_diverged_seed_is_counted_not_averaged():
    stat = isc_toy.spread([0.5, float("nan"), 1.5])
    assert stat["mean"] == 1.0 and stat["std"] == pytest.approx(np.sqrt(0.5)) and stat["diverged"] == 1
    assert stat["seeds"] == [0.5, None, 1.5]
    assert isc_toy.fmt(stat, 2) == "1.00 ± 0.71 (1 of 3 diverged)"
    assert isc_toy.fmt(isc_toy.spread([1.0, 3.0]), 1) == "2.0 ± 1.4"

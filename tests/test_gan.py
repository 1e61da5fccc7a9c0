"""Stage 2: hinge values, the VSD direction, LoRA, gradient routing of every term, and a tiny GAN run."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import student_gan
from smfsr_jax.convert import tensors
from smfsr_jax.core import mesh as mesh_lib
from smfsr_jax.objectives import adversarial, vsd
from smfsr_jax.training import inference, lora, loop, stages, writers
from smfsr_jax.training import state as state_lib
from smfsr_jax.training.stages import gan
from tests import tiny_runs


def test_hinge_losses_on_known_logits():
    real = jnp.array([[2.0, 0.5], [-1.0, 1.0]])
    fake = jnp.array([[-2.0, 0.0], [0.5, -0.5]])
    # D: mean(max(0, 1 - real)) = (0 + .5 + 2 + 0)/4; mean(max(0, 1 + fake)) = (0 + 1 + 1.5 + .5)/4
    np.testing.assert_allclose(adversarial.hinge_d_loss(real, fake), 0.625 + 0.75)
    np.testing.assert_allclose(adversarial.hinge_g_loss(fake), 0.5)
    zeros = jnp.zeros((3, 5))
    assert float(adversarial.hinge_d_loss(zeros, zeros)) == 2.0


def test_vsd_gradient_is_the_normalised_x0_difference():
    z_hat = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 2))
    teacher_fn = lambda z, t: 0.3 * z + 0.1  # noqa: E731
    regularizer_fn = lambda z, t: -0.2 * z  # noqa: E731
    rng = jax.random.PRNGKey(7)
    grad = jax.grad(lambda z: vsd.vsd_loss(z, teacher_fn, regularizer_fn, rng)[0])(z_hat)
    # The analytic direction, recomputed from the definition with the same draws.
    rng_t, rng_noise = jax.random.split(rng)
    t = jax.random.uniform(rng_t, (3,), minval=0.02, maxval=0.98)[:, None, None, None]
    z_t = (1 - t) * z_hat + t * jax.random.normal(rng_noise, z_hat.shape)
    x0_teacher, x0_regularizer = z_t - t * teacher_fn(z_t, t), z_t - t * regularizer_fn(z_t, t)
    w = jnp.abs(z_hat - x0_teacher).mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(grad, (x0_regularizer - x0_teacher) / w / z_hat.size, rtol=1e-5, atol=1e-8)


def test_lora_adapters_start_at_zero_and_move_only_their_kernels():
    params = {"blocks": {"attn": {"to_q_control": {"kernel": np.ones((2, 6, 6), np.float32), "bias": np.zeros((2, 6))},
                                  "to_k_control": {"kernel": np.ones((2, 6, 6), np.float32)}}}}
    adapters = lora.init_lora(params, ["to_q_control"], rank=2, rng=jax.random.PRNGKey(0))
    assert adapters["blocks"]["attn"]["to_q_control"]["lora_a"].shape == (2, 6, 2)
    assert adapters["blocks"]["attn"]["to_q_control"]["lora_b"].shape == (2, 2, 6)
    jax.tree.map(np.testing.assert_array_equal, lora.apply_lora(params, adapters, 2, 2), params)
    adapters["blocks"]["attn"]["to_q_control"]["lora_b"] = np.ones((2, 2, 6), np.float32)
    moved = lora.apply_lora(params, adapters, 2, 2)
    a = adapters["blocks"]["attn"]["to_q_control"]["lora_a"]
    np.testing.assert_allclose(moved["blocks"]["attn"]["to_q_control"]["kernel"], 1 + a @ np.ones((2, 2, 6)),
                               rtol=1e-6)
    np.testing.assert_array_equal(moved["blocks"]["attn"]["to_k_control"]["kernel"], 1)


def gan_config(data_dir, teacher_run, student_run, **overrides):
    return tiny_runs.tiny(student_gan, data_dir, **{"init.teacher": str(teacher_run / "bundle"),
                                                   "init.student": str(student_run / "bundle"), **overrides})


def test_each_term_reaches_only_its_own_parameters(data_dir, teacher_run, student_run):
    """Every loss term's gradient is non-zero on its own part and exactly zero on the others (LoRA mode; the
    full-copy regularizer is the default the tiny GAN run trains)."""
    config = gan_config(data_dir, teacher_run, student_run, **{"regularizer.mode": "lora", "regularizer.lora_rank": 4})
    stage = stages.build_stage(config)
    losses = gan.make_losses(config, stage.model_config, stage.teacher_config, stage.autoencoder_config,
                             *_lpips_and_disc_configs(config))
    mesh = mesh_lib.make_mesh(config.mesh)
    batch = loop.device_batch(next(loop.data_iterator(config)), mesh)
    params = jax.tree.map(jnp.asarray, stage.trainable)
    owner = {"isc": "student", "rec": "student", "vsd": "student", "adv_g": "student",
             "regularizer": "regularizer", "disc": "discriminator"}
    names = sorted(owner)

    def terms_of(p):
        terms, _, new_state = losses(p, stage.model_state, stage.frozen, batch, jax.random.PRNGKey(3))
        return jnp.stack([terms[n] for n in names]), new_state

    # One backward pass per term, through one compiled backward function. Not vmapped: XLA:CPU folds a batch of
    # cotangents into the feature axis of some kernels, whose rounding then leaks ~1e-3 of one term's gradient
    # into another's exact zeros.
    vjp_fn, new_state = jax.jit(lambda p: jax.vjp(terms_of, p, has_aux=True)[1:])(params)
    backward = jax.jit(lambda vjp, row: vjp(row)[0])
    grads = [backward(vjp_fn, row) for row in jnp.eye(len(names))]
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_state),
                                                        jax.tree.leaves(stage.model_state)))  # spectral norm moved
    for i, name in enumerate(names):
        for part, tree in grads[i].items():
            norm = float(state_lib.global_norm(tree))
            if part == owner[name]:
                assert norm > 0, (name, part)
            else:
                assert norm == 0.0, (name, part, norm)


def _lpips_and_disc_configs(config):
    lpips_config, _ = gan.loading.load_lpips(config.rec.lpips)
    disc_config, *_ = gan.load_discriminator(config.disc, config.seed)
    return lpips_config, disc_config


def test_tiny_gan_run(data_dir, teacher_run, student_run, tmp_path, monkeypatch):
    """D leaves 2.0, the G term responds, and the student moves only inside its trainable set."""
    config = gan_config(data_dir, teacher_run, student_run, total_steps=12, **{"optimizer.lr": 1e-3})
    loop.train(config, str(tmp_path))
    records = [r for r in writers.read_jsonl(tmp_path / "metrics.jsonl") if "disc_term" in r]
    assert len(records) == 12 and all(np.isfinite(r["loss"]) for r in records)
    disc = np.array([r["disc_term"] for r in records])
    adv = np.array([r["adv_g_term"] for r in records])
    # Random heads start near zero logits (hinge D loss 2.0); training moves it down.
    assert abs(disc[0] - 2.0) < 0.15 and disc[-4:].mean() < disc[:2].mean() - 0.05, disc
    assert np.ptp(adv) > 1e-3, adv
    # The exported student equals the stage-1 student outside its trainable set; control weights moved.
    before = tensors.flatten(tiny_runs.bundle_params(student_run))
    after = tensors.flatten(tiny_runs.bundle_params(tmp_path))
    trained = [p for p in before if "control" in p or p.startswith("time_text_embed_interval/")]
    for path in set(before) - set(trained):
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert any(not np.array_equal(after[p], before[p]) for p in trained if "to_k_control" not in p)

    # A checkpoint loads for sampling without the teacher, LPIPS or the discriminator, equal to the bundle.
    def refuse(*args, **kwargs):
        raise AssertionError("sampling a checkpoint built a training-only network")

    for name in ("load_teacher", "load_lpips", "load_discriminator"):
        monkeypatch.setattr(gan if hasattr(gan, name) else gan.loading, name, refuse)
    loaded = tensors.flatten(inference.load_checkpoint(str(tmp_path)).transformer_params)
    assert loaded.keys() == after.keys()
    for path, value in after.items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)

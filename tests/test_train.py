"""train.py on tiny configs: both stages, loss decrease, resume, NaN guard (sharding, process and preemption
invariance: tests/test_run_contract.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import student_isc, teacher_fm
from smfsr_jax.convert import tensors
from smfsr_jax.objectives import isc
from smfsr_jax.sampling.runner import SRPipeline
from smfsr_jax.training import checkpoints, loop, partition, stages, writers
from tests.tiny_runs import STEPS, bundle_params, tiny

def assert_trees_close(a, b, atol):
    flat_a, flat_b = tensors.flatten(a), tensors.flatten(b)
    assert flat_a.keys() == flat_b.keys()
    worst = max(float(np.abs(np.asarray(flat_a[k], np.float64) - np.asarray(flat_b[k], np.float64)).max())
                for k in flat_a)
    assert worst <= atol, worst


def test_teacher_loss_falls_and_bundle_is_written(teacher_run):
    records = [r for r in writers.read_jsonl(teacher_run / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    # The tiny teacher's velocity MSE has a floor near 1 (the noise half of v = eps - x0 is unpredictable at
    # high sigma), so a clear fall from ~1.3 is what 60 steps can show.
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), losses
    assert all(np.isfinite(r["grad_norm"]) for r in records)
    record = json.loads((teacher_run / "bundle" / "bundle.json").read_text())
    assert record["kind"] == "teacher" and record["meta"]["step"] == STEPS
    # SR tiles at the training crop's latent size (32-pixel crops, downscale 4) with 3/8 overlap by default.
    assert record["meta"]["tile_size"] == 8
    sr = SRPipeline.from_checkpoint(str(teacher_run / "bundle"))
    assert (sr.settings.tile_size, sr.settings.tile_overlap) == (8, 3)
    assert json.loads((teacher_run / "config.json").read_text())["stage"] == "teacher_fm"
    assert checkpoints.finished_steps(str(teacher_run / "checkpoints")) == [STEPS]


def test_student_steps_from_the_teacher_bundle(teacher_run, student_run):
    records = [r for r in writers.read_jsonl(student_run / "metrics.jsonl") if "isc_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # One branch per step (p_boundary 0.6; seed 0 draws boundary, boundary, split, split).
    assert [r["boundary_fraction"] for r in records] == [1.0, 1.0, 0.0, 0.0]
    # The student starts as its teacher: before its first update u(z, t, t) is the teacher's v(z, t) exactly (the
    # boundary loss is rounding, 5e-15 here), and the step moves it (a non-zero gradient, a non-zero loss after).
    assert records[0]["isc_loss"] < 1e-10 and records[0]["grad_norm"] > 0 and records[1]["isc_loss"] > 1e-12
    # A teacher-like student is nearly consistent over intervals: the split residual is small but not zero.
    assert all(0 < r["isc_loss"] < 1e-4 and np.isfinite(r["grad_norm"]) for r in records[2:])
    student = bundle_params(student_run)
    teacher = bundle_params(teacher_run)
    # Frozen weights are bit-identical after training; only control and the interval MLP moved.
    flat_s, flat_t = tensors.flatten(student), tensors.flatten(teacher)
    for path, value in flat_t.items():
        if "control" in path:
            continue
        student_path = path.replace("time_text_embed/", "time_text_embed_interval/time_text_embed/")
        if not student_path.startswith("time_text_embed_interval"):
            np.testing.assert_array_equal(flat_s[student_path], value, err_msg=path)
    moved = [p for p in flat_s if "control" in p and "to_k_control" not in p
             and not np.array_equal(flat_s[p], flat_t[p])]
    assert moved
    # Double-norm mode: to_k_control gets no gradient and no weight decay: untouched.
    for path in (p for p in flat_s if "to_k_control" in p):
        np.testing.assert_array_equal(flat_s[path], flat_t[path])


def test_frozen_parts_are_bit_identical_after_a_step(teacher_run, data_dir):
    config = tiny(student_isc, data_dir, **{"init.teacher": str(teacher_run / "bundle")})
    stage = stages.build_stage(config)
    from smfsr_jax.core import mesh as mesh_lib
    from smfsr_jax.training import sharding
    from smfsr_jax.training import state as state_lib
    mesh = mesh_lib.make_mesh(config.mesh)
    optimizer = state_lib.make_optimizer(config.optimizer)
    state, shardings = state_lib.init_state(stage.trainable, optimizer, False, mesh)
    frozen_shardings = sharding.param_shardings(stage.frozen, mesh)
    frozen = sharding.put(stage.frozen, frozen_shardings)
    before = jax.device_get(frozen)
    batch = loop.device_batch(next(loop.data_iterator(config)), mesh)
    step = state_lib.jit_train_step(state_lib.make_train_step(stage.loss_fn, optimizer, seed=0), shardings,
                                    frozen_shardings, mesh)
    new_state, _ = step(state, frozen, batch)
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(frozen))
    assert int(new_state.step) == 1


def test_isc_targets_carry_no_gradient():
    """With the targets' own dependence on theta cut, d loss / d theta = 2 mean((u - target) du/dtheta)."""
    x0 = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3))

    def u_fn_of(theta):
        return lambda z, r, t: theta[0] * z + theta[1] * (t - r)[:, None, None, None]

    teacher_fn = lambda z, t: 0.5 * z  # noqa: E731
    theta = jnp.array([0.7, -0.3])
    for key in range(6):  # both branches
        rng = jax.random.PRNGKey(key)
        grad = jax.grad(lambda th: isc.isc_loss(u_fn_of(th), teacher_fn, x0, rng)[0])(theta)
        frozen_theta = jax.lax.stop_gradient(theta)

        def with_constant_target(th):
            # The same loss with the target computed from a separate, constant copy of theta.
            rng_times, rng_noise, rng_branch, rng_boundary = jax.random.split(rng, 4)
            r, t, lam, s = isc.sample_isc_times(rng_times, x0.shape[0])
            t_b = isc.sample_boundary_times(rng_boundary, x0.shape[0])
            noise = jax.random.normal(rng_noise, x0.shape)
            z = lambda t: (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise  # noqa: E731
            if jax.random.uniform(rng_branch) < 0.6:
                return jnp.mean(jnp.square(u_fn_of(th)(z(t_b), t_b, t_b) - teacher_fn(z(t_b), t_b)))
            target = isc.split_target(u_fn_of(frozen_theta), z(t), r, s, t, lam)
            return jnp.mean(jnp.square(u_fn_of(th)(z(t), r, t) - target))

        np.testing.assert_allclose(grad, jax.grad(with_constant_target)(theta), rtol=1e-5, atol=1e-7)


def test_nan_stops_training_before_any_checkpoint(data_dir, tmp_path, monkeypatch):
    config = tiny(teacher_fm, data_dir, total_steps=6, checkpoint_every=2)
    original = loop.device_batch
    calls = {"n": 0}

    def poisoned(batch, mesh):
        calls["n"] += 1
        batch = dict(batch)
        # Caption embeddings on every batch (so shapes never change), NaN in those of step 3.
        null = np.zeros((batch["hr"].shape[0], 8, 32), np.float32)
        batch["prompt_embeds"] = np.full_like(null, np.nan) if calls["n"] == 3 else null
        batch["pooled_prompt_embeds"] = np.zeros((batch["hr"].shape[0], 32), np.float32)
        return original(batch, mesh)

    monkeypatch.setattr(loop, "device_batch", poisoned)
    with pytest.raises(loop.NonFiniteError, match="at step 3"):
        loop.train(config, str(tmp_path))
    assert checkpoints.finished_steps(str(tmp_path / "checkpoints")) == [2]
    assert not (tmp_path / "bundle").exists()


class DiesAtBatch:
    """A data iterator that raises KeyboardInterrupt when asked for its n-th batch (a killed run)."""

    def __init__(self, inner, n):
        self.inner, self.n, self.count = inner, n, 0

    def __next__(self):
        self.count += 1
        if self.count == self.n:
            raise KeyboardInterrupt("killed")
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def close(self):
        self.inner.close()


def test_killed_run_resumes_exactly(teacher_run, data_dir, tmp_path, monkeypatch):
    config = tiny(teacher_fm, data_dir, total_steps=STEPS, checkpoint_every=25)
    original = loop.data_iterator
    monkeypatch.setattr(loop, "data_iterator", lambda cfg: DiesAtBatch(original(cfg), 40))
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, str(tmp_path))
    assert checkpoints.finished_steps(str(tmp_path / "checkpoints")) == [25]
    monkeypatch.setattr(loop, "data_iterator", original)
    loop.train(config, str(tmp_path))
    assert_trees_close(bundle_params(tmp_path), bundle_params(teacher_run), atol=0.0)


def test_trainable_masks_match_the_paper_counts():
    student = student_isc.get_config("sd35m")
    from smfsr_jax.models import mmdit
    params = mmdit.abstract_params(mmdit.MMDiTConfig.from_dict(student.model.to_dict()))
    trainable, frozen = partition.partition(params, student.trainable)
    assert partition.count(trainable) == 366_222_336
    trainable, _ = partition.partition(params, student.trainable, ("to_k_control",))
    assert partition.count(trainable) == 278_871_552
    teacher = teacher_fm.get_config("sd35m")
    params = mmdit.abstract_params(mmdit.MMDiTConfig.from_dict(teacher.model.to_dict()))
    assert partition.count(partition.partition(params, teacher.trainable)[0]) == 350_877_696


def test_checkpoints_load_for_inference_and_readers_skip_saves_in_progress(teacher_run):
    from smfsr_jax.training import inference
    directory = teacher_run / "checkpoints"
    # A save in progress is a temporary directory until orbax renames it: readers must not see it.
    in_progress = directory / f"{STEPS + 10}.orbax-checkpoint-tmp-1234"
    in_progress.mkdir()
    try:
        assert checkpoints.finished_steps(str(directory)) == [STEPS]
        model = inference.load_checkpoint(str(teacher_run))
    finally:
        in_progress.rmdir()
    assert model.meta == {"stage": "teacher_fm", "step": STEPS, "variant": "tiny", "tile_size": 8} and model.kind == "teacher"
    assert_trees_close(model.transformer_params, bundle_params(teacher_run), atol=0.0)

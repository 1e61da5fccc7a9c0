"""Stage-1 initialisation: the fitted student is its teacher at step 0. (Released SMFSR students load with
their raw-time scale unchanged: tests/test_mmdit.py, official fixtures.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, student_isc
from smfsr_jax.convert.transformer import load_transformer
from smfsr_jax.models import mmdit
from smfsr_jax.training import partition, stages
from smfsr_jax.training.stages.student import student_from_teacher
from tests import tiny_runs
from tests.random_weights import random_mmdit_params


def random_teacher(seed=0):
    """The demo's tiny teacher geometry with every weight random (its output depends on the time embedding)."""
    cfg = mmdit.MMDiTConfig.from_dict(base.model_config("tiny", "dit4sr_teacher").to_dict())
    return cfg, jax.device_get(random_mmdit_params(cfg, seed, scale=1 / np.sqrt(cfg.hidden_size)))


def inputs(cfg, pooled, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(batch, 8, 8, cfg.in_channels)).astype(np.float32)
    return z, dict(context=rng.normal(size=(batch, 4, cfg.joint_attention_dim)).astype(np.float32),
                   pooled=np.broadcast_to(pooled, (batch, cfg.pooled_projection_dim)).astype(np.float32),
                   lr_latents=rng.normal(size=z.shape).astype(np.float32),
                   t=rng.uniform(0, 1, batch).astype(np.float32))


def velocities(teacher_cfg, teacher_params, student_cfg, student_params, z, kw, r=None):
    v = mmdit.MMDiT(teacher_cfg).apply({"params": teacher_params}, z, **kw)
    u = mmdit.MMDiT(student_cfg).apply({"params": student_params}, z, **kw, r=kw["t"] if r is None else r)
    return np.asarray(v), np.asarray(u)


def rel_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_fitted_student_is_the_teacher_at_step_zero():
    teacher_cfg, teacher = random_teacher()
    pooled = np.random.default_rng(3).normal(size=(teacher_cfg.pooled_projection_dim,)).astype(np.float32)
    student_cfg, student = student_from_teacher(teacher_cfg, teacher, pooled=pooled)
    assert student_cfg.time_conditioning == "interval" and student_cfg.time_scale == teacher_cfg.time_scale
    z, kw = inputs(teacher_cfg, pooled)
    v, u = velocities(teacher_cfg, teacher, student_cfg, student, z, kw)
    assert rel_error(u, v) < 1e-3
    # The E(r) half starts at zero weight: at step 0 u(z, r, t) = v(z, t) for any r.
    _, u_r = velocities(teacher_cfg, teacher, student_cfg, student, z, kw, r=kw["t"] * 0.3)
    assert rel_error(u_r, v) < 1e-3
    # The released module code's random init is far from the teacher (the motivation for the fit).
    default_cfg, default = student_from_teacher(teacher_cfg, teacher, interval_init="torch_default")
    assert default_cfg.time_scale == 1.0
    assert rel_error(velocities(teacher_cfg, teacher, default_cfg, default, z, kw)[1], v) > 0.1


def test_fit_covers_every_pooled_row_and_bf16_compute():
    teacher_cfg, teacher = random_teacher(seed=4)
    pooled = np.random.default_rng(5).normal(size=(32, teacher_cfg.pooled_projection_dim)).astype(np.float32)
    student_cfg, student = student_from_teacher(teacher_cfg, teacher, pooled=pooled)
    embed = lambda cfg, params, **kw: mmdit.MMDiT(cfg).apply(  # noqa: E731
        {"params": params}, jnp.zeros((32, 8, 8, cfg.in_channels)), context=jnp.zeros((32, 4, cfg.joint_attention_dim)),
        lr_latents=jnp.zeros((32, 8, 8, cfg.in_channels)), pooled=pooled, t=jnp.linspace(0, 1, 32), **kw)
    for dtype in ("float32", "bfloat16"):  # the time path runs in fp32 either way
        v = embed(teacher_cfg.replace(dtype=dtype), teacher)
        u = embed(student_cfg.replace(dtype=dtype), student, r=jnp.linspace(0, 1, 32))
        assert rel_error(np.asarray(u), np.asarray(v)) < (1e-3 if dtype == "float32" else 3e-2), dtype


def test_fit_needs_the_pooled_embeddings_and_a_known_mode():
    teacher_cfg, teacher = random_teacher()
    with pytest.raises(ValueError, match="pooled"):
        student_from_teacher(teacher_cfg, teacher)
    with pytest.raises(ValueError, match="init.interval"):
        student_from_teacher(teacher_cfg, teacher, interval_init="zeros", pooled=np.zeros(32))


def test_student_stage_starts_as_the_trained_teacher(teacher_run, data_dir):
    config = tiny_runs.tiny(student_isc, data_dir, **{"init.teacher": str(teacher_run / "bundle")})
    stage = stages.build_stage(config)
    teacher_cfg, teacher = load_transformer(teacher_run / "bundle")
    assert stage.model_config.time_scale == teacher_cfg.time_scale == 1000.0
    null = stage.frozen["null"]
    z, kw = inputs(teacher_cfg, null["pooled_prompt_embeds"])
    kw["context"] = np.broadcast_to(null["prompt_embeds"], (z.shape[0], *null["prompt_embeds"].shape))
    student = partition.merge(stage.trainable, stage.frozen["base"], stage.frozen["own"])
    v, u = velocities(teacher_cfg, teacher, stage.model_config, student, z, kw)
    assert rel_error(u, v) < 1e-3


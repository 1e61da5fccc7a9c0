"""The splash attention path (Pallas, run here in its interpreter) against the XLA path, alone and inside the tiny
MM-DiT, fp32 and bf16, forward and gradient; its TPU lowering; and the attention switch's platform choice."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from smfsr_jax.models import attention, mmdit
from tests.random_weights import random_mmdit_params
from tests.test_mmdit import tiny_inputs

# Relative to the largest reference value: fp32 differs by summation order only; bf16 inputs round to 8 bits
# and the two paths round their intermediates at different places.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}


def qkv(dtype, batch=2, length=200, heads=2, head_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype) for _ in range(3))


def relative(a, b) -> float:
    a, b = (jnp.asarray(x, jnp.float32) for x in (a, b))
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_splash_matches_xla_on_a_sequence_that_is_not_a_multiple_of_128(dtype):
    q, k, v = qkv(dtype)

    def loss(implementation, interpret, q, k, v):
        with attention.target("tpu", interpret=interpret):
            out = attention.dot_product_attention(q, k, v, implementation=implementation)
        return jnp.sum(jnp.square(out.astype(jnp.float32))), out

    (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(2, 3, 4), has_aux=True)(None, False, q, k, v)
    (_, out), grads = jax.value_and_grad(loss, argnums=(2, 3, 4), has_aux=True)("splash", True, q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert relative(out, ref) < TOLERANCE[dtype]
    for grad, ref_grad in zip(grads, ref_grads):
        assert relative(grad, ref_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_mmdit_with_splash_matches_xla(dtype):
    cfg = mmdit.MMDiTConfig.tiny_student(dtype=dtype)
    params = random_mmdit_params(cfg)
    z, kw = tiny_inputs(cfg)  # 5 text + 16 image + 16 LR tokens: padded to 128

    def loss(implementation, params):
        out = mmdit.MMDiT(cfg.replace(attention=implementation)).apply({"params": params}, z, **kw)
        return jnp.sum(jnp.square(out)), out

    (_, ref), ref_grads = jax.value_and_grad(loss, argnums=1, has_aux=True)("xla", params)
    with attention.target("tpu", interpret=True):
        (_, out), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)("splash", params)
    assert relative(out, ref) < TOLERANCE[dtype]
    worst = max(jax.tree.leaves(jax.tree.map(relative, grads, ref_grads)))
    assert worst < TOLERANCE[dtype] * 3  # a gradient sums many rounded products


SPLIT_BATCH = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from smfsr_jax.core import mesh as mesh_lib
    from smfsr_jax.models import attention
    mesh = mesh_lib.make_mesh([("data", -1)])
    q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((3, 150, 2, 64)), jnp.float32) for i in range(3))
    ref = attention.dot_product_attention(q, k, v, implementation="xla")

    def on_mesh(q, k, v):
        with attention.batch_mesh(mesh):
            return attention.dot_product_attention(q, k, v, implementation="splash")

    with attention.target("tpu", interpret=True):
        out = jax.jit(on_mesh)(q, k, v)
    print(mesh.size, out.shape, float(jnp.abs(out - ref).max() / jnp.abs(ref).max()))
""")


def test_splash_splits_a_batch_that_does_not_fill_the_mesh():
    # 3 examples on 4 devices (a 4-image preview on 8): padded to 4, one per device under shard_map.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", SPLIT_BATCH], capture_output=True, text=True, env=env, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    devices, *shape, difference = result.stdout.split()
    assert devices == "4" and " ".join(shape) == "(3, 150, 2, 64)"
    assert float(difference) < TOLERANCE["float32"]


def test_splash_lowers_for_tpu_as_a_mosaic_kernel():
    cfg = mmdit.MMDiTConfig.tiny_student(dtype="bfloat16", attention="splash")
    params = jax.eval_shape(lambda: random_mmdit_params(cfg))
    z, kw = tiny_inputs(cfg)

    def loss(params):
        return jnp.sum(mmdit.MMDiT(cfg).apply({"params": params}, z, **kw))

    with attention.target("tpu"):
        exported = export.export(jax.jit(jax.grad(loss)), platforms=("tpu",))(params)
    assert "tpu_custom_call" in exported.mlir_module()


def test_the_switch_follows_the_target_platform():
    assert attention.resolve_implementation("splash", jnp.bfloat16) == "xla"  # this CPU host
    assert attention.resolve_implementation("cudnn", jnp.bfloat16) == "xla"
    with attention.target("tpu"):
        assert attention.resolve_implementation("splash", jnp.bfloat16) == "splash"
        assert attention.resolve_implementation("cudnn", jnp.bfloat16) == "xla"
    with attention.target("cuda"):
        assert attention.resolve_implementation("cudnn", jnp.bfloat16) == "cudnn"
        assert attention.resolve_implementation("cudnn", jnp.float32) == "xla"
        assert attention.resolve_implementation("splash", jnp.bfloat16) == "xla"
    # The MM-DiT's default (None): splash on a TPU, the XLA path elsewhere; cuDNN is opt-in.
    assert attention.with_platform_default(None) == "xla"
    assert attention.traced_implementation(None, jnp.bfloat16) == "xla"
    for platform, default, fused in (("tpu", "splash", "splash"), ("cuda", "xla", "cudnn")):
        with attention.target(platform):
            assert attention.with_platform_default(None) == default
            assert attention.traced_implementation(None, jnp.bfloat16) == default
            assert attention.fused_implementation() == fused
            assert attention.with_platform_default("xla") == "xla"
    assert attention.fused_implementation() is None  # this CPU host
    with pytest.raises(ValueError, match="flash"):
        attention.resolve_implementation("flash", jnp.bfloat16)


def test_splash_blocks_follow_the_sequence_length():
    # SD3.5-M at 512²: 333 text + 1024 image + 1024 LR tokens = 2381, padded to 2432 = 19 x 128.
    assert attention.splash_block(2381) == 128
    assert attention.splash_block(1024) == 512
    assert attention.splash_block(37) == 128
    assert attention.splash_block(640) == 128
    assert attention.splash_block(768) == 256

"""Tiled VAE encode/decode (models/vae_tiling.py) against the whole-image AutoencoderKL: exact convolutions and
GroupNorm statistics and whole-latent attention, no seams, odd sizes, bf16, and the SR pipeline's vae_tile."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.convert.vae import abstract_params
from smfsr_jax.core import memory
from smfsr_jax.models import vae_tiling
from smfsr_jax.models.vae import AutoencoderKL, VAEConfig
from smfsr_jax.sampling.runner import SRPipeline
from smfsr_jax.sampling.settings import SRSettings
from smfsr_jax.weights import bundle
from tests.test_sampling import lr_crop, random_embeddings, random_params, tiny_config

# Two levels (downscale 2), the SD3 block structure: compiles in seconds, yet every layer kind is there.
CONFIG = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                   downscale=2)
TILE = 16  # pixels: 8 latent pixels per decoder tile


def random_vae_params(config: VAEConfig, seed: int = 0):
    """Kernels ~ 1/sqrt(fan_in), norm scales ~ 1, biases ~ 0.2."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        if len(shape) == 1:
            return (0.2 * rng.standard_normal(shape)).astype(np.float32)
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(lambda path, a: leaf(path, a.shape), abstract_params(config))


def smooth_images(height: int, width: int, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Photographs resampled to (height, width), in [-1, 1]."""
    names = ("astronaut", "chelsea")
    crops = [lr_crop(names[i % 2], 2 * height, 2 * width, 10 * seed, 20 * seed)[::2, ::2] for i in range(batch)]
    return np.stack(crops).astype(np.float32) / 127.5 - 1.0


def whole(config, params, x, method):
    return jax.jit(lambda p, x: AutoencoderKL(config).apply({"params": p}, x, method=method))(params, x)


def tiled(config, params, x, method, tile=TILE):
    fn = vae_tiling.encode if method == "encode" else vae_tiling.decode
    return jax.jit(lambda p, x: fn(p, config, x, tile))(params, x)


def whole_image_statistics(config, params, x, method) -> dict:
    """{GroupNorm path in the part: (mean, var)} of the untiled model, from its GroupNorm inputs (two-pass)."""
    def statistics(params, x):
        stats = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.GroupNorm) and context.method_name == "__call__":
                h = args[0].astype(jnp.float32)
                grouped = h.reshape(*h.shape[:3], config.norm_num_groups, -1)
                stats["/".join(context.module.path[1:])] = (grouped.mean((1, 2, 4)), grouped.var((1, 2, 4)))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            AutoencoderKL(config).apply({"params": params}, x, method=method)
        return stats

    return jax.jit(statistics)(params, x)


def assert_close(ours, reference, rtol):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    err = float(np.max(np.abs(ours - reference)))
    assert err <= rtol * float(np.max(np.abs(reference))), err


def test_margins_of_the_sd3_vae():
    sd3 = VAEConfig.sd3()
    assert vae_tiling.encoder_margins(sd3) == (92, [90, 42, 18, 6], 3)
    assert vae_tiling.decoder_margins(sd3) == (3, [13, 12, 10, 7], [7, 6, 4], 15)
    assert vae_tiling.norms_through_attention(sd3, "encoder") == 19
    assert vae_tiling.norms_through_attention(sd3, "decoder") == 3
    assert vae_tiling.tile_grid(1000, 300, 512, 8) == ((504, 304), (2, 1))
    assert not vae_tiling.needs_tiling(512, 512, 512) and vae_tiling.needs_tiling(512, 520, 512)
    assert not vae_tiling.needs_tiling(4096, 4096, 0)


# fp32 rounding (2^-24 an operation) differs between tiled and whole in the order of the GroupNorm sums, in
# var = E[x^2] - E[x]^2 and in the online softmax, and grows through the ~20 layers: measured at most 2.2e-6 of
# max |output| (these sizes and 64 x 64). 1e-5 of it leaves 4x; the old per-tile attention was off by 0.4.
RTOL = 1e-5


# Odd sizes, sizes that are not multiples of the tile, one row of tiles; key chunks of one buffer row (16 keys:
# many chunks, masked columns and rows) and of the whole buffer.
@pytest.mark.parametrize("height, width, key_chunk", [(37, 50, 16), (16, 61, vae_tiling.KEY_CHUNK)])
def test_exact_with_attention(height, width, key_chunk, monkeypatch):
    monkeypatch.setattr(vae_tiling, "KEY_CHUNK", key_chunk)
    params = random_vae_params(CONFIG)
    images = smooth_images(height, width)
    (mean, logvar), (reference, reference_logvar) = (tiled(CONFIG, params, images, "encode"),
                                                     whole(CONFIG, params, images, "encode"))
    assert_close(mean, reference, RTOL)
    assert_close(logvar, reference_logvar, RTOL)
    latents = np.asarray(reference)
    decoded = tiled(CONFIG, params, latents, "decode")
    assert_close(decoded, whole(CONFIG, params, latents, "decode"), RTOL)
    # Seamless: no jump across tile borders exceeds the largest inside tiles.
    cores, _ = vae_tiling.tile_grid(*latents.shape[1:3], TILE // CONFIG.downscale, 1)
    across, inside = vae_tiling.border_jumps(decoded, (2 * cores[0], 2 * cores[1]))
    assert across <= inside, (across, inside)


def test_group_norm_statistics_are_the_whole_images():
    params = random_vae_params(CONFIG)
    images = smooth_images(37, 50)
    latents = np.asarray(whole(CONFIG, params, images, "encode")[0])
    for part, x, method in (("encoder", images, "encode"), ("decoder", latents, "decode")):
        reference = whole_image_statistics(CONFIG, params, x, method)
        ours = jax.jit(lambda p, x: vae_tiling.group_norm_statistics(p, CONFIG, x, part, TILE))(params, x)
        assert ours.keys() == reference.keys() and len(ours) == (10 if part == "encoder" else 14)
        for path, (mean, var) in reference.items():
            np.testing.assert_allclose(ours[path][0], mean, atol=1e-5 * float(np.max(np.abs(mean))) + 1e-6,
                                       err_msg=path)
            np.testing.assert_allclose(ours[path][1], var, rtol=1e-4, err_msg=path)


def test_bfloat16_keeps_fp32_statistics():
    config = dataclasses.replace(CONFIG, dtype="bfloat16")
    params = random_vae_params(config)
    images = smooth_images(37, 50)
    stats = jax.jit(lambda p, x: vae_tiling.group_norm_statistics(p, config, x, "encoder", TILE))(params, images)
    reference = whole_image_statistics(config, params, images, "encode")
    for path, (mean, var) in stats.items():
        assert mean.dtype == var.dtype == jnp.float32
        np.testing.assert_allclose(var, reference[path][1], rtol=0.05, err_msg=path)
    ours, ref = tiled(config, params, images, "encode")[0], whole(config, params, images, "encode")[0]
    assert ours.dtype == jnp.float32
    assert float(np.mean(np.abs(ours - ref))) < 0.02 * float(np.max(np.abs(ref)))


def test_checks_and_pixel_pass_through():
    with pytest.raises(ValueError, match="multiple of the downscale"):
        vae_tiling.decode({}, CONFIG, np.zeros((1, 8, 8, 4), np.float32), tile=15)
    pixel = VAEConfig.pixel(downscale=2, latent_channels=12)
    images = smooth_images(40, 40, batch=1)
    mean, _ = vae_tiling.encode({}, pixel, images, tile=8)
    np.testing.assert_allclose(vae_tiling.decode({}, pixel, mean, tile=8), images, atol=1e-5)


def test_pipeline_with_tiled_vae_matches_whole(tmp_path):
    # The tiled pipeline equals the untiled one up to float rounding.
    transformer = tiny_config().replace(in_channels=CONFIG.latent_channels, out_channels=CONFIG.latent_channels)
    path = bundle.save_bundle(tmp_path / "b", student_config=transformer, student_params=random_params(transformer, 0),
                              autoencoder_config=CONFIG, autoencoder_params=random_vae_params(CONFIG),
                              null_embeddings=random_embeddings(1))
    image = lr_crop("astronaut", 12, 20, 100, 180)  # -> 48 x 80 pixels, 24 x 40 latents
    outputs = [SRPipeline.from_checkpoint(path, process_size=48, vae_tile=tile)(image, seed=0)
               for tile in (32, 0)]
    diff = np.abs(outputs[0].astype(np.int32) - outputs[1].astype(np.int32))
    assert outputs[0].shape == (48, 80, 3) and diff.max() <= 1 and np.mean(diff > 0) < 1e-2
    with pytest.raises(ValueError, match="vae_tile"):
        SRPipeline.from_checkpoint(path, vae_tile=3)


SD3, THREE_LEVELS = VAEConfig.sd3(), VAEConfig(block_out_channels=(128, 256, 512), downscale=4)


def test_the_vae_tile_follows_the_vae_and_the_memory_budget():
    # On a CPU host's budget (8 GiB) the SD3 VAE runs images up to 1472² whole. The three-level VAE's mid-block
    # attention sees 4x the positions of an image, but in chunks of keys (4.5 GiB at a 1024² output instead of
    # the 34 GB of whole score matrices), so its full-resolution activations bound it: 1344².
    assert vae_tiling.tile_for_budget(SD3, memory.CPU_BUDGET) == 1472
    assert vae_tiling.tile_for_budget(THREE_LEVELS, memory.CPU_BUDGET) == 1344
    assert vae_tiling.whole_bytes(THREE_LEVELS, 1024, 1024) < 5 * 2**30
    assert vae_tiling.tile_for_budget(THREE_LEVELS, 80 * 2**30) > vae_tiling.tile_for_budget(THREE_LEVELS, 2**30)
    assert vae_tiling.tile_for_budget(VAEConfig.pixel(downscale=4, latent_channels=48), memory.CPU_BUDGET) == 0
    # SR settings take it by default (this host: a CPU): a 1024² output of the three-level VAE runs whole, a
    # 2048² one in tiles.
    resolved = SRSettings(tile_batch=16).resolve(tiny_config(), THREE_LEVELS)
    assert resolved.vae_tile == 1344 and not vae_tiling.needs_tiling(1024, 1024, resolved.vae_tile)
    assert vae_tiling.needs_tiling(2048, 2048, resolved.vae_tile)
    assert SRSettings(vae_tile=0, tile_batch=16).resolve(tiny_config(), THREE_LEVELS).vae_tile == 0  # as chosen


@pytest.mark.parametrize("name, side", [("sd3", 128), ("sd3", 256), ("three_levels", 256), ("three_levels", 512)])
def test_whole_bytes_bounds_the_compiled_temporaries(name, side):
    """The untiled pass (mid-block attention in key chunks) against the estimate that sizes the VAE tile."""
    config = {"sd3": SD3, "three_levels": THREE_LEVELS}[name]
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract_params(config))
    latent = side // config.downscale
    inputs = {"encode": jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32),
              "decode": jax.ShapeDtypeStruct((1, latent, latent, config.latent_channels), jnp.float32)}
    estimate = vae_tiling.whole_bytes(config, side, side)
    for method, x in inputs.items():
        fn = vae_tiling.encode if method == "encode" else vae_tiling.decode
        apply = jax.jit(lambda p, x: fn(p, config, x, 0))
        temporaries = apply.lower(params, x).compile().memory_analysis().temp_size_in_bytes
        assert temporaries <= estimate, (method, temporaries, estimate)
        if method == "decode":
            assert temporaries >= 0.5 * estimate, (temporaries, estimate)

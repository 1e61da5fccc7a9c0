"""Sampling: time grids vs diffusers, samplers (student cosine grid, teacher Euler + CFG vs diffusers' scheduler),
latent tiling, colour correction vs a torch reimplementation of StableSR's colorfix, bundles and the SR pipeline
(seeding independent of batching, teacher bundles)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from smfsr_jax.convert import tensors
from smfsr_jax.convert.vae import abstract_params as vae_abstract_params
from smfsr_jax.core import memory, schedules
from smfsr_jax.models import mmdit
from smfsr_jax.models.vae import VAEConfig
from smfsr_jax.sampling import color, pipeline, samplers, settings, tiling
from smfsr_jax.sampling.model import SRModel
from smfsr_jax.sampling.runner import SRPipeline
from smfsr_jax.sampling.settings import SRSettings
from smfsr_jax.weights import bundle
from tests.conftest import import_torch

# The tiny SD3 text stack's widths (tests/text_fixtures.py: T5 d_model 96, CLIP projections 32 + 40), so that
# captions can be encoded for this transformer; NULL = 77 CLIP + 8 T5 tokens.
TINY_JOINT_DIM, TINY_POOLED_DIM, T5_TOKENS = 96, 72, 8
PIXEL_AUTOENCODER = VAEConfig.pixel(downscale=8, latent_channels=192)  # SD3's factor 8, exact, no weights


def tiny_config(kind: str = "student") -> mmdit.MMDiTConfig:
    """One joint block (the context-pre-only last block, LR stream included): the sampling code sees the whole
    interface (text, pooled, t, r, LR latents) and compiles in about a second. test_mmdit covers deeper stacks."""
    make = mmdit.MMDiTConfig.tiny_student if kind == "student" else mmdit.MMDiTConfig.tiny_teacher
    return make(num_layers=1, dual_attention_layers=(), in_channels=192, out_channels=192, pos_embed_max_size=64,
                joint_attention_dim=TINY_JOINT_DIM, pooled_projection_dim=TINY_POOLED_DIM)


def random_params(config: mmdit.MMDiTConfig, seed: int):
    """Seeded random weights of the right shapes (abstract shapes: no init compilation). Kernels ~ 1/sqrt(fan_in),
    norm scales ~ 1, and the zero-initialised LR-stream weights non-zero so that the LR latent matters."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        if path.endswith("scale"):
            return 1.0 + 0.1 * rng.standard_normal(shape)
        if len(shape) == 1 or path.endswith("bias"):
            return 0.1 * rng.standard_normal(shape)
        return rng.standard_normal(shape) / np.sqrt(shape[-2])

    flat = tensors.flatten(mmdit.abstract_params(config))
    return tensors.unflatten({k: leaf(k, v.shape).astype(np.float32) for k, v in flat.items()})


def random_embeddings(seed: int, tokens: int = 77 + T5_TOKENS):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((tokens, TINY_JOINT_DIM)).astype(np.float32),
            rng.standard_normal((TINY_POOLED_DIM,)).astype(np.float32))


def make_bundle(dst, kind: str = "student", seed: int = 0, **kwargs) -> str:
    config = tiny_config(kind)
    return bundle.save_bundle(dst, student_config=config, student_params=random_params(config, seed),
                              autoencoder_config=PIXEL_AUTOENCODER, autoencoder_params={},
                              null_embeddings=random_embeddings(seed + 1), **kwargs)


def lr_crop(name: str, height: int, width: int, top: int = 0, left: int = 0) -> np.ndarray:
    """An (height, width) crop of a scikit-image sample picture, as 8-bit RGB."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[top:top + height, left:left + width, :3])


def small_pipeline(bundle_dir: str, **options) -> SRPipeline:
    """process_size 128: 32² LR inputs become 128² (16² latents), so runs cost milliseconds."""
    return SRPipeline.from_checkpoint(bundle_dir, process_size=128, **options)


# ------------------------------------------------------------------------------------------------ grids

@pytest.mark.parametrize("steps", [1, 2, 4, 28, 40, 50])
def test_sd3_sampling_sigmas_match_diffusers(steps):
    import_torch()
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    sigmas = schedules.sd3_sampling_sigmas(steps)
    np.testing.assert_array_equal(sigmas, scheduler.sigmas.numpy())
    np.testing.assert_array_equal(sigmas[:-1] * np.float32(1000), scheduler.timesteps.numpy())
    if steps > 1:  # the double-shift quirk: the smallest non-zero sigma is shift(shift(0.001))
        np.testing.assert_allclose(sigmas[-2], schedules.shift_sigmas(schedules.shift_sigmas(0.001)), rtol=1e-6)


def test_cosine_grid():
    torch = import_torch()
    np.testing.assert_array_equal(schedules.cosine_grid(1), [1.0, 0.0])
    np.testing.assert_array_equal(schedules.cosine_grid(2), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(schedules.cosine_grid(4), [1, 0.8535534, 0.5, 0.1464466, 0], atol=1e-7)
    for steps in range(1, 9):  # SMFSR create_cosine_schedule, flipped (float32 ulp differences from linspace)
        reference = (0.5 * (1 - torch.cos(np.pi * torch.linspace(0, 1, steps + 1)))).flip(0).numpy()
        np.testing.assert_allclose(schedules.cosine_grid(steps), reference, rtol=0, atol=2.5e-7)
    with pytest.raises(ValueError):
        schedules.cosine_grid(0)


# ------------------------------------------------------------------------------------------------ samplers

def _toy_apply(latents, *, context, pooled, t, r=None, lr_latents):
    """A nonlinear stand-in for the MM-DiT apply function, depending on every input."""
    scale = t[:, None, None, None] - (0.0 if r is None else 0.5 * r[:, None, None, None])
    text = jnp.mean(context, axis=(1, 2))[:, None, None, None] + jnp.mean(pooled, axis=1)[:, None, None, None]
    return jnp.sin(latents) * scale + 0.3 * lr_latents + 0.1 * text


def _sampler_inputs(batch=2, size=(4, 6), channels=3, tokens=5, seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch,) + size + (channels,)).astype(np.float32)
    lr = rng.standard_normal(noise.shape).astype(np.float32)
    cond = {k: rng.standard_normal((batch,) + shape).astype(np.float32) for k, shape in (
        (samplers.CONTEXT, (tokens, 8)), (samplers.POOLED, (7,)),
        (samplers.NEGATIVE_CONTEXT, (tokens, 8)), (samplers.NEGATIVE_POOLED, (7,)))}
    return noise, lr, cond


def test_one_step_equals_one_step_cosine_loop():
    noise, lr, cond = _sampler_inputs()
    velocity = samplers.student_velocity(_toy_apply)
    one = jax.jit(lambda n, l, c: samplers.one_step(velocity, n, l, c))(noise, lr, cond)
    loop = jax.jit(lambda n, l, c: samplers.euler_sample(velocity, n, l, c, schedules.cosine_grid(1)))(noise, lr, cond)
    np.testing.assert_array_equal(np.asarray(one), np.asarray(loop))
    expected = noise - np.asarray(_toy_apply(noise, context=cond["context"], pooled=cond["pooled"], t=np.ones(2),
                                             r=np.zeros(2), lr_latents=lr))
    np.testing.assert_allclose(np.asarray(one), expected, rtol=1e-6, atol=1e-6)


def test_student_cosine_steps():
    noise, lr, cond = _sampler_inputs()
    grid = schedules.cosine_grid(4)
    ours = jax.jit(lambda n: samplers.euler_sample(samplers.student_velocity(_toy_apply), n, lr, cond, grid))(noise)
    z = noise
    for t, r in zip(grid[:-1], grid[1:]):  # z <- z + (r - t) u(z, r, t)
        u = _toy_apply(z, context=cond["context"], pooled=cond["pooled"], t=np.full(2, t), r=np.full(2, r),
                       lr_latents=lr)
        z = z + (r - t) * np.asarray(u)
    np.testing.assert_allclose(np.asarray(ours), z, rtol=1e-5, atol=1e-5)


def test_teacher_cfg_euler_matches_diffusers_scheduler():
    torch = import_torch()
    from diffusers import FlowMatchEulerDiscreteScheduler
    noise, lr, cond = _sampler_inputs()
    steps, scale = 5, 4.5
    batches = []

    def recording_apply(latents, **kwargs):
        batches.append(latents.shape[0])
        return _toy_apply(latents, **kwargs)

    velocity = samplers.teacher_velocity(recording_apply, scale)
    ours = jax.jit(lambda n: samplers.euler_sample(velocity, n, lr, cond, schedules.sd3_sampling_sigmas(steps)))(noise)
    assert batches == [4]  # both CFG branches in one 2B call

    def branch(z, t, which):
        prefix = "negative_" if which == "uncond" else ""
        v = _toy_apply(z, context=cond[prefix + "context"], pooled=cond[prefix + "pooled"], t=np.full(2, t),
                       lr_latents=lr)
        return torch.from_numpy(np.array(v))

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    z = torch.from_numpy(noise)
    for timestep in scheduler.timesteps:
        sigma = float(timestep) / 1000
        v_uncond, v_cond = branch(z.numpy(), sigma, "uncond"), branch(z.numpy(), sigma, "cond")
        z = scheduler.step(v_uncond + scale * (v_cond - v_uncond), timestep, z).prev_sample
    np.testing.assert_allclose(np.asarray(ours), z.numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ tiling

def test_tile_origins_and_weights():
    assert tiling.tile_origins(128, 64, 24) == (0, 40, 64)  # RealLQ250's 128² latents
    assert tiling.tile_origins(64, 64, 24) == (0,)
    assert tiling.tile_origins(91, 64, 24) == (0, 27)
    assert tiling.tile_origins(150, 64, 24) == (0, 40, 80, 86)
    assert not tiling.needs_tiling(64, 64, 64, 2) and tiling.needs_tiling(64, 65, 64, 2)
    assert tiling.needs_tiling(32, 32, 64, 2) is False and tiling.needs_tiling(31, 32, 64, 2)
    # Under the area limit but longer than the positional grid (patch 2 x 16 positions = 32 latent pixels).
    assert not tiling.needs_tiling(16, 200, 64, 2) and tiling.needs_tiling(16, 200, 64, 2, max_side=32)
    # Upstream _gaussian_weights: rows use midpoint T/2, columns (T - 1)/2.
    tile = 64
    x = np.arange(tile)
    gauss = lambda m: np.exp(-(x - m) ** 2 / (tile * tile) / (2 * 0.01)) / np.sqrt(2 * np.pi * 0.01)
    np.testing.assert_allclose(tiling.tile_weights(tile), np.outer(gauss(tile / 2), gauss((tile - 1) / 2)), rtol=1e-6)
    weights = tiling.tile_weights(tile)
    assert np.argmax(weights[:, 0]) == 32 and weights[0, 31] == weights[0, 32]


@pytest.mark.parametrize("height,width,tile,overlap", [(128, 128, 64, 24), (91, 64, 64, 24), (150, 100, 64, 24),
                                                        (37, 51, 16, 6), (20, 96, 64, 24)])
def test_tile_weights_cover_and_normalise(height, width, tile, overlap):
    layout = tiling.tile_layout(height, width, tile, overlap, patch_size=2)
    assert layout.tile % 2 == 0 and layout.tile <= min(tile, height, width)
    total = layout.weight_sum()
    assert np.all(total > 0)  # every latent pixel is covered
    normalised = np.zeros((height, width))
    for y, x in layout.boxes:
        normalised[y:y + layout.tile, x:x + layout.tile] += layout.weights / total[y:y + layout.tile, x:x + layout.tile]
    np.testing.assert_allclose(normalised, 1.0, rtol=1e-6)


def _pointwise_velocity(z, lr, cond, t, r):
    """Translation-equivariant (pointwise) with per-image conditioning: tiling must not change it."""
    return jnp.tanh(z) * (1.0 + lr) * t + r + jnp.mean(cond[samplers.POOLED], axis=1)[:, None, None, None]


def _constant_velocity(z, lr, cond, t, r):
    return jnp.broadcast_to(jnp.mean(cond[samplers.CONTEXT], axis=(1, 2))[:, None, None, None], z.shape)


@pytest.mark.parametrize("velocity_fn", [_pointwise_velocity, _constant_velocity])
def test_tiled_equals_untiled_for_equivariant_models(velocity_fn):
    noise, lr, cond = _sampler_inputs(batch=3, size=(37, 52), channels=4)
    shapes = []

    def recording(z, *args):
        shapes.append(z.shape)
        return velocity_fn(z, *args)

    tiled = tiling.tiled_velocity(recording, tile_size=16, overlap=6, tile_batch=8, patch_size=2)
    ours = jax.jit(lambda n: samplers.euler_sample(tiled, n, lr, cond, schedules.cosine_grid(2)))(noise)
    reference = jax.jit(lambda n: samplers.euler_sample(velocity_fn, n, lr, cond, schedules.cosine_grid(2)))(noise)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-5)
    # 4 x 5 tiles x 3 images = 60 tile rows, run as chunks of 8 through one traced network call
    assert shapes == [(8, 16, 16, 4)]


def test_tiling_with_the_mmdit():
    config = tiny_config()
    params = random_params(config, seed=3)
    apply_fn = lambda z, **kw: mmdit.MMDiT(config).apply({"params": params}, z, **kw)
    velocity = samplers.student_velocity(apply_fn)
    rng = np.random.default_rng(0)
    z, lr = (rng.standard_normal((2, 16, 24, 192)).astype(np.float32) for _ in range(2))
    context, pooled = random_embeddings(5, tokens=6)
    cond = {"context": np.stack([context, -context]), "pooled": np.stack([pooled, 2 * pooled])}
    t, r = np.float32(1.0), np.float32(0.0)
    plain = jax.jit(velocity)
    tiled = jax.jit(tiling.tiled_velocity(velocity, tile_size=16, overlap=8, tile_batch=3, patch_size=2))

    # Fits one tile: the tiled run is the untiled one.
    np.testing.assert_array_equal(np.asarray(tiled(z[:, :, :16], lr[:, :, :16], cond, t, r)),
                                  np.asarray(plain(z[:, :, :16], lr[:, :, :16], cond, t, r)))

    # Two tiles (x origins 0 and 8) of two images, in chunks of 3: the Gaussian blend of per-tile outputs.
    ours = tiled(z, lr, cond, t, r)
    weights = tiling.tile_weights(16)[None, :, :, None]
    blend, total = np.zeros(z.shape, np.float32), np.zeros(z.shape, np.float32)
    for x in (0, 8):
        blend[:, :, x:x + 16] += np.asarray(plain(z[:, :, x:x + 16], lr[:, :, x:x + 16], cond, t, r)) * weights
        total[:, :, x:x + 16] += weights
    np.testing.assert_allclose(np.asarray(ours), blend / total, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ colour

def _torch_colorfix(torch, target, source, method):
    """StableSR colorfix.py (adain_color_fix / wavelet_color_fix), reimplemented on NCHW float tensors in [0, 1].
    Returns (float result before clamping, uint8 result as ToPILImage makes it)."""
    import torch.nn.functional as F

    def mean_std(feat, eps=1e-5):
        b, c = feat.shape[:2]
        var = feat.reshape(b, c, -1).var(dim=2) + eps
        return feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(b, c, 1, 1)

    def blur(image, radius):
        kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])
        kernel = kernel[None, None].repeat(3, 1, 1, 1)
        image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
        return F.conv2d(image, kernel, groups=3, dilation=radius)

    def decompose(image, levels=5):
        high = torch.zeros_like(image)
        for i in range(levels):
            low = blur(image, 2 ** i)
            high += image - low
            image = low
        return high, low

    if method == "adain":
        target_mean, target_std = mean_std(target)
        source_mean, source_std = mean_std(source)
        result = (target - target_mean) / target_std * source_std + source_mean
    else:
        result = decompose(target)[0] + decompose(source)[1]
    return result, result.clamp(0.0, 1.0).mul(255).byte()


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_color_fix_matches_stablesr(method):
    torch = import_torch()
    sr = np.stack([lr_crop("astronaut", 72, 88), lr_crop("coffee", 72, 88, 100, 200)])
    source = np.clip(sr.astype(np.int32) // 2 + np.array([60, 10, -5]), 0, 255).astype(np.uint8)[:, ::-1]
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().div(255)
    ref_float, ref_uint8 = _torch_colorfix(torch, to_torch(sr), to_torch(source), method)
    ref_float, ref_uint8 = (t.permute(0, 2, 3, 1).numpy() for t in (ref_float, ref_uint8))
    fix = color.adain if method == "adain" else color.wavelet
    ours_float = np.asarray(fix(sr.astype(np.float32) / 255, source.astype(np.float32) / 255))
    assert np.max(np.abs(ours_float - ref_float)) <= 1e-5 * np.max(np.abs(ref_float))
    ours = np.asarray(jax.jit(color.color_fix, static_argnums=(2,))(sr, source, method))
    assert ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref_uint8.astype(int))
    assert diff.max() <= 1 and np.mean(diff) < 1e-3  # truncation at an integer boundary may flip by one level
    np.testing.assert_array_equal(np.asarray(color.color_fix(sr, source, "none")), sr)


def test_color_fix_truncates():
    sr = np.full((1, 4, 4, 3), 77, np.uint8)
    source = np.zeros((1, 4, 4, 3), np.uint8)
    source[..., 0] = np.arange(16).reshape(4, 4) * 16  # red mean 120, other channels 0
    out = np.asarray(color.color_fix(sr, source, "adain"))
    # a constant image keeps no variance: every pixel takes the source mean, 120 -> 120/255*255 truncated
    assert np.all(out[..., 0] == int(np.float32(120 / 255) * np.float32(255))) and np.all(out[..., 1:] == 0)
    with pytest.raises(ValueError):
        color.color_fix(sr, source, "histogram")


# ------------------------------------------------------------------------------------------------ bundle

def test_bundle_round_trip(tmp_path):
    config = tiny_config("student").replace(in_channels=16, out_channels=16)
    params = random_params(config, seed=1)
    vae_config = VAEConfig.tiny()
    rng = np.random.default_rng(2)
    vae_params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                              vae_abstract_params(vae_config))
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    null, negative = random_embeddings(3), random_embeddings(4)
    path = bundle.save_bundle(tmp_path / "b", student_config=config, student_params=params,
                              autoencoder_config=vae_config, autoencoder_params=vae_params, null_embeddings=null,
                              negative_embeddings=negative, text_encoders_dir=str(text_dir), meta={"stage": 1})
    loaded = bundle.load_bundle(path)
    assert loaded.kind == "student" and loaded.meta == {"stage": 1}
    assert loaded.transformer_config == config and loaded.autoencoder_config == vae_config
    assert loaded.text_encoders_dir == str(text_dir)
    for ours, ref in ((loaded.transformer_params, params), (loaded.autoencoder_params, vae_params)):
        flat_ours, flat_ref = tensors.flatten(ours), tensors.flatten(ref)
        assert flat_ours.keys() == flat_ref.keys()
        assert all(np.array_equal(flat_ours[k], flat_ref[k]) for k in flat_ref)
    for ours, ref in ((loaded.null_embeddings, null), (loaded.negative_embeddings, negative)):
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_array_equal(ours[1], ref[1])

    with pytest.raises(ValueError, match="null_embeddings"):
        bundle.save_bundle(tmp_path / "bad", student_config=config, student_params=params,
                           autoencoder_config=vae_config, autoencoder_params=vae_params,
                           null_embeddings=(null[0][:, :10], null[1]))
    with pytest.raises(ValueError, match="latent_channels"):
        bundle.save_bundle(tmp_path / "bad", student_config=config, student_params=params,
                           autoencoder_config=PIXEL_AUTOENCODER, autoencoder_params={}, null_embeddings=null)
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        bundle.load_bundle(tmp_path)


def test_pixel_bundle_and_copied_text_encoders(tmp_path, student_bundle):
    loaded = bundle.load_bundle(student_bundle)
    assert loaded.autoencoder_config == PIXEL_AUTOENCODER and loaded.autoencoder_params == {}
    assert loaded.text_encoders_dir is None and loaded.negative_embeddings is None
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    (text_dir / "marker").write_text("x")
    copied = make_bundle(tmp_path / "copied", text_encoders_dir=str(text_dir), copy_text_encoders=True)
    assert bundle.load_bundle(copied).text_encoders_dir == str(tmp_path / "copied" / "text_encoders")
    assert (tmp_path / "copied" / "text_encoders" / "marker").exists()


# ------------------------------------------------------------------------------------------------ pipeline

def test_lr_preprocessing():
    # min side < 128: scale 128/37 -> (183, 128), x4 -> (732, 512), floor to 8 -> (728, 512); (width, height)
    assert pipeline.resize_plan(37, 53, multiple=8) == [(183, 128), (732, 512), (728, 512)]
    assert pipeline.resize_plan(128, 128, multiple=8) == [(512, 512), (512, 512)]
    image = lr_crop("astronaut", 37, 53)
    prepared = pipeline.prepare_lr(image, multiple=8)
    assert prepared.shape == (512, 728, 3) and prepared.dtype == np.uint8
    from PIL import Image
    expected = Image.fromarray(image).resize((183, 128), Image.BICUBIC).resize((732, 512), Image.BICUBIC)
    np.testing.assert_array_equal(prepared, np.asarray(expected.resize((728, 512), Image.BICUBIC)))


def _assert_same_up_to_rounding(ours, reference):
    """XLA kernels depend on the batch size, so float rounding can move an 8-bit value by one at a few pixels (< 1%)."""
    diff = np.abs(np.asarray(ours, np.int32) - np.asarray(reference, np.int32))
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-2, (diff.max(), np.mean(diff > 0))


def test_seeds_are_per_image_and_independent_of_batching(student_bundle):
    # The random draws of image k depend only on (seed, k): the same in any batch, exactly.
    keys = pipeline.image_keys(3, [4, 0, 5])
    np.testing.assert_array_equal(np.asarray(keys[2]), np.asarray(jax.random.fold_in(jax.random.PRNGKey(3), 5)))
    batch_noise = np.asarray(pipeline.initial_noise(keys, (6, 4, 8)))
    np.testing.assert_array_equal(batch_noise[2], np.asarray(pipeline.initial_noise(keys[2:], (6, 4, 8)))[0])
    np.testing.assert_array_equal(batch_noise[0], np.asarray(jax.random.normal(keys[0], (6, 4, 8))))

    images = [lr_crop("astronaut", 32, 32, 100, 180), lr_crop("chelsea", 32, 32, 60, 150)]
    one_at_a_time = small_pipeline(student_bundle, batch_size=1)
    batched = small_pipeline(student_bundle, batch_size=2)
    outputs = one_at_a_time(images, seed=3)
    assert all(o.shape == (128, 128, 3) and o.dtype == np.uint8 for o in outputs)
    for ours, ref in zip(batched(images, seed=3), outputs):
        _assert_same_up_to_rounding(ours, ref)
    _assert_same_up_to_rounding(batched(images[1:], seed=3, indices=[1])[0], outputs[1])  # a padded batch
    # The noise follows (seed, index), not the position in the call; another seed or index changes the output.
    np.testing.assert_array_equal(one_at_a_time(images[1], seed=3, indices=[1]), outputs[1])
    assert np.mean(one_at_a_time(images[1], seed=3) != outputs[1]) > 0.1
    assert np.mean(one_at_a_time(images[0], seed=4) != outputs[0]) > 0.1
    with pytest.raises(ValueError, match="teacher"):
        one_at_a_time(images[0], guidance_scale=4.0)


def test_settings_own_the_defaults_and_key_the_compiled_function(student_bundle, tmp_path):
    student = SRModel.from_checkpoint(student_bundle)
    teacher = SRModel.from_checkpoint(make_bundle(tmp_path / "teacher", kind="teacher"))

    def resolve(model, trained_tile=None, **chosen):
        return SRSettings(**chosen).resolve(model.transformer_config, model.autoencoder_config, trained_tile,
                                            text_tokens=77 + T5_TOKENS)

    defaults = resolve(student)
    assert (defaults.steps, defaults.guidance_scale, defaults.tile_size, defaults.tile_overlap) == (1, 1.0, 64, 24)
    assert (resolve(teacher).steps, resolve(teacher).guidance_scale) == (40, 8.0)
    # An explicit default is the same settings value, so the same compiled function.
    assert resolve(student, steps=1, tile_size=64) == defaults and resolve(student, tile_overlap=24) == defaults
    make = functools.partial(pipeline.make_sr_function, student.transformer_config, student.autoencoder_config)
    assert make(resolve(student, steps=1)) is make(defaults) and make(resolve(student, steps=2)) is not make(defaults)
    # The trained tile is the default, capped by the positional grid; the overlap follows the tile.
    grid = settings.positional_grid(student.transformer_config)
    assert (resolve(student, trained_tile=32).tile_size, resolve(student, trained_tile=32).tile_overlap) == (32, 12)
    assert resolve(student, trained_tile=10 * grid).tile_size == grid
    for chosen, message in (({"tile_size": grid + 2}, "positional"), ({"tile_overlap": 64}, "tile_overlap"),
                            ({"guidance_scale": 2.0}, "teacher"), ({"color_fix": "histogram"}, "color_fix"),
                            ({"vae_tile": 12}, "vae_tile"), ({"batch_size": 0}, "batch_size"),
                            ({"steps": 0}, "steps")):
        with pytest.raises(ValueError, match=message):
            resolve(student, **chosen)
    with pytest.raises(ValueError, match="resolve"):
        make(SRSettings())


def test_the_tile_batch_follows_the_network_and_the_memory_budget():
    # SD3.5-M at SMFSR's 64² tiles: 2381 tokens, ~1.75 GB a tile; a CPU host's 8 GiB holds 4 a call, 2 under CFG.
    sd35 = mmdit.MMDiTConfig.smfsr_student()
    assert tiling.tile_batch_for_budget(sd35, 64, 333, False, memory.CPU_BUDGET) == 4
    assert tiling.tile_batch_for_budget(sd35, 64, 333, True, memory.CPU_BUDGET) == 2
    assert tiling.tile_batch_for_budget(sd35, 64, 333, False, 2**20) == 1  # never below one
    # The estimate bounds XLA's compiled temporaries of a network call from above, and not by much.
    for heads, head_dim, tile, batch in ((8, 64, 32, 1), (8, 64, 16, 4), (4, 32, 32, 2)):
        config = tiny_config().replace(num_layers=2, num_heads=heads, head_dim=head_dim, in_channels=16,
                                       out_channels=16, dual_attention_layers=())
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), mmdit.abstract_params(config))
        z = jax.ShapeDtypeStruct((batch, tile, tile, 16), jnp.float32)
        context = jax.ShapeDtypeStruct((batch, 77 + T5_TOKENS, TINY_JOINT_DIM), jnp.float32)
        pooled = jax.ShapeDtypeStruct((batch, TINY_POOLED_DIM), jnp.float32)
        t = jax.ShapeDtypeStruct((batch,), jnp.float32)
        apply = jax.jit(lambda p, z, c, y, t: mmdit.MMDiT(config).apply({"params": p}, z, context=c, pooled=y, t=t,
                                                                        r=t, lr_latents=z))
        temporaries = apply.lower(params, z, context, pooled, t).compile().memory_analysis().temp_size_in_bytes
        estimate = batch * tiling.tile_bytes(config, tile, 77 + T5_TOKENS)
        assert 0.6 * estimate <= temporaries <= estimate, (heads, tile, batch, temporaries / estimate)


def test_teacher_bundle_uses_the_teacher_sampler(tmp_path):
    path = make_bundle(tmp_path / "teacher", kind="teacher", negative_embeddings=random_embeddings(9))
    teacher = small_pipeline(path)
    assert teacher.model.kind == "teacher"
    np.testing.assert_array_equal(teacher.settings.times("teacher"),
                                  schedules.sd3_sampling_sigmas(settings.TEACHER_STEPS))
    assert teacher.settings.guidance_scale == settings.TEACHER_GUIDANCE
    out = teacher(lr_crop("astronaut", 32, 40, 200, 200), seed=1, steps=2, guidance_scale=3.0)
    assert out.shape == (128, 160, 3) and out.dtype == np.uint8

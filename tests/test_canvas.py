"""SR on canvases (sampling/canvas.py): the masked autoencoder, noise and colour fix see only the image, and a
folder of many sizes compiles a fixed number of functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.core import cache
from smfsr_jax.models import vae, vae_tiling
from smfsr_jax.sampling import canvas, color
from smfsr_jax.sampling.runner import SRInput, SRPipeline, super_resolve
from tests.test_sampling import lr_crop, make_bundle

HEIGHT, WIDTH = 40, 24  # an image inside a 64 x 48 canvas


def on_canvas(image, shape, rng):
    """image at the top left of a canvas of `shape` filled with noise (what lies there must not matter)."""
    filled = rng.uniform(-3, 3, (image.shape[0], *shape, image.shape[-1])).astype(image.dtype)
    filled[:, :image.shape[1], :image.shape[2]] = image
    return filled


@pytest.mark.parametrize("tile", [0, 16])
def test_kl_autoencoder_on_a_canvas_is_the_image_alone(tile):
    """Whole (one masked pass) and tiled (traced size): within float rounding of the untiled VAE on the image."""
    config = vae.VAEConfig.tiny()
    f = config.downscale
    params = vae.AutoencoderKL(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
    size = (jnp.int32(HEIGHT), jnp.int32(WIDTH))
    model = vae.AutoencoderKL(config)
    mean, _ = model.apply({"params": params}, image, method="encode")
    got, _ = jax.jit(lambda x, s: vae_tiling.encode(params, config, x, tile, s))(on_canvas(image, (64, 48), rng), size)
    np.testing.assert_allclose(np.asarray(got)[:, :HEIGHT // f, :WIDTH // f], mean, atol=2e-5 * np.abs(mean).max())
    latents = np.asarray(mean)
    decoded = model.apply({"params": params}, latents, method="decode")
    got = jax.jit(lambda z, s: vae_tiling.decode(params, config, z, tile, s))(
        on_canvas(latents, (64 // f, 48 // f), rng), size)
    np.testing.assert_allclose(np.asarray(got)[:, :HEIGHT, :WIDTH], decoded, atol=2e-5 * np.abs(decoded).max())


def test_wavelet_autoencoder_on_a_canvas_is_the_image_alone():
    model = vae.PixelAutoencoder(vae.VAEConfig.pixel(downscale=4, latent_channels=48, pixel_basis="wavelet"))
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
    size = (jnp.int32(HEIGHT), jnp.int32(WIDTH))
    want, _ = model.apply({}, image, method="encode")
    got = jax.jit(lambda x, s: model.apply({}, x, s, method="encode")[0])(on_canvas(image, (64, 48), rng), size)
    np.testing.assert_allclose(np.asarray(got)[:, :HEIGHT // 4, :WIDTH // 4], want, atol=1e-5)
    back = jax.jit(lambda z, s: model.apply({}, z, s, method="decode"))(got, size)
    np.testing.assert_allclose(np.asarray(back)[:, :HEIGHT, :WIDTH], image, atol=1e-5)


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_colour_fix_on_a_canvas_is_the_image_alone(method):
    rng = np.random.default_rng(2)
    sr, lr = (rng.integers(0, 256, (2, HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(2))
    want = np.asarray(color.color_fix(sr, lr, method))
    fix = jax.jit(lambda a, b, s: color.color_fix(a, b, method, size=s))
    got = fix(on_canvas(sr, (64, 48), rng), on_canvas(lr, (64, 48), rng), (jnp.int32(HEIGHT), jnp.int32(WIDTH)))
    # Sums in another order may move a truncated 8-bit value by one level.
    difference = np.abs(np.asarray(got)[:, :HEIGHT, :WIDTH].astype(int) - want)
    assert difference.max() <= 1 and difference.mean() < 0.01


def test_noise_on_a_canvas_is_the_draw_of_the_image_shape():
    key = jax.random.PRNGKey(7)
    want = jax.random.normal(key, (5, 7, 3))
    got = jax.jit(lambda v: canvas.flat_normal(key, v, (8, 16, 3)))((jnp.int32(5), jnp.int32(7)))
    np.testing.assert_allclose(np.asarray(got)[:5, :7], want, rtol=1e-6, atol=1e-6)
    assert not np.asarray(got)[5:].any() and not np.asarray(got)[:, 7:].any()


def test_canvas_ladder_chunks_and_latent_padding():
    assert [canvas.canvas_side(s, 512, 8) for s in (100, 512, 513, 769, 1100, 1537, 3000)] == \
        [512, 512, 768, 1024, 1536, 2048, 3072]
    assert canvas.canvas_side(1100, 512, 8, extra=1152) == 1152  # the VAE tile is a rung
    assert canvas.chunk_sizes(13, 8) == [8, 4, 1] and canvas.chunk_sizes(70, 37) == [32, 32, 4, 2]
    latents = np.arange(3, dtype=np.float32)[None, :, None, None] * np.ones((1, 3, 2, 1), np.float32)
    latents = np.pad(latents, ((0, 0), (0, 3), (0, 0), (0, 0)), constant_values=9)
    assert canvas.extend(latents, 3, 2, "reflect")[0, :, 0, 0].tolist() == [0, 1, 2, 1, 0, 1]
    assert canvas.extend(latents, 3, 2, "edge")[0, :, 0, 0].tolist() == [0, 1, 2, 2, 2, 2]


def test_twenty_sizes_compile_a_fixed_number_of_functions(tmp_path):
    """20 images of 20 sizes: the MM-DiT compiles for the chunk sizes it meets, the VAE once per canvas; with the
    fused per-size SR function this was one compilation per size (22 for 20, benchmarks/mixed_sizes.py)."""
    pipe = SRPipeline.from_checkpoint(make_bundle(tmp_path / "student"), process_size=128)
    inputs = [SRInput(i, lr_crop("astronaut", 24 + i, 60 - i, 100, 150)) for i in range(20)]
    before = cache.compilation_counts()
    outputs = {}
    super_resolve(pipe.model, pipe.settings, inputs, [0], lambda item, _, image: outputs.__setitem__(item.index, image))
    compiled = sum(now - then for now, then in zip(cache.compilation_counts(), before))
    assert len(outputs) == 20 and all(outputs[i].shape == (4 * (24 + i), 4 * (60 - i), 3) for i in range(20))
    assert compiled <= 8, compiled
    again = cache.compilation_counts()
    super_resolve(pipe.model, pipe.settings, [SRInput(0, lr_crop("astronaut", 37, 29))], [1], lambda *_: None)
    assert cache.compilation_counts() == again  # a new size on a canvas in use compiles nothing

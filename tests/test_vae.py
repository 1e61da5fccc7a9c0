"""SD3 VAE: fp32 parity with diffusers AutoencoderKL, both checkpoint layouts, strict loading, pixel latent."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.convert.tensors import CheckpointError, write_safetensors
from smfsr_jax.convert.vae import checkpoint_shapes, convert, load_vae
from smfsr_jax.models.vae import (AutoencoderKL, PixelAutoencoder, VAEConfig, denormalize_latents, make_autoencoder,
                                  latent_scales, normalize_latents, sample_latent)
from tests.conftest import import_torch


def _random_diffusers_vae(torch, channels, layers, groups, seed):
    """A diffusers AutoencoderKL (SD3 form: no quant convs) with every weight random, GroupNorm affine included."""
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=layers, latent_channels=16, norm_num_groups=groups,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(np.prod(p.shape[1:])))
    return model.eval()


def _torch_encode_decode(torch, model, images, latents):
    """Reference (mean, logvar, decoded) for NHWC numpy inputs."""
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
        decoded = model.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample
    return [t.permute(0, 2, 3, 1).numpy() for t in (posterior.mean, posterior.logvar, decoded)]


def _jitted(model, method):
    # One compilation per network; op-by-op dispatch compiles every op shape separately and is slower.
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=method))


def _assert_parity(config, params, images, latents, references):
    mean, logvar = _jitted(AutoencoderKL(config), "encode")(params, images)
    decoded = _jitted(AutoencoderKL(config), "decode")(params, latents)
    for name, ours, ref in zip(("mean", "logvar", "decoded"), (mean, logvar, decoded), references):
        assert ours.shape == ref.shape, name
        err = float(np.max(np.abs(np.asarray(ours) - ref)))
        assert err <= 1e-5 * float(np.max(np.abs(ref))), f"{name}: max abs error {err}"


def _inputs(config, height, width, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (2, height, width, 3)).astype(np.float32)
    f = config.downscale
    latents = rng.standard_normal((2, height // f, width // f, config.latent_channels)).astype(np.float32)
    return images, latents


@pytest.mark.parametrize("channels, layers, groups, height, width", [
    ((32, 64), 1, 8, 32, 32),
    ((32, 32, 64), 2, 16, 24, 40),
])
def test_parity_with_diffusers_directory(tmp_path, channels, layers, groups, height, width):
    torch = import_torch()
    model = _random_diffusers_vae(torch, channels, layers, groups, seed=len(channels))
    # The SD3.5 root holds the VAE as vae/; a diffusers VAE directory is read the same way.
    model.save_pretrained(tmp_path / "sd35" / "vae")
    config, params = load_vae(str(tmp_path / "sd35"))
    assert config.block_out_channels == channels and config.layers_per_block == layers
    assert config.norm_num_groups == groups and config.latent_channels == 16
    assert (config.scaling_factor, config.shift_factor) == (1.5305, 0.0609)
    images, latents = _inputs(config, height, width)
    _assert_parity(config, params, images, latents, _torch_encode_decode(torch, model, images, latents))


def _original_state_dict(channels, layers, latent, rng):
    """Random VAE weights named as the original (LDM / sd3_impls) modules build them, without prefix."""
    tensors = {}

    def conv(name, cin, cout, k=3):
        tensors[f"{name}.weight"] = rng.standard_normal((cout, cin, k, k)).astype(np.float32) / np.sqrt(cin * k * k)
        tensors[f"{name}.bias"] = 0.2 * rng.standard_normal(cout).astype(np.float32)

    def norm(name, c):
        tensors[f"{name}.weight"] = 1.0 + 0.2 * rng.standard_normal(c).astype(np.float32)
        tensors[f"{name}.bias"] = 0.2 * rng.standard_normal(c).astype(np.float32)

    def block(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, k=1)

    def mid(name, c):
        block(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{proj}", c, c, k=1)
        block(f"{name}.block_2", c, c)

    conv("encoder.conv_in", 3, channels[0])
    block_in = channels[0]
    for level, block_out in enumerate(channels):
        for j in range(layers):
            block(f"encoder.down.{level}.block.{j}", block_in, block_out)
            block_in = block_out
        if level != len(channels) - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in)
    mid("encoder.mid", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, 2 * latent)

    conv("decoder.conv_in", latent, channels[-1])
    mid("decoder.mid", channels[-1])
    block_in = channels[-1]
    for level in reversed(range(len(channels))):
        for j in range(layers + 1):
            block(f"decoder.up.{level}.block.{j}", block_in, channels[level])
            block_in = channels[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3)
    return tensors


def test_original_single_file_matches_diffusers_key_map(tmp_path):
    torch = import_torch()
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    channels, layers = (32, 32, 64), 1
    rng = np.random.default_rng(3)
    original = {f"first_stage_model.{k}": v for k, v in _original_state_dict(channels, layers, 16, rng).items()}
    unrelated = {"model.diffusion_model.x_embedder.proj.weight": np.zeros((8, 16, 2, 2), np.float32),
                 "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": np.zeros((24, 8), np.float32)}
    write_safetensors(tmp_path / "sd3.5_medium.safetensors", {**original, **unrelated})

    # diffusers' own single-file converter is the independent reference for the key map.
    block_types = {"down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
    diffusers_state = convert_ldm_vae_checkpoint(original, block_types)
    model = TorchAutoencoderKL(**block_types, block_out_channels=channels, layers_per_block=layers, latent_channels=16,
                               use_quant_conv=False, use_post_quant_conv=False).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in diffusers_state.items()},
                          strict=True)
    write_safetensors(tmp_path / "vae_diffusers.safetensors", diffusers_state)

    config, params = load_vae(str(tmp_path / "sd3.5_medium.safetensors"))
    assert config == VAEConfig(block_out_channels=channels, layers_per_block=layers, downscale=4)
    images, latents = _inputs(config, 16, 16)
    _assert_parity(config, params, images, latents, _torch_encode_decode(torch, model, images, latents))

    config_d, params_d = load_vae(str(tmp_path / "vae_diffusers.safetensors"))
    assert config_d == config
    flat, flat_d = jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(params_d)
    assert [p for p, _ in flat] == [p for p, _ in flat_d]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat, flat_d))


def test_full_size_parameter_counts():
    config = VAEConfig.sd3()
    images = jnp.zeros((1, 16, 16, 3))
    shapes = jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.key(0), images))["params"]

    def count(tree):
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

    assert count(shapes["encoder"]) == 34_274_208
    assert count(shapes["decoder"]) == 49_545_475
    assert count(shapes) == 83_819_683
    for layout in ("diffusers", "original"):
        assert sum(int(np.prod(s)) for s in checkpoint_shapes(config, layout).values()) == 83_819_683


def _tiny_file(path):
    config = VAEConfig.tiny()
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in checkpoint_shapes(config).items()}
    write_safetensors(path, tensors)
    return config, tensors


@pytest.mark.parametrize("damage", ["truncated", "renamed", "misshaped"])
def test_broken_checkpoint_names_file_and_keys(tmp_path, damage):
    path = str(tmp_path / "vae.safetensors")
    _, tensors = _tiny_file(path)
    if damage == "truncated":
        os.truncate(path, os.path.getsize(path) - 100)
        expected = ["truncated", "decoder.conv_out"]
    elif damage == "renamed":
        key = "decoder.up_blocks.1.resnets.0.norm1.weight"
        tensors["decoder.up_blocks.1.resnets.0.norm_1.weight"] = tensors.pop(key)
        write_safetensors(path, tensors)
        expected = ["missing", key, "unexpected", "decoder.up_blocks.1.resnets.0.norm_1.weight"]
    else:
        tensors["encoder.mid_block.attentions.0.to_q.weight"] = np.zeros((32, 16), np.float32)
        write_safetensors(path, tensors)
        expected = ["mis-shaped", "encoder.mid_block.attentions.0.to_q.weight", "(32, 32)", "(32, 16)"]
    with pytest.raises(CheckpointError) as info:
        load_vae(path, norm_num_groups=8)
    message = str(info.value)
    assert path in message
    for text in expected:
        assert text in message


def test_converted_directory_round_trip(tmp_path):
    src = str(tmp_path / "vae.safetensors")
    config, _ = _tiny_file(src)
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        load_vae(src)  # a single file does not record its groups; SD3's 32 do not divide the tiny widths
    config_src, params_src = load_vae(src, norm_num_groups=8)
    assert config_src == config
    dst = str(tmp_path / "converted")
    convert(src, dst, show_progress=False, norm_num_groups=8)
    with open(os.path.join(dst, "config.json")) as f:
        meta = json.load(f)["meta"]
    assert meta["layout"] == "diffusers" and meta["source"] == src
    config_dst, params_dst = load_vae(dst)
    assert config_dst == config
    assert jax.tree.structure(params_dst) == jax.tree.structure(params_src)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_src), jax.tree.leaves(params_dst)))
    # Runtime choices can be overridden on load; shapes cannot.
    assert load_vae(dst, dtype="bfloat16", remat=True)[0] == dataclasses.replace(config, dtype="bfloat16", remat=True)


def test_bfloat16_and_remat_keep_the_parameter_tree(tmp_path):
    config, _ = _tiny_file(str(tmp_path / "vae.safetensors"))
    _, params = load_vae(str(tmp_path / "vae.safetensors"), norm_num_groups=8)
    images, _ = _inputs(config, 16, 16)
    fast = dataclasses.replace(config, dtype="bfloat16", remat=True)
    fast_shapes = jax.eval_shape(AutoencoderKL(fast).init, jax.random.key(0), images)["params"]
    assert jax.tree.map(jnp.shape, fast_shapes) == jax.tree.map(jnp.shape, params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fast_shapes))
    mean, _ = _jitted(AutoencoderKL(config), "encode")(params, images)
    mean_bf16, logvar_bf16 = _jitted(AutoencoderKL(fast), "encode")(params, images)
    assert mean_bf16.dtype == logvar_bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(mean_bf16 - mean))) <= 0.05 * float(jnp.max(jnp.abs(mean)))


def test_pixel_autoencoder_is_exactly_invertible():
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
    for config in (VAEConfig.pixel(), VAEConfig.pixel(downscale=2, latent_channels=16),
                   VAEConfig.pixel(pixel_basis="wavelet"), VAEConfig.pixel(downscale=8, latent_channels=192,
                                                                           pixel_basis="wavelet")):
        model = make_autoencoder(config)
        assert isinstance(model, PixelAutoencoder)
        assert jax.eval_shape(model.init, jax.random.key(0), images).get("params", {}) == {}
        mean, logvar = _jitted(model, "encode")({}, images)
        f = config.downscale
        assert mean.shape == (2, 16 // f, 24 // f, config.latent_channels)
        assert bool(jnp.all(logvar == -30.0))
        decoded = _jitted(model, "decode")({}, mean)
        assert float(jnp.max(jnp.abs(decoded - images))) <= 1e-5
    assert (VAEConfig.pixel().scaling_factor, VAEConfig.pixel().shift_factor) == (1.0, 0.0)
    with pytest.raises(ValueError, match="latent_channels >= "):
        VAEConfig.pixel(downscale=4, latent_channels=47)
    with pytest.raises(ValueError, match="wavelet pixel latent"):
        VAEConfig.pixel(downscale=4, latent_channels=64, pixel_basis="wavelet")


def test_wavelet_latent_pixels_decode_to_overlapping_bumps():
    """An error in one latent pixel spreads past its block (no hard block edge) with the wavelet basis; the
    orthogonal basis keeps it inside."""
    latents = np.zeros((1, 4, 4, 48), np.float32)
    latents[0, 1, 1, 0] = 1.0  # the coarsest (low-pass) coefficient of red at latent pixel (1, 1)
    for basis, spreads in (("wavelet", True), ("orthogonal", False)):
        config = VAEConfig.pixel(pixel_basis=basis)
        image = np.asarray(_jitted(make_autoencoder(config), "decode")({}, latents))[0, ..., 0]
        outside = np.abs(image).sum() - np.abs(image[4:8, 4:8]).sum()
        assert (outside > 0.3 * np.abs(image).sum()) == spreads, basis


def test_latent_normalisation_and_sampling():
    config = VAEConfig.sd3()
    z = np.random.default_rng(0).standard_normal((2, 4, 4, 16)).astype(np.float32)
    normalized = np.asarray(normalize_latents(z, config))
    np.testing.assert_allclose(normalized, (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(denormalize_latents(normalized, config), z, rtol=1e-6, atol=1e-6)
    mean = np.full((4, 32, 32, 16), 0.5, np.float32)
    logvar = np.concatenate([np.full((2, 32, 32, 16), -30.0), np.full((2, 32, 32, 16), 2 * np.log(3.0))])
    sample = np.asarray(jax.jit(sample_latent)(jax.random.key(1), mean, logvar.astype(np.float32)))
    assert np.max(np.abs(sample[:2] - 0.5)) < 1e-5
    assert abs(sample[2:].std() - 3.0) < 0.1 and abs(sample[2:].mean() - 0.5) < 0.1
    record = json.loads(json.dumps(dataclasses.asdict(config)))
    assert VAEConfig.from_dict(record) == config


def test_wavelet_band_scales_set_each_subband_gain():
    gains = (0.5, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    config = VAEConfig.pixel(pixel_basis="wavelet", band_scales=gains)
    # wavelet_encode's order for 2 levels of RGB: LL (3), the 1/2-resolution bands (3 each), then the
    # full-resolution bands folded 2x2 (12 each).
    expected = np.repeat(gains, (3, 3, 3, 3, 12, 12, 12))
    np.testing.assert_array_equal(latent_scales(config), expected)
    z = np.random.default_rng(0).standard_normal((2, 4, 4, 48)).astype(np.float32)
    normalized = np.asarray(normalize_latents(z, config))
    np.testing.assert_array_equal(normalized, z * expected)
    np.testing.assert_array_equal(denormalize_latents(normalized, config), z)  # power-of-two gains: exact
    record = json.loads(json.dumps(dataclasses.asdict(config)))
    assert VAEConfig.from_dict(record) == config
    np.testing.assert_array_equal(latent_scales(VAEConfig.pixel(pixel_basis="wavelet")), np.ones(48))
    with pytest.raises(ValueError, match="7 positive gains"):
        VAEConfig.pixel(pixel_basis="wavelet", band_scales=gains[:4])
    with pytest.raises(ValueError, match="needs kind='pixel' with pixel_basis='wavelet'"):
        VAEConfig.pixel(band_scales=gains)

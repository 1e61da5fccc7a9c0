"""DINOv3-feature discriminator: StyleGAN-T heads against torch, spectral-norm state, input path, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.models.dinov3 import DINOv3ViT, abstract_params
from smfsr_jax.models.discriminator import (BatchNormLocal, Discriminator, DiscriminatorConfig, SpectralConv1d,
                                            backbone_features, diff_augment, preprocess)
from tests.conftest import import_torch


def _assert_close(ours, ref, what="", rtol=1e-5):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, what
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol} * {scale:.3g}"


def _torch_head(torch, channels, seed=0):
    """StyleGAN-T DiscHead (unconditional) with torch's spectral_norm and BatchNormLocal, random weights."""
    nn, F = torch.nn, torch.nn.functional

    class BatchNormLocalRef(nn.Module):
        def __init__(self, num_features, virtual_bs=8, eps=1e-5):
            super().__init__()
            self.virtual_bs, self.eps = virtual_bs, eps
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

        def forward(self, x):
            shape = x.size()
            groups = int(np.ceil(x.size(0) / self.virtual_bs))
            x = x.view(groups, -1, x.size(-2), x.size(-1))
            mean = x.mean([1, 3], keepdim=True)
            var = x.var([1, 3], keepdim=True, unbiased=False)
            x = (x - mean) / torch.sqrt(var + self.eps)
            return (x * self.weight[None, :, None] + self.bias[None, :, None]).view(shape)

    def sn_conv(cin, cout, k):
        conv = nn.Conv1d(cin, cout, k, padding=k // 2, padding_mode="circular")
        return nn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in, self.norm_in = sn_conv(channels, channels, 1), BatchNormLocalRef(channels)
            self.conv_res, self.norm_res = sn_conv(channels, channels, 9), BatchNormLocalRef(channels)
            self.conv_out = sn_conv(channels, 1, 1)

        def forward(self, x):  # (B, C, N) -> (B, N)
            h = F.leaky_relu(self.norm_in(self.conv_in(x)), 0.2)
            r = F.leaky_relu(self.norm_res(self.conv_res(h)), 0.2)
            return self.conv_out((r + h) / np.sqrt(2))[:, 0]

    torch.manual_seed(seed)
    head = Head()
    with torch.no_grad():
        for name in ("norm_in", "norm_res"):
            getattr(head, name).weight.copy_(1 + 0.3 * torch.randn(channels))
            getattr(head, name).bias.copy_(0.3 * torch.randn(channels))
    return head


def _flax_variables(head):
    """Flax {'params', 'spectral'} of a torch head: weight_orig (out, in, k) -> kernel (k, in, out)."""
    params, spectral = {}, {}
    for name in ("conv_in", "conv_res", "conv_out"):
        conv = getattr(head, name)
        params[name] = {"kernel": conv.weight_orig.detach().numpy().transpose(2, 1, 0),
                        "bias": conv.bias.detach().numpy()}
        spectral[name] = {"u": conv.weight_u.numpy().copy(), "v": conv.weight_v.numpy().copy()}
    for name in ("norm_in", "norm_res"):
        norm = getattr(head, name)
        params[name] = {"scale": norm.weight.detach().numpy(), "bias": norm.bias.detach().numpy()}
    return {"params": params, "spectral": spectral}


def test_head_matches_stylegan_t_with_torch_spectral_norm():
    """Training-mode torch (one power iteration per call) = update_spectral_norm=True; eval mode = False."""
    torch = import_torch()
    from smfsr_jax.models.discriminator import DiscriminatorHead
    channels, batch, tokens = 32, 16, 20  # two BatchNormLocal groups of 8
    head = _torch_head(torch, channels)
    variables = _flax_variables(head)
    gen = torch.Generator().manual_seed(1)
    x, x2 = torch.randn(batch, channels, tokens, generator=gen), torch.randn(batch, channels, tokens, generator=gen)
    apply = jax.jit(functools.partial(DiscriminatorHead().apply, mutable=["spectral"]),
                    static_argnames="update_spectral_norm")

    head.train()
    with torch.no_grad():
        ref = head(x).numpy()
    out, state = apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 1)), update_spectral_norm=True)
    _assert_close(out, ref, "train-mode logits")
    for name in ("conv_in", "conv_res", "conv_out"):
        conv = getattr(head, name)
        _assert_close(state["spectral"][name]["u"], conv.weight_u.numpy(), f"{name} u")
        _assert_close(state["spectral"][name]["v"], conv.weight_v.numpy(), f"{name} v")

    head.eval()
    with torch.no_grad():
        ref = head(x2).numpy()
    variables = {"params": variables["params"], **state}
    out, unchanged = apply(variables, jnp.asarray(x2.numpy().transpose(0, 2, 1)), update_spectral_norm=False)
    _assert_close(out, ref, "eval-mode logits")
    jax.tree.map(np.testing.assert_array_equal, unchanged, state)


def _numpy_conv1d(x, kernel, bias):
    """Circular-padded conv over tokens: x (B, N, in), kernel (k, in, out)."""
    k = kernel.shape[0]
    padded = np.concatenate([x[:, -(k // 2):], x, x[:, :k // 2]], axis=1) if k > 1 else x
    windows = np.stack([padded[:, j:j + x.shape[1]] for j in range(k)], axis=2)  # (B, N, k, in)
    return np.einsum("bnki,kio->bno", windows, kernel) + bias


def test_spectral_norm_power_iteration():
    """One iteration is torch's math (numpy here); no update uses the stored vectors; iterating converges to
    the largest singular value of the (out, in·k) weight."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((9, 6, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    u0 = rng.standard_normal(5).astype(np.float32)
    v0 = rng.standard_normal(54).astype(np.float32)
    variables = {"params": {"kernel": kernel, "bias": bias}, "spectral": {"u": u0, "v": v0}}
    x = rng.standard_normal((2, 12, 6)).astype(np.float32)
    step = jax.jit(functools.partial(SpectralConv1d(5, 9).apply, mutable=["spectral"]),
                   static_argnames="update_spectral_norm")

    weight = kernel.transpose(2, 1, 0).reshape(5, 54).astype(np.float64)
    v = weight.T @ u0 / max(np.linalg.norm(weight.T @ u0), 1e-12)
    u = weight @ v / max(np.linalg.norm(weight @ v), 1e-12)
    out, state = step(variables, x, update_spectral_norm=True)
    _assert_close(state["spectral"]["u"], u, "u")
    _assert_close(state["spectral"]["v"], v, "v")
    _assert_close(out, _numpy_conv1d(x, kernel / (u @ weight @ v), bias), "updated output")

    out, state = step(variables, x, update_spectral_norm=False)
    jax.tree.map(np.testing.assert_array_equal, state["spectral"], variables["spectral"])
    _assert_close(out, _numpy_conv1d(x, kernel / (u0 @ weight @ v0), bias), "no-update output")

    for _ in range(60):
        _, state = step({"params": variables["params"], **state}, x, update_spectral_norm=True)
    u, v = np.asarray(state["spectral"]["u"]), np.asarray(state["spectral"]["v"])
    np.testing.assert_allclose(u @ weight @ v, np.linalg.svd(weight, compute_uv=False)[0], rtol=1e-4)


def test_spectral_state_is_a_separate_collection_that_moves_only_when_requested():
    conv = SpectralConv1d(4, 9)
    x = jnp.zeros((2, 10, 3))
    variables = jax.eval_shape(conv.init, jax.random.key(1), x)
    assert sorted(variables["params"]) == ["bias", "kernel"]
    assert variables["spectral"]["u"].shape == (4,) and variables["spectral"]["v"].shape == (27,)
    with pytest.raises(Exception, match="spectral"):  # an update needs the collection to be mutable
        jax.eval_shape(functools.partial(conv.apply, update_spectral_norm=True), variables, x)
    # Values: test_spectral_norm_power_iteration (unchanged without the flag, one torch iteration with it).


def test_circular_padding_commutes_with_token_roll():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 11, 3)).astype(np.float32)
    kernel = rng.standard_normal((9, 3, 3)).astype(np.float32)
    variables = {"params": {"kernel": kernel, "bias": np.zeros(3, np.float32)},
                 "spectral": {"u": np.ones(3, np.float32) / np.sqrt(3), "v": np.ones(27, np.float32) / np.sqrt(27)}}
    out = np.asarray(jax.jit(SpectralConv1d(3, 9).apply)(variables, np.concatenate([x, np.roll(x, 4, axis=1)])))
    _assert_close(out[1], np.roll(out[0], 4, axis=0), "roll")


def test_batch_norm_local_groups():
    rng = np.random.default_rng(0)
    norm = BatchNormLocal()
    x = rng.standard_normal((16, 5, 3)).astype(np.float32) * 3 + 1
    variables = {"params": {"scale": np.full(3, 2.0, np.float32), "bias": np.full(3, 0.5, np.float32)}}
    out = np.asarray(norm.apply(variables, x))
    for group in (slice(0, 8), slice(8, 16)):  # ceil(16/8) = 2 groups of consecutive samples
        g = x[group]
        ref = (g - g.mean((0, 1))) / np.sqrt(g.var((0, 1)) + 1e-5) * 2.0 + 0.5
        np.testing.assert_allclose(out[group], ref, rtol=1e-5, atol=1e-5)
    x[8:] += 10.0
    np.testing.assert_allclose(np.asarray(norm.apply(variables, x))[:8], out[:8], rtol=1e-6, atol=1e-6)
    small = x[:5]  # ceil(5/8) = 1 group: the whole batch
    ref = (small - small.mean((0, 1))) / np.sqrt(small.var((0, 1)) + 1e-5) * 2.0 + 0.5
    np.testing.assert_allclose(np.asarray(norm.apply(variables, small)), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="equal groups"):
        norm.apply(variables, np.zeros((9, 5, 3), np.float32))  # ceil(9/8) = 2 groups of 4.5


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_heads_parameter_count():
    """Five heads at width 384 (ViT-S/16 at 224: 196 tokens), 1,477,249 trainable parameters each."""
    config = DiscriminatorConfig()
    features = tuple(jnp.zeros((8, 196, 384)) for _ in config.tap_names)
    variables = jax.eval_shape(Discriminator(config).init, jax.random.key(0), features)
    assert sorted(variables["params"]) == [f"head_{n}" for n in sorted(config.tap_names)]
    assert all(_count(head) == 1_477_249 for head in variables["params"].values())
    assert _count(variables["params"]) == 7_386_245
    assert _count(variables["spectral"]) == 5 * (384 + 384 + 384 + 9 * 384 + 1 + 384)


@pytest.mark.parametrize("size", [(512, 512), (384, 512)])
def test_preprocess_resize_matches_torch_antialias(size):
    torch = import_torch()
    images = np.random.default_rng(0).uniform(-1, 1, (2,) + size + (3,)).astype(np.float32)
    x = torch.from_numpy((images + 1) / 2).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    ref = ((ref - mean) / std).permute(0, 2, 3, 1).numpy()
    # torch's own fp32 and fp64 antialiased paths differ by ~1e-5 relative for non-square inputs.
    rtol = 1e-5 if size == (512, 512) else 3e-5
    _assert_close(preprocess(jnp.asarray(images), 224), ref, f"resize {size}", rtol)
    assert preprocess(jnp.asarray(images), "native").shape == images.shape


def _tiny_backbone(config, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), abstract_params(config.backbone))


def test_features_drop_registers_and_add_cls():
    config = DiscriminatorConfig.tiny()
    backbone = _tiny_backbone(config)
    images = np.random.default_rng(1).uniform(-1, 1, (2, 48, 40, 3)).astype(np.float32)
    direct = lambda x: DINOv3ViT(config.backbone).apply({"params": backbone}, preprocess(x, 32), return_taps=(0, 1, 2))
    features, (_, taps) = jax.jit(lambda x: (backbone_features(backbone, x, config), direct(x)))(images)
    assert len(features) == len(config.tap_names) == 3
    for feature, tap in zip(features, taps):
        assert feature.shape == (2, 4, config.backbone.hidden_size)  # 32² input, patch 16
        _assert_close(feature, tap[:, 5:] + tap[:, :1], "features")


def test_gradients_reach_pixels_through_the_frozen_backbone():
    """The G-loss path, DiffAugment on: pixels get gradients, the frozen backbone none."""
    tiny = DiscriminatorConfig.tiny()
    config = DiscriminatorConfig(backbone=tiny.backbone, blocks=tiny.blocks, resolution=tiny.resolution,
                                 diffaugment=("color", "translation", "cutout"))
    backbone = _tiny_backbone(config)
    images = np.random.default_rng(1).uniform(-1, 1, (4, 40, 40, 3)).astype(np.float32)
    disc = Discriminator(config)
    tokens = (config.resolution // config.backbone.patch_size) ** 2
    shapes = jax.eval_shape(disc.init, jax.random.key(1), [jnp.zeros((4, tokens, config.backbone.hidden_size))] * 3)
    rng = np.random.default_rng(2)
    variables = {"params": jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes["params"]),
                 "spectral": jax.tree.map(lambda s: np.full(s.shape, s.shape[0] ** -0.5, np.float32),
                                          shapes["spectral"])}
    # The trainable tree holds the heads only; the backbone's params are an argument.
    assert sorted(variables["params"]) == ["head_embeddings", "head_layer_0", "head_layer_1"]

    def generator_loss(images, backbone):
        features = backbone_features(backbone, images, config, rng=jax.random.key(2))
        return -disc.apply(variables, features).mean()

    grad_images, grad_backbone = jax.jit(jax.grad(generator_loss, argnums=(0, 1)))(images, backbone)
    assert np.isfinite(grad_images).all() and float(jnp.abs(grad_images).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad_backbone))
    with pytest.raises(ValueError, match="rng"):
        backbone_features(backbone, images, config)


def test_diff_augment_translation_and_cutout():
    batch, height, width = 4, 16, 24
    images = jnp.arange(1, batch * height * width * 3 + 1, dtype=jnp.float32).reshape(batch, height, width, 3)
    augment = jax.jit(diff_augment, static_argnums=2)
    moved = np.asarray(augment(images, jax.random.key(0), ("translation",)))
    x = np.asarray(images)
    for b in range(batch):
        matches = []
        for dy in range(-2, 3):  # int(16/8 + 0.5) = 2
            for dx in range(-3, 4):  # int(24/8 + 0.5) = 3
                padded = np.zeros((height + 4, width + 6, 3), np.float32)
                padded[2:2 + height, 3:3 + width] = x[b]
                matches.append(np.array_equal(moved[b], padded[2 + dy:2 + dy + height, 3 + dx:3 + dx + width]))
        assert sum(matches) == 1

    cut = np.asarray(augment(images, jax.random.key(1), ("cutout",)))
    for b in range(batch):
        hole = cut[b, ..., 0] == 0
        assert np.array_equal(cut[b][~hole], x[b][~hole]) and hole.any()
        rows, cols = hole.any(1), hole.any(0)
        assert np.array_equal(hole, np.outer(rows, cols))  # one rectangle
        assert rows.sum() <= 3 and cols.sum() <= 5  # int(0.2·16 + 0.5), int(0.2·24 + 0.5)

    policy = ("color", "translation", "cutout")
    same = augment(images, jax.random.key(3), policy), augment(images, jax.random.key(3), policy)
    np.testing.assert_array_equal(*same)
    assert not np.allclose(same[0], augment(images, jax.random.key(4), policy))

"""DINOv3 ViT: fp32 parity with transformers' DINOv3ViTModel (eval mode) and strict converters."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.convert.dinov3 import convert, load_dinov3
from smfsr_jax.convert.tensors import CheckpointError, flatten, write_safetensors
from smfsr_jax.models.dinov3 import DINOv3Config, DINOv3ViT, abstract_params
from tests.conftest import import_torch

# Small random configurations (HF DINOv3ViTConfig kwargs) and the image size each one runs at.
CONFIGS = {
    "plain": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_register_tokens=4), (64, 64)),
    "swiglu": (dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                    num_register_tokens=4, use_gated_mlp=True, hidden_act="silu"), (48, 80)),
    "no_registers_key_bias": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                   num_register_tokens=0, key_bias=True, proj_bias=False, mlp_bias=False), (32, 48)),
}

# transformers/models/dinov3_vit/convert_dinov3_vit_to_hf.py: ORIGINAL_TO_CONVERTED_KEY_MAPPING, applied in order
# after `split_qkv`; `bias_mask`, `attn.k_proj.bias`, `local_cls_norm` and `inv_freq` are then skipped and
# mask_token is unsqueezed to (1, 1, D).
ORIGINAL_TO_HF = [
    (r"cls_token", r"embeddings.cls_token"), (r"mask_token", r"embeddings.mask_token"),
    (r"storage_tokens", r"embeddings.register_tokens"), (r"patch_embed.proj", r"embeddings.patch_embeddings"),
    (r"periods", r"inv_freq"), (r"rope_embed", r"rope_embeddings"),
    (r"blocks.(\d+).attn.proj", r"layer.\1.attention.o_proj"), (r"blocks.(\d+).attn.", r"layer.\1.attention."),
    (r"blocks.(\d+).ls(\d+).gamma", r"layer.\1.layer_scale\2.lambda1"),
    (r"blocks.(\d+).mlp.fc1", r"layer.\1.mlp.up_proj"), (r"blocks.(\d+).mlp.fc2", r"layer.\1.mlp.down_proj"),
    (r"blocks.(\d+).mlp", r"layer.\1.mlp"), (r"blocks.(\d+).norm", r"layer.\1.norm"),
    (r"w1", r"gate_proj"), (r"w2", r"up_proj"), (r"w3", r"down_proj"),
]


def _hf_model(torch, hf_kwargs, seed=0):
    """DINOv3ViTModel in eval mode with every parameter random (biases, tokens, layer scales included)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    model = DINOv3ViTModel(DINOv3ViTConfig(**hf_kwargs)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "lambda1")):
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.3 * noise)
            elif name.startswith("embeddings.") and "token" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))
    return model


def _pixels(torch, size, batch=2, seed=1):
    return torch.randn((batch, 3) + size, generator=torch.Generator().manual_seed(seed))


def _nhwc(t):
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def _assert_close(ours, ref, what=""):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, what
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= 1e-5 * scale, f"{what}: max abs err {err:.3g} > 1e-5 * {scale:.3g}"


def _assert_same_params(a, b):
    a, b = flatten(a), flatten(b)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(tmp_path, name):
    torch = import_torch()
    hf_kwargs, size = CONFIGS[name]
    model = _hf_model(torch, hf_kwargs)
    model.save_pretrained(tmp_path)
    config, params = load_dinov3(str(tmp_path))
    assert config == DINOv3Config(**hf_kwargs)

    pixels = _pixels(torch, size)
    num_patches = (size[0] // 16) * (size[1] // 16)
    masked = torch.rand((2, num_patches), generator=torch.Generator().manual_seed(2)) < 0.3
    with torch.no_grad():
        ref = model(pixels, output_hidden_states=True)
        ref_masked = model(pixels, bool_masked_pos=masked).last_hidden_state
    taps = tuple(range(config.num_hidden_layers + 1))
    forward = jax.jit(lambda p, x, mask: DINOv3ViT(config).apply({"params": p}, x, mask, return_taps=taps))
    out, hidden = forward(params, _nhwc(pixels), None)
    _assert_close(out, ref.last_hidden_state.numpy(), "last_hidden_state")
    assert len(ref.hidden_states) == len(hidden)
    for i, (ours, theirs) in enumerate(zip(hidden, ref.hidden_states)):
        _assert_close(ours, theirs.numpy(), f"hidden_states[{i}]")
    out_masked, _ = forward(params, _nhwc(pixels), jnp.asarray(masked.numpy()))
    _assert_close(out_masked, ref_masked.numpy(), "bool_masked_pos")


def test_transformers_module_prefix_and_single_file(tmp_path):
    """model.state_dict() of transformers 5 nests layers under `model.`; a lone file reads config.json beside it."""
    torch = import_torch()
    hf_kwargs, _ = CONFIGS["plain"]
    model = _hf_model(torch, hf_kwargs)
    model.save_pretrained(tmp_path / "hub")
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.layer.") for k in state)
    (tmp_path / "single").mkdir()
    write_safetensors(tmp_path / "single" / "weights.safetensors", state)
    (tmp_path / "single" / "config.json").write_text((tmp_path / "hub" / "config.json").read_text())
    _, from_hub = load_dinov3(str(tmp_path / "hub"))
    _, from_file = load_dinov3(str(tmp_path / "single" / "weights.safetensors"))
    _assert_same_params(from_hub, from_file)


def _original_state_dict(torch, model, hf_kwargs, seed=3):
    """The facebookresearch layout of `model`: fused qkv with a (random, masked) key bias and its bias_mask,
    storage_tokens, (1, D) mask_token, lsN.gamma, mlp.fc1/fc2 or w1/w2/w3, rope periods, local_cls_norm."""
    gen = torch.Generator().manual_seed(seed)
    hf = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    d = hf_kwargs["hidden_size"]
    head_dim = d // hf_kwargs["num_attention_heads"]
    orig = {"cls_token": hf["embeddings.cls_token"], "mask_token": hf["embeddings.mask_token"].reshape(1, d),
            "storage_tokens": hf["embeddings.register_tokens"],
            "patch_embed.proj.weight": hf["embeddings.patch_embeddings.weight"],
            "patch_embed.proj.bias": hf["embeddings.patch_embeddings.bias"],
            "rope_embed.periods": 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)),
            "norm.weight": hf["norm.weight"], "norm.bias": hf["norm.bias"],
            "local_cls_norm.weight": torch.randn(d, generator=gen),
            "local_cls_norm.bias": torch.randn(d, generator=gen)}
    mlp = ({"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if hf_kwargs.get("use_gated_mlp")
           else {"fc1": "up_proj", "fc2": "down_proj"})
    for n in range(hf_kwargs["num_hidden_layers"]):
        b, h = f"blocks.{n}", f"layer.{n}"
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            orig[f"{b}.{name}"] = hf[f"{h}.{name}"]
        orig[f"{b}.ls1.gamma"] = hf[f"{h}.layer_scale1.lambda1"]
        orig[f"{b}.ls2.gamma"] = hf[f"{h}.layer_scale2.lambda1"]
        orig[f"{b}.attn.qkv.weight"] = torch.cat([hf[f"{h}.attention.{p}_proj.weight"] for p in "qkv"])
        orig[f"{b}.attn.qkv.bias"] = torch.cat([hf[f"{h}.attention.q_proj.bias"], torch.randn(d, generator=gen),
                                                hf[f"{h}.attention.v_proj.bias"]])
        orig[f"{b}.attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        orig[f"{b}.attn.proj.weight"] = hf[f"{h}.attention.o_proj.weight"]
        orig[f"{b}.attn.proj.bias"] = hf[f"{h}.attention.o_proj.bias"]
        for src, dst in mlp.items():
            for kind in ("weight", "bias"):
                orig[f"{b}.mlp.{src}.{kind}"] = hf[f"{h}.mlp.{dst}.{kind}"]
    return {k: v.clone().contiguous() for k, v in orig.items()}


def _hf_script_conversion(state):
    """What transformers' convert_dinov3_vit_to_hf.py does to an original state dict."""
    split = {}
    for key, value in state.items():
        if "qkv" in key:
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                split[key.replace("qkv", part)] = chunk
        else:
            split[key] = value
    converted = {}
    for key, value in split.items():
        new_key = key
        for pattern, replacement in ORIGINAL_TO_HF:
            new_key = re.sub(pattern, replacement, new_key)
        if "bias_mask" in key or "attn.k_proj.bias" in key or "local_cls_norm" in key or "inv_freq" in new_key:
            continue
        converted[new_key] = value.unsqueeze(1) if new_key == "embeddings.mask_token" else value
    return converted


@pytest.mark.parametrize("name", ["plain", "swiglu"])
def test_original_layout_matches_the_hf_conversion(tmp_path, name):
    torch = import_torch()
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    hf_kwargs, size = CONFIGS[name]
    original = _original_state_dict(torch, _hf_model(torch, hf_kwargs), hf_kwargs)
    torch.save(original, tmp_path / "dinov3.pth")
    write_safetensors(tmp_path / "dinov3.safetensors", {k: v.numpy() for k, v in original.items()})

    # The HF model the conversion script would produce (transformers 5 nests the layers under `model.`).
    reference = DINOv3ViTModel(DINOv3ViTConfig(**hf_kwargs)).eval()
    converted = _hf_script_conversion(original)
    reference.load_state_dict({("model." + k if k.startswith("layer.") else k): v for k, v in converted.items()},
                              strict=True)
    reference.save_pretrained(tmp_path / "hf")

    config, from_pth = load_dinov3(str(tmp_path / "dinov3.pth"))
    assert config == DINOv3Config(**hf_kwargs)
    _, from_safetensors = load_dinov3(str(tmp_path / "dinov3.safetensors"))
    _, from_hf = load_dinov3(str(tmp_path / "hf"))
    _assert_same_params(from_pth, from_hf)
    _assert_same_params(from_safetensors, from_hf)

    pixels = _pixels(torch, size)
    with torch.no_grad():
        ref = reference(pixels).last_hidden_state.numpy()
    _assert_close(jax.jit(DINOv3ViT(config).apply)({"params": from_pth}, _nhwc(pixels)), ref, "original layout")


def _hf_checkpoint(tmp_path):
    torch = import_torch()
    hf_kwargs, _ = CONFIGS["plain"]
    _hf_model(torch, hf_kwargs).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    from smfsr_jax.convert.tensors import read_safetensors
    return path, {k: np.array(v) for k, v in read_safetensors(str(path)).items()}


def test_strict_errors_name_the_file_and_every_key(tmp_path):
    path, state = _hf_checkpoint(tmp_path)
    state["layer.1.attention.q_proj.renamed"] = state.pop("layer.1.attention.q_proj.bias")
    del state["layer.2.mlp.up_proj.weight"]
    state["layer.0.norm2.weight"] = state["layer.0.norm2.weight"][:-1]
    write_safetensors(path, state)
    with pytest.raises(CheckpointError) as info:
        load_dinov3(str(path))
    message = str(info.value)
    assert str(path) in message
    for key in ("layer.1.attention.q_proj.bias", "layer.1.attention.q_proj.renamed", "layer.2.mlp.up_proj.weight",
                "layer.0.norm2.weight: expected (64,), found (63,)"):
        assert key in message


def test_hf_config_is_required_and_checked(tmp_path):
    path, _ = _hf_checkpoint(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, model_type="dinov2")))
    with pytest.raises(CheckpointError, match=re.escape(str(config_path))):
        load_dinov3(str(path))
    config_path.unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_dinov3(str(path))


def test_original_layout_errors(tmp_path):
    torch = import_torch()
    hf_kwargs, _ = CONFIGS["plain"]
    original = {k: v.numpy() for k, v in _original_state_dict(torch, _hf_model(torch, hf_kwargs), hf_kwargs).items()}
    original["blocks.1.attn.qkv.bias_mask"] = np.ones_like(original["blocks.1.attn.qkv.bias_mask"])
    original["blocks.0.ls1.scale"] = original.pop("blocks.0.ls1.gamma")
    path = tmp_path / "dinov3.safetensors"
    write_safetensors(path, original)
    with pytest.raises(CheckpointError) as info:
        load_dinov3(str(path))
    assert str(path) in str(info.value)
    assert "blocks.0.ls1.gamma" in str(info.value) and "blocks.0.ls1.scale" in str(info.value)
    original["blocks.0.ls1.gamma"] = original.pop("blocks.0.ls1.scale")
    write_safetensors(path, original)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.qkv\.bias_mask"):
        load_dinov3(str(path))


def test_convert_round_trip(tmp_path):
    path, _ = _hf_checkpoint(tmp_path / "hf")
    config = convert(str(path.parent), str(tmp_path / "converted"), show_progress=False)
    loaded_config, params = load_dinov3(str(tmp_path / "converted"))
    assert loaded_config == config
    _assert_same_params(params, load_dinov3(str(path.parent))[1])


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset, hf_kwargs", [
    ("vits16", dict(num_register_tokens=4)),
    ("vitsplus16", dict(num_register_tokens=4, use_gated_mlp=True, hidden_act="silu")),
    ("vitb16", dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_register_tokens=4)),
])
def test_full_size_parameter_counts(preset, hf_kwargs):
    torch = import_torch()
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    with torch.device("meta"):
        hf_model = DINOv3ViTModel(DINOv3ViTConfig(**hf_kwargs))
    config = getattr(DINOv3Config, preset)()
    count = _count(abstract_params(config))
    assert count == sum(p.numel() for p in hf_model.parameters())
    if preset == "vits16":
        # HF named_parameters incl. the mask token: what DINOv3ViTModel instantiates (a hand count of
        # 21,596,928 is 384 too many).
        assert count == 21_596_544


def test_bf16_compute_tracks_fp32():
    config = DINOv3Config.tiny()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 0.2 * rng.standard_normal(s.shape, np.float32), abstract_params(config))
    pixels = rng.standard_normal((2, 32, 48, 3), np.float32)
    ref = jax.jit(DINOv3ViT(config).apply)({"params": params}, pixels)
    out = jax.jit(DINOv3ViT(config, dtype=jnp.bfloat16).apply)({"params": params}, pixels)
    assert out.dtype == jnp.bfloat16
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.1 * float(jnp.abs(ref).max())

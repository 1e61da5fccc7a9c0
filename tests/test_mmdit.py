"""MM-DiT parity (official fixtures, diffusers, the LR-stream torch reference), converter and shapes."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.convert import converted_dir
from smfsr_jax.convert import tensors
from smfsr_jax.convert import transformer as convert_transformer
from smfsr_jax.models import mmdit
from smfsr_jax.training.stages.student import student_from_teacher
from smfsr_jax.training.stages.teacher import teacher_from_base
from tests.conftest import import_torch, shared_path
from tests.random_weights import random_mmdit_params

FIXTURES = ("sd35_mmdit_tiny", "dit4sr_teacher_tiny", "dit4sr_r1_tiny", "smfsr_student_tiny")


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1), jnp.float32)


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def run_flax(cfg, params, inputs):
    """Run our MMDiT on diffusers-convention inputs (NCHW, timesteps = time_scale * t)."""
    kwargs = dict(context=jnp.asarray(inputs["encoder_hidden_states"], jnp.float32),
                  pooled=jnp.asarray(inputs["pooled_projections"], jnp.float32),
                  t=np.asarray(inputs["timestep"], np.float32) / np.float32(cfg.time_scale))
    if "r_timestep" in inputs:
        kwargs["r"] = np.asarray(inputs["r_timestep"], np.float32) / np.float32(cfg.time_scale)
    if "controlnet_image" in inputs:
        kwargs["lr_latents"] = nhwc(inputs["controlnet_image"])
    fn = jax.jit(lambda p, x, kw: mmdit.MMDiT(cfg).apply({"params": p}, x, **kw))
    return nchw(fn(params, nhwc(inputs["hidden_states"]), kwargs))


def assert_close(ours, ref, rel=1e-5):
    err, bound = np.abs(ours - ref).max(), rel * np.abs(ref).max()
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------------------------
# Official fixtures (DiT4SR, DiT4SR-r1, SMFSR and diffusers code on tiny configs).

@pytest.mark.parametrize("name", FIXTURES)
def test_official_fixture_parity(name):
    fixture = shared_path("fixtures", "parity", name)
    overrides = {"lr_key_bug": False} if name == "dit4sr_r1_tiny" else {}
    cfg, params = convert_transformer.load_transformer(fixture / "weights.safetensors", **overrides)
    assert cfg.lr_stream == (name != "sd35_mmdit_tiny")
    assert cfg.time_conditioning == ("interval" if name == "smfsr_student_tiny" else "single")
    inputs = dict(np.load(fixture / "inputs.npz"))
    outputs = np.load(fixture / "outputs.npz")
    # Teacher-scale timesteps (~1e3) amplify torch-CPU's 1-ulp float32 exp differences in 3 of the 128
    # sinusoid frequencies to ~1e-5 (fixture README); the bound still holds at 1e-5 * max|ref|.
    assert_close(run_flax(cfg, params, inputs), outputs["sample"])


def test_lr_key_flag_changes_the_function():
    fixture = shared_path("fixtures", "parity", "dit4sr_r1_tiny")
    inputs = dict(np.load(fixture / "inputs.npz"))
    ref = np.load(fixture / "outputs.npz")["sample"]
    cfg, params = convert_transformer.load_transformer(fixture / "weights.safetensors")
    assert cfg.lr_key_bug  # the default: weights cannot tell
    assert np.abs(run_flax(cfg, params, inputs) - ref).max() > 1e-2


@pytest.mark.parametrize("name", FIXTURES[1:])
def test_torch_reference_reproduces_official_fixtures(name):
    """The test-side torch reference of the LR stream is validated by the official outputs."""
    torch = import_torch()
    from tests import torch_dit4sr
    fixture = shared_path("fixtures", "parity", name)
    sd = {k: torch.from_numpy(np.array(v))
          for k, v in tensors.read_safetensors(fixture / "weights.safetensors").items()}
    cfg = json.loads((fixture / "config.json").read_text())
    x = {k: torch.from_numpy(v) for k, v in np.load(fixture / "inputs.npz").items()}
    with torch.no_grad():
        out = torch_dit4sr.forward(sd, cfg, x["hidden_states"], x["controlnet_image"], x["encoder_hidden_states"],
                                   x["pooled_projections"], x["timestep"], x.get("r_timestep"),
                                   lr_key_bug=name != "dit4sr_r1_tiny")
    # Not bit-exact across machines: torch's float32 exp of the sinusoid frequencies differs by 1 ulp between
    # CPUs, which the ~1e3 timesteps amplify to ~1e-5 of the output (seen: 1.8e-5 on an AMD EPYC), above the
    # fixture's own fp32-vs-fp64 spread (~1e-6). The bound is the parity tests' 1e-5 * max|ref|.
    assert_close(out.numpy(), np.load(fixture / "outputs.npz")["sample"])


# ---------------------------------------------------------------------------------------------
# Random configurations, every weight random.

SD3_CONFIGS = {
    "dual2_of3": dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                      pooled_projection_dim=24, out_channels=16, pos_embed_max_size=16,
                      dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "wide_rect": dict(sample_size=12, patch_size=2, in_channels=8, num_layers=4, attention_head_dim=16,
                      num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=48,
                      pooled_projection_dim=12, out_channels=8, pos_embed_max_size=10,
                      dual_attention_layers=(0,), qk_norm="rms_norm"),
    "sd3_no_qknorm": dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                          pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                          dual_attention_layers=(), qk_norm=None),
}
# Non-prefix sets: runs dual, plain, dual (+ a plain last block); plain, dual, plain (+ a dual last block).
SD3_CONFIGS["dual_0_2_of4"] = dict(SD3_CONFIGS["dual2_of3"], num_layers=4, dual_attention_layers=(0, 2))
SD3_CONFIGS["dual_1_3_of4"] = dict(SD3_CONFIGS["dual2_of3"], num_layers=4, dual_attention_layers=(1, 3))
LATENT_SIZES = {"dual2_of3": (8, 8), "wide_rect": (8, 12), "sd3_no_qknorm": (6, 6), "dual_0_2_of4": (8, 8),
                "dual_1_3_of4": (6, 8)}


def randomize(keys_shapes, seed):
    """Fixture-style random state dict: N(0, 0.2), RMSNorm weights 1 + N(0, 0.1), float64."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in keys_shapes.items():
        value = rng.normal(0, 0.2, shape)
        if re.search(r"norm_(added_)?[qk]\.weight$", key):
            value = 1 + rng.normal(0, 0.1, shape)
        out[key] = value
    return out


def random_inputs(cfg_dict, latent_hw, seed, lr=False, interval=False, batch=2, text_len=5):
    rng = np.random.default_rng(seed)
    c = cfg_dict["in_channels"]
    x = {"hidden_states": rng.normal(size=(batch, c, *latent_hw)),
         "encoder_hidden_states": rng.normal(size=(batch, text_len, cfg_dict["joint_attention_dim"])),
         "pooled_projections": rng.normal(size=(batch, cfg_dict["pooled_projection_dim"]))}
    if lr:
        x["controlnet_image"] = rng.normal(size=(batch, c, *latent_hw))
    if interval:
        x["timestep"] = np.array([0.7, 1.0], np.float32)[:batch]
        x["r_timestep"] = np.array([0.2, 0.0], np.float32)[:batch]
    else:
        x["timestep"] = np.array([700.0, 37.5], np.float32)[:batch]
    return x


def write_checkpoint(tmp_path, state_dict, cfg_dict):
    tensors.write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors",
                              {k: np.asarray(v, np.float32) for k, v in state_dict.items()})
    (tmp_path / "config.json").write_text(json.dumps(cfg_dict))
    return tmp_path


@pytest.mark.parametrize("name", sorted(SD3_CONFIGS))
def test_random_config_parity_with_diffusers(name, tmp_path):
    torch = import_torch()
    from diffusers import SD3Transformer2DModel
    cfg_dict = SD3_CONFIGS[name]
    model = SD3Transformer2DModel(**cfg_dict).to(torch.float64).eval()
    sd = randomize({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed=len(name))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    inputs = random_inputs(cfg_dict, LATENT_SIZES[name], seed=1)
    with torch.no_grad():
        ref = model(hidden_states=torch.from_numpy(inputs["hidden_states"]),
                    encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
                    pooled_projections=torch.from_numpy(inputs["pooled_projections"]),
                    timestep=torch.from_numpy(inputs["timestep"]), return_dict=False)[0].numpy()
    cfg, params = convert_transformer.load_transformer(write_checkpoint(tmp_path, sd, cfg_dict))
    assert not cfg.lr_stream and cfg.dual_attention_layers == tuple(cfg_dict["dual_attention_layers"])
    assert_close(run_flax(cfg, params, inputs), ref)


def dit4sr_state_dict(cfg_dict, seed, interval=False, dead_keys=True):
    """A DiT4SR / SMFSR state dict: diffusers' SD3 keys plus, in every attention (`attn`, `attn2`), the
    `to_{q,k,v,out}_control` linears and, per block, `ff.control_conv`; `dead_keys` adds the never-read
    attn2 added-KV weights and SMFSR's top-level `interval_embedder`."""
    import_torch()  # skips without torch
    from diffusers import SD3Transformer2DModel
    base = SD3Transformer2DModel(**cfg_dict)
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    d = cfg_dict["num_attention_heads"] * cfg_dict["attention_head_dim"]
    for i in range(cfg_dict["num_layers"]):
        attns = ["attn"] + (["attn2"] if i in cfg_dict["dual_attention_layers"] else [])
        for attn in attns:
            for proj in ("to_q_control", "to_k_control", "to_v_control", "to_out_control"):
                shapes[f"transformer_blocks.{i}.{attn}.{proj}.weight"] = (d, d)
                shapes[f"transformer_blocks.{i}.{attn}.{proj}.bias"] = (d,)
        shapes[f"transformer_blocks.{i}.ff.control_conv.weight"] = (4 * d, 1, 3, 3)
        shapes[f"transformer_blocks.{i}.ff.control_conv.bias"] = (4 * d,)
        if dead_keys and i in cfg_dict["dual_attention_layers"]:
            for proj in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
                shapes[f"transformer_blocks.{i}.attn2.{proj}.weight"] = (d, d)
                shapes[f"transformer_blocks.{i}.attn2.{proj}.bias"] = (d,)
            for norm in ("norm_added_q", "norm_added_k"):
                shapes[f"transformer_blocks.{i}.attn2.{norm}.weight"] = (cfg_dict["attention_head_dim"],)
    if interval:
        shapes = {(f"time_text_embed_interval.{k}" if k.startswith("time_text_embed.") else k): v
                  for k, v in shapes.items()}
        for prefix in ("time_text_embed_interval.interval_embedder", "interval_embedder") if dead_keys else (
                "time_text_embed_interval.interval_embedder",):
            shapes.update({f"{prefix}.0.weight": (d, 2 * d), f"{prefix}.0.bias": (d,),
                           f"{prefix}.2.weight": (d, d), f"{prefix}.2.bias": (d,)})
    return randomize(shapes, seed)


LR_CASES = [("dual2_of3", True, False), ("dual2_of3", False, False), ("wide_rect", True, True),
            ("dual2_of3", True, True), ("dual_0_2_of4", True, True), ("dual_1_3_of4", False, False)]


@pytest.mark.parametrize("name,lr_key_bug,interval", LR_CASES)
def test_random_config_parity_lr_stream(name, lr_key_bug, interval, tmp_path):
    torch = import_torch()
    from tests import torch_dit4sr
    cfg_dict = SD3_CONFIGS[name]
    sd = dit4sr_state_dict(cfg_dict, seed=7, interval=interval)
    inputs = random_inputs(cfg_dict, LATENT_SIZES[name], seed=3, lr=True, interval=interval)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        ref = torch_dit4sr.forward({k: torch.from_numpy(v) for k, v in sd.items()}, cfg_dict, t["hidden_states"],
                                   t["controlnet_image"], t["encoder_hidden_states"], t["pooled_projections"],
                                   t["timestep"], t.get("r_timestep"), lr_key_bug=lr_key_bug).numpy()
    cfg, params = convert_transformer.load_transformer(write_checkpoint(tmp_path, sd, cfg_dict),
                                                       lr_key_bug=lr_key_bug)
    assert cfg.lr_stream and cfg.time_conditioning == ("interval" if interval else "single")
    assert cfg.time_scale == (1.0 if interval else 1000.0)
    assert_close(run_flax(cfg, params, inputs), ref)


# ---------------------------------------------------------------------------------------------
# The original SD3.5 single-file layout.

def original_layout_state_dict(cfg_dict, seed):
    """Random `model.diffusion_model.*` tensors named as in Stability's mmditx.py (`joint_blocks.i.x_block` /
    `context_block`, fused `qkv`, `ln_q`/`ln_k`, `adaLN_modulation.1`)."""
    d = cfg_dict["num_attention_heads"] * cfg_dict["attention_head_dim"]
    hd, layers, p = cfg_dict["attention_head_dim"], cfg_dict["num_layers"], cfg_dict["patch_size"]
    c = cfg_dict["in_channels"]
    shapes = {"pos_embed": (1, cfg_dict["pos_embed_max_size"] ** 2, d), "x_embedder.proj.weight": (d, c, p, p),
              "x_embedder.proj.bias": (d,)}

    def lin(key, out, inp):
        shapes.update({f"{key}.weight": (out, inp), f"{key}.bias": (out,)})

    lin("t_embedder.mlp.0", d, 256)
    lin("t_embedder.mlp.2", d, d)
    lin("y_embedder.mlp.0", d, cfg_dict["pooled_projection_dim"])
    lin("y_embedder.mlp.2", d, d)
    lin("context_embedder", d, cfg_dict["joint_attention_dim"])
    lin("final_layer.adaLN_modulation.1", 2 * d, d)
    lin("final_layer.linear", p * p * cfg_dict["out_channels"], d)
    for i in range(layers):
        pre, last = f"joint_blocks.{i}", i == layers - 1
        dual = i in cfg_dict["dual_attention_layers"]
        lin(f"{pre}.x_block.attn.qkv", 3 * d, d)
        lin(f"{pre}.x_block.attn.proj", d, d)
        lin(f"{pre}.x_block.adaLN_modulation.1", (9 if dual else 6) * d, d)
        lin(f"{pre}.x_block.mlp.fc1", 4 * d, d)
        lin(f"{pre}.x_block.mlp.fc2", d, 4 * d)
        lin(f"{pre}.context_block.attn.qkv", 3 * d, d)
        lin(f"{pre}.context_block.adaLN_modulation.1", (2 if last else 6) * d, d)
        for stream in ("x_block", "context_block"):
            shapes[f"{pre}.{stream}.attn.ln_q.weight"] = (hd,)
            shapes[f"{pre}.{stream}.attn.ln_k.weight"] = (hd,)
        if dual:
            lin(f"{pre}.x_block.attn2.qkv", 3 * d, d)
            lin(f"{pre}.x_block.attn2.proj", d, d)
            shapes[f"{pre}.x_block.attn2.ln_q.weight"] = (hd,)
            shapes[f"{pre}.x_block.attn2.ln_k.weight"] = (hd,)
        if not last:
            lin(f"{pre}.context_block.attn.proj", d, d)
            lin(f"{pre}.context_block.mlp.fc1", 4 * d, d)
            lin(f"{pre}.context_block.mlp.fc2", d, 4 * d)
    sd = {f"model.diffusion_model.{k}": v for k, v in randomize(shapes, seed).items()}
    # A single file also holds the VAE: not the transformer's business.
    sd["first_stage_model.decoder.conv_in.weight"] = np.zeros((4, 4, 3, 3))
    return sd


def test_original_single_file_matches_diffusers(tmp_path):
    torch = import_torch()
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    cfg_dict = SD3_CONFIGS["dual2_of3"]
    original = original_layout_state_dict(cfg_dict, seed=11)
    mmdit_only = {k: torch.from_numpy(v) for k, v in original.items() if k.startswith("model.diffusion_model.")}
    diffusers_sd = convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit_only))
    model = SD3Transformer2DModel(**cfg_dict).to(torch.float64).eval()
    model.load_state_dict(diffusers_sd, strict=True)
    inputs = random_inputs(cfg_dict, (8, 8), seed=5)
    with torch.no_grad():
        ref = model(hidden_states=torch.from_numpy(inputs["hidden_states"]),
                    encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
                    pooled_projections=torch.from_numpy(inputs["pooled_projections"]),
                    timestep=torch.from_numpy(inputs["timestep"]), return_dict=False)[0].numpy()

    single = tmp_path / "sd3.5_tiny.safetensors"
    tensors.write_safetensors(single, {k: np.asarray(v, np.float32) for k, v in original.items()})
    cfg_o, params_o = convert_transformer.load_transformer(single)
    assert_close(run_flax(cfg_o, params_o, inputs), ref)

    folder = tmp_path / "diffusers"
    folder.mkdir()
    write_checkpoint(folder, {k: v.numpy() for k, v in diffusers_sd.items()}, cfg_dict)
    cfg_d, params_d = convert_transformer.load_transformer(folder)
    jax.tree.map(np.testing.assert_array_equal, params_o, params_d)
    np.testing.assert_array_equal(run_flax(cfg_o, params_o, inputs), run_flax(cfg_d, params_d, inputs))


# ---------------------------------------------------------------------------------------------
# Strict conversion.

@pytest.fixture
def teacher_file(tmp_path):
    cfg_dict = SD3_CONFIGS["dual2_of3"]
    sd = dit4sr_state_dict(cfg_dict, seed=2, dead_keys=False)
    path = tmp_path / "teacher.safetensors"
    tensors.write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in sd.items()})
    return path, sd


def test_truncated_checkpoint_fails_naming_the_file(teacher_file, tmp_path):
    path, _ = teacher_file
    data = path.read_bytes()
    broken = tmp_path / "truncated.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(tensors.CheckpointError, match=r"truncated\.safetensors: truncated: tensor '.+'"):
        convert_transformer.load_transformer(broken)


def test_renamed_key_fails_naming_both_keys(teacher_file, tmp_path):
    _, sd = teacher_file
    sd = dict(sd)
    sd["transformer_blocks.1.attn.to_q_controll.weight"] = sd.pop("transformer_blocks.1.attn.to_q_control.weight")
    path = tmp_path / "renamed.safetensors"
    tensors.write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in sd.items()})
    with pytest.raises(tensors.CheckpointError) as err:
        convert_transformer.load_transformer(path)
    msg = str(err.value)
    assert "renamed.safetensors" in msg
    assert "1 missing key(s):\n    transformer_blocks.1.attn.to_q_control.weight" in msg
    assert "1 unexpected key(s):\n    transformer_blocks.1.attn.to_q_controll.weight" in msg


def test_misshaped_key_fails_naming_the_shapes(teacher_file, tmp_path):
    _, sd = teacher_file
    sd = dict(sd)
    sd["transformer_blocks.0.ff.control_conv.weight"] = np.zeros((64, 1, 5, 5))
    path = tmp_path / "misshaped.safetensors"
    tensors.write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in sd.items()})
    with pytest.raises(tensors.CheckpointError,
                       match=r"transformer_blocks\.0\.ff\.control_conv\.weight: expected \(64, 1, 3, 3\), "
                             r"found \(64, 1, 5, 5\)"):
        convert_transformer.load_transformer(path)


def test_only_the_documented_dead_keys_are_ignored(tmp_path):
    cfg_dict = SD3_CONFIGS["dual2_of3"]
    sd = dit4sr_state_dict(cfg_dict, seed=4, interval=True, dead_keys=True)
    sd["transformer_blocks.2.attn2.add_q_proj.weight"] = np.zeros((16, 16))  # block 2 has no attn2
    path = tmp_path / "student.safetensors"
    tensors.write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in sd.items()})
    with pytest.raises(tensors.CheckpointError) as err:
        convert_transformer.load_transformer(path)
    assert "unexpected key(s):\n    transformer_blocks.2.attn2.add_q_proj.weight" in str(err.value)
    del sd["transformer_blocks.2.attn2.add_q_proj.weight"]
    tensors.write_safetensors(path, {k: np.asarray(v, np.float32) for k, v in sd.items()})
    cfg, _ = convert_transformer.load_transformer(path)
    assert cfg.time_conditioning == "interval"


def test_converted_directory_round_trip_and_cli(teacher_file, tmp_path):
    from smfsr_jax.convert import __main__ as cli
    path, _ = teacher_file
    cfg, params = convert_transformer.load_transformer(path, lr_key_bug=False)
    cli.main(["transformer", "--src", str(path), "--dst", str(tmp_path / "converted"), "--lr_key_bug", "false",
              "--variant", "dit4sr_r1"])
    cfg2, params2 = convert_transformer.load_transformer(tmp_path / "converted")
    assert cfg2 == cfg and not cfg2.lr_key_bug
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    _, meta = converted_dir.read_converted_config(tmp_path / "converted")
    assert meta["lr_key_bug"] is False and meta["variant"] == "dit4sr_r1"


def test_scan_groups_are_the_runs_of_like_blocks():
    """Blocks 0..L-2 scan per maximal run of one kind; a prefix keeps `dual_blocks`, `blocks`, `last_block`."""
    def layout(**kw):
        cfg = mmdit.MMDiTConfig.tiny(**kw)
        params = mmdit.abstract_params(cfg)
        groups = {k: v["norm1"]["linear"]["kernel"].shape[0] for k, v in params.items() if "blocks" in k}
        assert ("attn2" in params["last_block"]) == cfg.last_block_dual
        mapping = [convert_transformer._block_group(cfg, i) for i in range(cfg.num_layers)]
        return groups, mapping

    assert layout() == ({"dual_blocks": 2}, [("dual_blocks", 0), ("dual_blocks", 1), ("last_block", -1)])
    assert layout(num_layers=5, dual_attention_layers=(0, 1, 2)) == (
        {"dual_blocks": 3, "blocks": 1},
        [("dual_blocks", 0), ("dual_blocks", 1), ("dual_blocks", 2), ("blocks", 0), ("last_block", -1)])
    assert layout(num_layers=4, dual_attention_layers=(0, 2)) == (
        {"dual_blocks": 1, "blocks": 1, "dual_blocks_1": 1},
        [("dual_blocks", 0), ("blocks", 0), ("dual_blocks_1", 0), ("last_block", -1)])
    assert layout(num_layers=8, dual_attention_layers=(7, 4, 2, 5)) == (
        {"blocks": 2, "dual_blocks": 1, "blocks_1": 1, "dual_blocks_1": 2, "blocks_2": 1},
        [("blocks", 0), ("blocks", 1), ("dual_blocks", 0), ("blocks_1", 0), ("dual_blocks_1", 0),
         ("dual_blocks_1", 1), ("blocks_2", 0), ("last_block", -1)])
    # SD3.5-Medium's set (blocks 0-12 of 24) keeps the layout its converted checkpoints have.
    assert layout(num_layers=24, dual_attention_layers=tuple(range(13)))[0] == {"dual_blocks": 13, "blocks": 10}


def test_non_prefix_dual_layers_convert_round_trip(tmp_path):
    cfg_dict = SD3_CONFIGS["dual_0_2_of4"]
    sd = dit4sr_state_dict(cfg_dict, seed=9, interval=True)
    (tmp_path / "src").mkdir()
    cfg, params = convert_transformer.load_transformer(write_checkpoint(tmp_path / "src", sd, cfg_dict))
    assert cfg.dual_attention_layers == (0, 2) and set(params) >= {"dual_blocks", "blocks", "dual_blocks_1"}
    np.testing.assert_array_equal(params["dual_blocks_1"]["attn2"]["to_q_control"]["kernel"][0],
                                  sd["transformer_blocks.2.attn2.to_q_control.weight"].T.astype(np.float32))
    convert_transformer.convert(tmp_path / "src", tmp_path / "converted", show_progress=False)
    cfg2, params2 = convert_transformer.load_transformer(tmp_path / "converted")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_dual_layers_that_disagree_with_the_weights_fail_naming_the_keys(tmp_path):
    sd = dit4sr_state_dict(SD3_CONFIGS["dual_0_2_of4"], seed=10, dead_keys=False)
    claimed = {**SD3_CONFIGS["dual_0_2_of4"], "dual_attention_layers": (0, 1)}
    with pytest.raises(tensors.CheckpointError) as err:
        convert_transformer.load_transformer(write_checkpoint(tmp_path, sd, claimed))
    msg = str(err.value)
    assert "missing key(s):\n    transformer_blocks.1.attn2." in msg
    assert "unexpected key(s):\n    transformer_blocks.2.attn2." in msg
    assert "mis-shaped key(s):" in msg and "transformer_blocks.1.norm1.linear.weight: expected (144, 16)" in msg


# ---------------------------------------------------------------------------------------------
# Full-size shapes (no memory).

def count(tree, pattern=None):
    flat = tensors.flatten(tree)
    return sum(int(np.prod(v.shape)) for k, v in flat.items() if pattern is None or re.search(pattern, k))


def test_full_size_parameter_counts():
    sd35 = mmdit.abstract_params(mmdit.MMDiTConfig.sd35_medium())
    assert count(sd35, "pos_embed/pos_embed") == 226_492_416
    assert count(sd35) - 226_492_416 == 2_243_171_520
    teacher = mmdit.abstract_params(mmdit.MMDiTConfig.dit4sr_teacher())
    assert count(teacher, "control") == 350_877_696
    assert count(teacher) - count(sd35) == 350_877_696
    assert count(teacher, "to_k_control") == 87_350_784
    student = mmdit.abstract_params(mmdit.MMDiTConfig.smfsr_student())
    assert count(student, "time_text_embed_interval") == 15_344_640
    assert count(student, "control|time_text_embed_interval") == 366_222_336
    assert count(student, "control|time_text_embed_interval") - count(student, "to_k_control") == 278_871_552


def test_full_size_forward_shapes():
    cfg = mmdit.MMDiTConfig.smfsr_student(dtype="bfloat16")
    params = mmdit.abstract_params(cfg)
    z = jax.ShapeDtypeStruct((2, 64, 48, 16), jnp.float32)
    out = jax.eval_shape(lambda p, z: mmdit.MMDiT(cfg).apply(
        {"params": p}, z, context=jnp.zeros((2, 333, 4096)), pooled=jnp.zeros((2, 2048)),
        t=jnp.ones(2), r=jnp.zeros(2), lr_latents=z), params, z)
    assert out.shape == (2, 64, 48, 16) and out.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Model behaviour.

def tiny_inputs(cfg, batch=2, hw=(8, 8), seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(batch, *hw, cfg.in_channels)).astype(np.float32)
    kw = dict(context=rng.normal(size=(batch, 5, cfg.joint_attention_dim)).astype(np.float32),
              pooled=rng.normal(size=(batch, cfg.pooled_projection_dim)).astype(np.float32),
              t=np.array([0.9, 0.3], np.float32)[:batch])
    if cfg.time_conditioning == "interval":
        kw["r"] = np.array([0.1, 0.0], np.float32)[:batch]
    if cfg.lr_stream:
        kw["lr_latents"] = rng.normal(size=(batch, *hw, cfg.in_channels)).astype(np.float32)
    return z, kw


def forward(cfg, params, z, kw):
    return jax.jit(lambda p, z, kw: mmdit.MMDiT(cfg).apply({"params": p}, z, **kw))(params, z, kw)


def test_bf16_compute_tracks_fp32():
    cfg = mmdit.MMDiTConfig.tiny_student()
    params = random_mmdit_params(cfg)
    z, kw = tiny_inputs(cfg)
    ref = forward(cfg, params, z, kw)
    out = forward(cfg.replace(dtype="bfloat16"), params, z, kw)
    assert out.dtype == jnp.float32
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert rel < 5e-2, rel


def test_remat_policies_keep_values_and_gradients():
    cfg = mmdit.MMDiTConfig.tiny_teacher()
    params = random_mmdit_params(cfg, seed=3)
    z, kw = tiny_inputs(cfg)

    def value_and_grad(c):
        loss = lambda p: jnp.mean(mmdit.MMDiT(c).apply({"params": p}, z, **kw) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    v0, g0 = value_and_grad(cfg)
    for policy in ("full", "save_qkv_attn"):
        v1, g1 = value_and_grad(cfg.replace(remat_policy=policy))
        np.testing.assert_allclose(v0, v1, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_attention_switch_and_errors():
    cfg = mmdit.MMDiTConfig.tiny_teacher()
    params = random_mmdit_params(cfg, seed=4)
    z, kw = tiny_inputs(cfg)
    ref = forward(cfg, params, z, kw)
    # `cudnn` falls back to the XLA path for fp32 and off the GPU, so one config runs everywhere.
    for impl in ("xla", "cudnn"):
        out = forward(cfg.replace(attention=impl), params, z, kw)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    bf16 = {impl: np.asarray(forward(cfg.replace(attention=impl, dtype="bfloat16"), params, z, kw), np.float32)
            for impl in ("xla", "cudnn")}
    if jax.default_backend() != "gpu":
        np.testing.assert_array_equal(bf16["cudnn"], bf16["xla"])
    np.testing.assert_allclose(bf16["cudnn"], ref, atol=0.05 * np.abs(ref).max())
    with pytest.raises(ValueError, match="implementation"):
        forward(cfg.replace(attention="flash"), params, z, kw)
    with pytest.raises(ValueError, match="lr_latents"):
        mmdit.MMDiT(cfg).apply({"params": params}, z, **{**kw, "lr_latents": None})
    with pytest.raises(ValueError, match="exceeds"):
        big = np.zeros((1, 40, 40, 16), np.float32)
        mmdit.MMDiT(cfg).apply({"params": params}, big, **tiny_inputs(cfg, batch=1, hw=(40, 40))[1])
    with pytest.raises(ValueError, match=r"dual_attention_layers \[3\] are not blocks of a 3-block network"):
        mmdit.MMDiTConfig.tiny(dual_attention_layers=(0, 3))


def test_to_k_control_gets_no_gradient_in_double_norm_mode():
    for bug in (True, False):
        cfg = mmdit.MMDiTConfig.tiny_teacher(lr_key_bug=bug)
        params = random_mmdit_params(cfg, seed=5)
        z, kw = tiny_inputs(cfg)
        grads = jax.jit(jax.grad(lambda p: jnp.mean(mmdit.MMDiT(cfg).apply({"params": p}, z, **kw) ** 2)))(params)
        k_grad = max(float(jnp.abs(g).max()) for path, g in tensors.flatten(grads).items() if "to_k_control" in path)
        assert (k_grad == 0.0) == bug


def test_rectangular_latents_and_positional_crop():
    cfg = mmdit.MMDiTConfig.tiny_student()
    params = random_mmdit_params(cfg, seed=6)
    z, kw = tiny_inputs(cfg, hw=(6, 10))
    assert forward(cfg, params, z, kw).shape == (2, 6, 10, 16)


def test_sincos_table_matches_diffusers_formula():
    import_torch()
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    ours = mmdit.sincos_pos_embed_table(24, 16, 4)[0]
    ref = get_2d_sincos_pos_embed(24, 16, base_size=4, interpolation_scale=1.0, output_type="pt").numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_timestep_frequencies_match_torch_within_one_ulp():
    fixture = shared_path("fixtures", "parity", "dit4sr_teacher_tiny")
    torch_freqs = np.load(fixture / "intermediates.npz")["timestep_freqs_fp32"].astype(np.float32)
    ours = mmdit._timestep_frequencies(128)
    ulps = np.abs(ours.view(np.int32) - torch_freqs.view(np.int32))
    assert ulps.max() <= 1 and (ulps > 0).sum() <= 3


# ---------------------------------------------------------------------------------------------
# Stage initialisers.

def test_teacher_from_base_and_student_from_teacher():
    base_cfg = mmdit.MMDiTConfig.tiny()
    base = random_mmdit_params(base_cfg, seed=8)
    t_cfg, teacher = teacher_from_base(base_cfg, base)
    assert t_cfg.lr_stream
    flat, flat_base = tensors.flatten(teacher), tensors.flatten(base)
    for path, value in flat_base.items():  # every base tensor is kept as it is
        np.testing.assert_array_equal(flat[path], value)
    assert set(flat) - set(flat_base) and all("control" in p for p in set(flat) - set(flat_base))
    for path, value in flat.items():
        if re.search(r"to_[qkv]_control|control_conv", path):
            assert not np.any(value), path
        if "to_out_control" in path:
            np.testing.assert_array_equal(value, flat[path.replace("to_out_control", "to_out")])
    s_cfg, student = student_from_teacher(t_cfg, teacher, interval_init="torch_default", seed=0)
    assert s_cfg.time_conditioning == "interval" and s_cfg.time_scale == 1.0
    np.testing.assert_array_equal(student["time_text_embed_interval"]["time_text_embed"]["timestep_embedder"]
                                  ["linear_1"]["kernel"], teacher["time_text_embed"]["timestep_embedder"]["linear_1"]["kernel"])
    w = student["time_text_embed_interval"]["interval_embedder"]["linear_1"]["kernel"]
    d = s_cfg.hidden_size
    assert w.shape == (2 * d, d) and np.abs(w).max() <= 1 / np.sqrt(2 * d) and np.abs(w).std() > 0
    z, kw = tiny_inputs(s_cfg)
    assert forward(s_cfg, student, z, kw).shape == z.shape

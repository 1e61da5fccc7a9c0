"""Released weights -> bundle (weights/pretrained.py): tiny weights in the published layouts (SMFSR smfsr_q in a
Hugging Face cache, DiT4SR dit4sr_r1 sharded on disk with the NULL_*.pt beside it, an SD3.5 root with and without
text encoders), `sr --model` with Hub ids offline, the conversion cache (reuse, rebuild of corrupt entries),
NULL embeddings found or encoded, lr_key_bug by name, `convert bundle`, sources, cache and bundle in a bucket, the
error cases, and the converted transformers against the torch reference."""

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smfsr_jax import sr
from smfsr_jax.convert import __main__ as convert_cli
from smfsr_jax.convert import converted_dir
from smfsr_jax.convert import tensors as tensors_lib
from smfsr_jax.convert import transformer as transformer_convert
from smfsr_jax.convert.text import load_text_encoders
from smfsr_jax.core import cache, files
from smfsr_jax.core.errors import UserError
from smfsr_jax.models.text import null_prompt_embeddings
from smfsr_jax.sampling.runner import SRPipeline
from smfsr_jax.weights import bundle as bundle_lib
from smfsr_jax.weights import pretrained
from tests.conftest import import_torch
from tests.test_mmdit import assert_close, dit4sr_state_dict, random_inputs, run_flax
from tests.test_sampling import lr_crop
from tests.text_fixtures import write_tiny_sd35_root

SMFSR_ID, SD35_ID = "zw121/SMFSR/smfsr_q", "stabilityai/stable-diffusion-3.5-medium"
REVISION = "0123456789abcdef0123456789abcdef01234567"
# diffusers SD3Transformer2DModel geometry with the tiny text stack's widths (T5 96, pooled 32 + 40) and SD3's 16
# latent channels; its positional grid is 2 x 16 = 32 latent pixels, below SMFSR's 64 tile.
CONFIG = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=96, caption_projection_dim=16, pooled_projection_dim=72, out_channels=16,
              pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
SIZES = {"a": (37, 53), "b": (30, 41)}  # LR (height, width): two preprocessed sizes


def write_transformer(folder, state, shards: int = 1):
    """A diffusers transformer folder: config.json + diffusion_pytorch_model.safetensors, or `shards` files with
    diffusion_pytorch_model.safetensors.index.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **CONFIG}))
    tensors = {k: np.asarray(v, np.float32) for k, v in state.items()}
    if shards == 1:
        tensors_lib.write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
        return
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        tensors_lib.write_safetensors(folder / name, {k: tensors[k] for k in part})
        weight_map.update({k: name for k in part})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def write_null(torch, folder, seed: int):
    generator = torch.Generator().manual_seed(seed)
    embeds, pooled = torch.randn(154, 96, generator=generator), torch.randn(72, generator=generator)
    torch.save(embeds, folder / "NULL_prompt_embeds.pt")
    torch.save(pooled, folder / "NULL_pooled_prompt_embeds.pt")
    return embeds.numpy(), pooled.numpy()


def write_sd35(torch, root, text_encoders: bool):
    """An SD3.5-Medium diffusers root: transformer/ (plain SD3), vae/ (4 levels: SD3's factor 8), text stack."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    torch.manual_seed(0)
    SD3Transformer2DModel(**CONFIG).save_pretrained(root / "transformer")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4,
                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                  shift_factor=0.0609).save_pretrained(root / "vae")
    if text_encoders:
        write_tiny_sd35_root(str(root))
    return root


def hub_snapshot(hub, repo: str, src, prefix: str = ""):
    """Lay `src` out as huggingface_hub's cache holds `repo`: blobs, snapshots/<rev>/ links to them, refs/main."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / REVISION / prefix / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The tiny releases: states (diffusers names) and where they lie."""
    torch = import_torch()
    root = tmp_path_factory.mktemp("released")
    smfsr_q = dit4sr_state_dict(CONFIG, seed=1, interval=True)
    dit4sr_r1 = dit4sr_state_dict(CONFIG, seed=2)
    write_transformer(root / "smfsr" / "smfsr_q" / "transformer", smfsr_q)
    write_transformer(root / "DiT4SR" / "dit4sr_r1", dit4sr_r1, shards=2)
    null = write_null(torch, root / "DiT4SR", seed=3)
    sd35 = write_sd35(torch, root / "sd35", text_encoders=True)
    vae_only = root / "sd35_vae_only"
    vae_only.mkdir()
    (vae_only / "vae").symlink_to(sd35 / "vae")
    hub = root / "hub"
    hub_snapshot(hub, "zw121/SMFSR", root / "smfsr")
    hub_snapshot(hub, SD35_ID, sd35)
    return dict(root=root, hub=hub, smfsr_q=smfsr_q, dit4sr_r1=dit4sr_r1, null=null, sd35=sd35, vae_only=vae_only,
                r1_dir=root / "DiT4SR" / "dit4sr_r1", cache=root / "cache")


@pytest.fixture(autouse=True)
def offline_hub(released, monkeypatch):
    """HF_HUB_OFFLINE=1 with the cache above; huggingface_hub reads both at import, so its constants too."""
    from huggingface_hub import constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(released["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(released["hub"]))
    monkeypatch.setenv(cache.CACHE_ENV, str(released["cache"]))


@pytest.fixture(scope="module")
def lr_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lr")
    for (name, size), picture in zip(SIZES.items(), ("astronaut", "coffee")):
        Image.fromarray(lr_crop(picture, *size)).save(folder / f"{name}.png")
    return folder


def read_outputs(folder) -> dict:
    return {name: np.asarray(Image.open(folder / f"{name}.png")) for name in SIZES}


def test_sr_cli_hub_ids_convert_once_then_reuse_the_cache(released, lr_dir, tmp_path, caplog):
    args = ["--model", SMFSR_ID, "--base", SD35_ID, "--input", str(lr_dir), "--batch_size", "2"]
    with caplog.at_level(logging.INFO, logger=pretrained.__name__):
        assert sr.main([*args, "--output", str(tmp_path / "first")]) == 0
    log = caplog.text
    assert "converting the bundle" in log and 'encode("")' in log and "using the cached" not in log
    first = read_outputs(tmp_path / "first")
    for name, (height, width) in SIZES.items():
        assert first[name].shape == (4 * height, 4 * width, 3)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=pretrained.__name__):
        assert sr.main([*args, "--output", str(tmp_path / "second")]) == 0
    bundles = list((released["cache"] / pretrained.BUNDLES_DIR).iterdir())
    assert len(bundles) == 1 and f"using the cached bundle of {SMFSR_ID} + {SD35_ID} at {bundles[0]}" in caplog.text
    assert "converting" not in caplog.text
    for name, image in read_outputs(tmp_path / "second").items():
        np.testing.assert_array_equal(image, first[name])

    # No NULL_*.pt in the repo: encode("") at T5 length 256 with the (cached, converted) text encoders.
    loaded = bundle_lib.load_bundle(bundles[0])
    assert loaded.meta["variant"] == "smfsr_q" and loaded.meta["lr_key_bug"] and loaded.transformer_config.lr_key_bug
    assert loaded.text_encoders_dir.startswith(str(released["cache"] / pretrained.TEXT_ENCODERS_DIR))
    embeds, pooled = null_prompt_embeddings(load_text_encoders(str(released["sd35"])), 256)
    assert loaded.null_embeddings[0].shape == (333, 96)
    np.testing.assert_allclose(loaded.null_embeddings[0], embeds, atol=1e-5)
    np.testing.assert_allclose(loaded.null_embeddings[1], pooled, atol=1e-5)

    # The positional grid (32 latent pixels) caps SMFSR's 64/24 tiles: the largest tile, with 3/8 overlap.
    pipeline = SRPipeline.from_bundle(loaded)
    assert (pipeline.settings.tile_size, pipeline.settings.tile_overlap) == (32, 12)

    # The student's layout mapping, against the torch reference.
    torch = import_torch()
    from tests import torch_dit4sr
    inputs = random_inputs(CONFIG, (8, 6), seed=4, lr=True, interval=True)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        reference = torch_dit4sr.forward(
            {k: torch.from_numpy(np.float32(v).astype(np.float64)) for k, v in released["smfsr_q"].items()},
            CONFIG, t["hidden_states"], t["controlnet_image"], t["encoder_hidden_states"], t["pooled_projections"],
            t["timestep"], t["r_timestep"], lr_key_bug=True).numpy()
    assert_close(run_flax(loaded.transformer_config, loaded.transformer_params, inputs), reference)


def test_sharded_dit4sr_r1_null_found_parity_and_corrupt_entries(released, tmp_path, caplog):
    torch = import_torch()
    from tests import torch_dit4sr
    cache = tmp_path / "cache"

    def convert():
        return pretrained.load_or_convert(released["r1_dir"], released["vae_only"], cache_dir=cache)

    path = convert()
    loaded = bundle_lib.load_bundle(path)
    # dit4sr_r1 is the LR-key fix; the NULL_*.pt of its parent directory are used, and there are no text encoders.
    assert loaded.meta["variant"] == "dit4sr_r1" and not loaded.transformer_config.lr_key_bug
    assert "NULL_prompt_embeds.pt" in loaded.meta["null_embeddings"] and loaded.text_encoders_dir is None
    for ours, published in zip(loaded.null_embeddings, released["null"]):
        np.testing.assert_array_equal(ours, published)
    inputs = random_inputs(CONFIG, (6, 8), seed=5, lr=True)
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        reference = torch_dit4sr.forward(
            {k: torch.from_numpy(np.float32(v).astype(np.float64)) for k, v in released["dit4sr_r1"].items()},
            CONFIG, t["hidden_states"], t["controlnet_image"], t["encoder_hidden_states"], t["pooled_projections"],
            t["timestep"], lr_key_bug=False).numpy()
    assert_close(run_flax(loaded.transformer_config, loaded.transformer_params, inputs), reference)
    assert pretrained.load_or_convert(released["r1_dir"], released["vae_only"], cache_dir=cache,
                                      lr_key_bug=True) != path  # an option is part of the key

    # A deleted file, a removed record: rebuilt in place (and logged), never used.
    victim = os.path.join(path, bundle_lib.TRANSFORMER_DIR, converted_dir.CONFIG_NAME)
    os.remove(victim)
    with caplog.at_level(logging.INFO, logger=pretrained.__name__):
        assert convert() == path
    assert "cannot be used" in caplog.text and "is missing" in caplog.text
    assert pretrained.entry_problem(path) is None and os.path.isfile(victim)
    os.remove(os.path.join(path, pretrained.ENTRY_RECORD))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=pretrained.__name__):
        assert convert() == path
    assert f"no valid {pretrained.ENTRY_RECORD}" in caplog.text and pretrained.entry_problem(path) is None
    # Same-size damage behind a complete record: the bundle fails to load and is rebuilt.
    params = Path(path) / bundle_lib.TRANSFORMER_DIR / converted_dir.PARAMS_DIR
    chunk = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=pretrained.__name__):
        rebuilt = pretrained.load_pretrained(released["r1_dir"], released["vae_only"], cache_dir=cache)
    assert "fails to load" in caplog.text
    np.testing.assert_array_equal(rebuilt.null_embeddings[0], released["null"][0])
    leftovers = [p.name for p in (cache / pretrained.BUNDLES_DIR).iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_bucket_sources_and_cache(released, bucket_dir, tmp_path, monkeypatch, caplog):
    """MODEL, BASE and the cache in a bucket: the sources are staged as they are read, the entry is written there
    (its record last) and reused by the next call."""
    monkeypatch.setenv(files.SCRATCH_ENV, str(tmp_path / "scratch"))
    files.copy_tree(released["root"] / "DiT4SR", files.join(bucket_dir, "DiT4SR"))  # NULL_*.pt beside dit4sr_r1
    files.copy_tree(released["sd35"] / "vae", files.join(bucket_dir, "sd35", "vae"))
    model, base = files.join(bucket_dir, "DiT4SR", "dit4sr_r1"), files.join(bucket_dir, "sd35")
    cache = files.join(bucket_dir, "cache")
    with caplog.at_level(logging.INFO):
        path = pretrained.load_or_convert(model, base, cache_dir=cache)
    assert "converting the bundle" in caplog.text and f"staging {model}/" in caplog.text
    assert path.startswith(files.join(cache, pretrained.BUNDLES_DIR) + "/")
    assert files.listdir(files.join(cache, pretrained.BUNDLES_DIR)) == [os.path.basename(path)]  # nothing aside
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=pretrained.__name__):
        assert pretrained.load_or_convert(model, base, cache_dir=cache) == path
    assert f"using the cached bundle of {model} + {base} at {path}" in caplog.text and "converting" not in caplog.text

    loaded = bundle_lib.load_bundle(path)
    assert loaded.meta["variant"] == "dit4sr_r1" and not loaded.transformer_config.lr_key_bug
    for ours, published in zip(loaded.null_embeddings, released["null"]):
        np.testing.assert_array_equal(ours, published)
    _, local_params = transformer_convert.load_transformer(released["r1_dir"], lr_key_bug=False)
    flat_ours, flat_local = tensors_lib.flatten(loaded.transformer_params), tensors_lib.flatten(local_params)
    assert flat_ours.keys() == flat_local.keys()
    assert all(np.array_equal(flat_ours[k], flat_local[k]) for k in flat_local)

    # An entry without its record (being written, or left by an interrupted write) is absent, not damaged.
    files.remove(files.join(path, pretrained.ENTRY_RECORD))
    assert pretrained.entry_problem(path) == "absent"

    # `convert bundle` into the bucket with BASE's text encoders there: converted into DST/text_encoders (the
    # tokenizers copied, then staged to encode "").
    files.copy_tree(released["sd35"], base)
    files.copy_tree(released["root"] / "smfsr" / "smfsr_q", files.join(bucket_dir, "smfsr_q"))
    dst = files.join(bucket_dir, "bundle")
    assert convert_cli.main(["bundle", "--model", files.join(bucket_dir, "smfsr_q"), "--base", base,
                             "--dst", dst]) == 0
    loaded = bundle_lib.load_bundle(dst)
    assert loaded.text_encoders_dir == files.join(dst, bundle_lib.TEXT_ENCODERS_DIR)
    embeds, pooled = null_prompt_embeddings(load_text_encoders(str(released["sd35"])), 256)
    np.testing.assert_allclose(loaded.null_embeddings[0], embeds, atol=1e-5)
    np.testing.assert_allclose(loaded.null_embeddings[1], pooled, atol=1e-5)


def test_convert_bundle_cli_with_explicit_null_embeddings(released, tmp_path, capsys):
    dst = tmp_path / "bundle"
    assert convert_cli.main(["bundle", "--model", str(released["r1_dir"]), "--base", str(released["vae_only"]),
                             "--null_embeddings", str(released["root"] / "DiT4SR"), "--lr_key_bug", "true",
                             "--dst", str(dst)]) == 0
    loaded = bundle_lib.load_bundle(dst)
    assert loaded.meta["variant"] == "dit4sr_r1" and loaded.transformer_config.lr_key_bug
    np.testing.assert_array_equal(loaded.null_embeddings[1], released["null"][1])
    for wrong in (["--src", str(released["r1_dir"])], ["--model", str(released["r1_dir"])]):  # --src; no --base
        with pytest.raises(SystemExit):
            convert_cli.main(["bundle", *wrong, "--dst", str(dst)])
    assert "bundle takes --model and --base" in capsys.readouterr().err


def test_errors_name_the_file_and_the_problem(released, lr_dir, tmp_path, capsys):
    cases = [  # (MODEL, BASE), what the message names, why
        ((released["sd35"], released["sd35"]), released["sd35"] / "transformer", "without DiT4SR's LR stream"),
        ((released["r1_dir"], released["r1_dir"].parent), released["r1_dir"].parent, "has no vae/ folder"),
        ((released["root"] / "smfsr" / "smfsr_q", released["vae_only"]), released["vae_only"], "no NULL embeddings"),
        (("zw121/SMFSR/no_such_variant", SD35_ID), "zw121/SMFSR", "has no no_such_variant/ folder"),
        (("someone/missing-repo/smfsr_q", SD35_ID), "someone/missing-repo/smfsr_q", "HF_HUB_OFFLINE is set"),
    ]
    broken = tmp_path / "dit4sr_r1"  # a shard the index names is missing
    broken.mkdir()
    for path in released["r1_dir"].iterdir():
        if not path.name.startswith("diffusion_pytorch_model-00002"):
            (broken / path.name).symlink_to(path)
    index = broken / "diffusion_pytorch_model.safetensors.index.json"
    cases.append(((broken, released["vae_only"]), index, "shard"))
    for (model, base), named, reason in cases:
        with pytest.raises(UserError, match=reason) as error:
            pretrained.load_or_convert(model, base, cache_dir=tmp_path / "cache")
        assert str(named) in str(error.value)

    # A caption without text encoders stops the run before any image.
    out = tmp_path / "captioned"
    assert sr.main(["--model", str(released["r1_dir"]), "--base", str(released["vae_only"]), "--input", str(lr_dir),
                    "--output", str(out), "--cache_dir", str(tmp_path / "cache"), "--caption", "a dog"]) == 2
    err = capsys.readouterr().err
    assert "--caption needs text encoders" in err and str(released["vae_only"]) in err
    assert not any(out.iterdir())
    with pytest.raises(SystemExit) as exit_info:  # checked with the arguments, before any folder is made
        sr.main(["--model", str(released["r1_dir"]), "--input", str(lr_dir), "--output", str(tmp_path / "no_base")])
    assert exit_info.value.code == 2 and "--model needs --base" in capsys.readouterr().err
    assert not (tmp_path / "no_base").exists()


@pytest.mark.slow  # 16 min on 2 CPU cores: 625 latent tiles, and the VAE's passes over 64 tiles each way
def test_sr_cli_hub_ids_any_size_up_to_a_4096_output(released, tmp_path):
    """The released-weights command on mixed sizes, one LR of 1024² (a 4096² output: a 512² latent, tiled in
    latent space and through the VAE)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    sizes = {"big": (1024, 1024), "small": (37, 53)}
    big = np.asarray(Image.fromarray(lr_crop("astronaut", 256, 256)).resize((1024, 1024), Image.BICUBIC))
    Image.fromarray(big).save(folder / "big.png")
    Image.fromarray(lr_crop("coffee", *sizes["small"])).save(folder / "small.png")
    out = tmp_path / "out"
    assert sr.main(["--model", SMFSR_ID, "--base", SD35_ID, "--input", str(folder), "--output", str(out)]) == 0
    for name, (height, width) in sizes.items():
        image = np.asarray(Image.open(out / f"{name}.png"))
        assert image.shape == (4 * height, 4 * width, 3) and image.std() > 0

"""Weights in a bucket (gs://, the local emulator of conftest.py): converted networks, model bundles, the convert
command and a training workdir's checkpoints read and written there as on a local disk, with the same results."""

import json
import logging

import jax
import ml_dtypes
import numpy as np
import pytest

from smfsr_jax.convert import converted_dir
from smfsr_jax.convert import tensors
from smfsr_jax.convert.__main__ import main as convert_main
from smfsr_jax.convert.transformer import load_transformer
from smfsr_jax.convert.vae import DIFFUSERS_WEIGHTS, checkpoint_shapes, load_vae
from smfsr_jax.convert.vae import abstract_params as vae_abstract_params
from smfsr_jax.core import files
from smfsr_jax.models.vae import VAEConfig
from smfsr_jax.training import inference
from smfsr_jax.training.stages import loading
from smfsr_jax.weights import bundle
from tests.test_sampling import random_embeddings, random_params, tiny_config


@pytest.fixture(autouse=True)
def scratch(tmp_path, monkeypatch):
    """Staged copies go under this test's tmp_path."""
    monkeypatch.setenv(files.SCRATCH_ENV, str(tmp_path / "scratch"))


def assert_trees_equal(ours, reference):
    ours, reference = tensors.flatten(ours), tensors.flatten(reference)
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert np.asarray(ours[key]).dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(value), err_msg=key)


def test_converted_round_trip(bucket_dir):
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.standard_normal((3, 4)).astype(np.float32),
                        "bias": rng.standard_normal(4).astype(ml_dtypes.bfloat16)},
              "norm": {"scale": np.ones(4, np.float32)}}
    dst = files.join(bucket_dir, "converted")
    converted_dir.save_converted(dst, {"width": 4}, params, meta={"converter": "test"})
    assert converted_dir.is_converted(dst)
    config, meta, loaded = converted_dir.load_converted(dst)
    assert config == {"width": 4} and meta == {"converter": "test"}
    assert_trees_equal(loaded, params)

    # Converting again into the same place replaces it.
    params["norm"]["scale"] = np.full(4, 2.0, np.float32)
    converted_dir.save_converted(dst, {"width": 5}, params)
    config, meta, loaded = converted_dir.load_converted(dst)
    assert config == {"width": 5} and meta == {}
    assert_trees_equal(loaded, params)
    assert not converted_dir.is_converted(files.join(bucket_dir, "absent"))


def test_bundle_in_a_bucket_equals_the_local_one(tmp_path, bucket_dir):
    config = tiny_config("student").replace(in_channels=16, out_channels=16)
    params = random_params(config, seed=1)
    vae_config = VAEConfig.tiny()
    rng = np.random.default_rng(2)
    vae_params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                              vae_abstract_params(vae_config))
    text_url = files.join(bucket_dir, "text_encoders")
    files.write_text(files.join(text_url, "marker"), "x")
    options = dict(student_config=config, student_params=params, autoencoder_config=vae_config,
                   autoencoder_params=vae_params, null_embeddings=random_embeddings(3),
                   negative_embeddings=random_embeddings(4), text_encoders_dir=text_url, meta={"stage": 1})
    local = bundle.load_bundle(bundle.save_bundle(tmp_path / "b", **options))
    url = bundle.save_bundle(files.join(bucket_dir, "b"), **options)
    assert url == files.join(bucket_dir, "b")
    remote = bundle.load_bundle(url)

    assert remote.path == url and remote.meta == local.meta == {"stage": 1}
    assert remote.transformer_config == local.transformer_config and remote.autoencoder_config == vae_config
    assert_trees_equal(remote.transformer_params, local.transformer_params)
    assert_trees_equal(remote.autoencoder_params, local.autoencoder_params)
    for ours, theirs in ((remote.null_embeddings, local.null_embeddings),
                         (remote.negative_embeddings, local.negative_embeddings),
                         (bundle.read_null_embeddings(url), local.null_embeddings)):
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])
    assert remote.text_encoders_dir == local.text_encoders_dir == text_url  # a referenced URL stays a URL
    assert bundle.read_bundle_record(url)["text_encoders"] == text_url

    # Text encoders copied into a bucket bundle.
    copied = bundle.save_bundle(files.join(bucket_dir, "copied"), **{**options, "text_encoders_dir": text_url},
                                copy_text_encoders=True)
    assert bundle.load_bundle(copied).text_encoders_dir == files.join(copied, bundle.TEXT_ENCODERS_DIR)
    assert files.read_text(files.join(copied, bundle.TEXT_ENCODERS_DIR, "marker")) == "x"
    with pytest.raises(FileNotFoundError, match="not a model bundle"):
        bundle.load_bundle(files.join(bucket_dir, "nothing"))


def test_convert_command_reads_and_writes_buckets(tmp_path, bucket_dir, caplog, capsys):
    vae_config = VAEConfig.tiny()
    rng = np.random.default_rng(5)
    source = tmp_path / "vae"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({
        "block_out_channels": list(vae_config.block_out_channels), "layers_per_block": vae_config.layers_per_block,
        "latent_channels": vae_config.latent_channels, "norm_num_groups": vae_config.norm_num_groups,
        "use_quant_conv": False, "use_post_quant_conv": False}))
    tensors.write_safetensors(source / DIFFUSERS_WEIGHTS, {
        key: rng.standard_normal(shape).astype(np.float32) for key, shape in checkpoint_shapes(vae_config).items()})
    src, dst = files.join(bucket_dir, "vae"), files.join(bucket_dir, "converted")
    files.copy_tree(source, src)
    with caplog.at_level(logging.INFO):
        assert convert_main(["vae", f"--src={src}", f"--dst={dst}"]) == 0
    assert f"staging {files.join(src, DIFFUSERS_WEIGHTS)}" in caplog.text  # files.stage says what it copies
    assert f"wrote {dst}" in capsys.readouterr().err
    _, meta = converted_dir.read_converted_config(dst)
    assert meta["source"] == src
    converted_config, converted = load_vae(dst)
    local_config, local = load_vae(source)
    assert converted_config == local_config
    assert_trees_equal(converted, local)

    # A bad file in a bucket: the message names its URL, not the staged copy.
    bad = files.join(bucket_dir, "bad")
    files.write_bytes(files.join(bad, "model.safetensors"), b"this is not a checkpoint")
    files.write_bytes(files.join(bad, "musiq.pth"), b"PK\x03\x04 this is not a zip archive")
    for kind, name, problem in (("transformer", "model.safetensors", "truncated safetensors header"),
                                ("musiq", "musiq.pth", "corrupt zip archive")):
        assert convert_main([kind, f"--src={files.join(bad, name)}", f"--dst={files.join(bad, 'out')}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {files.join(bad, name)}: {problem}"), err
    assert not files.exists(files.join(bad, "out"))


def test_checkpoint_and_init_weights_of_a_workdir_in_a_bucket(teacher_run, bucket_dir):
    workdir = files.join(bucket_dir, "teacher")
    files.copy_tree(teacher_run, workdir)
    local, remote = inference.load_checkpoint(str(teacher_run)), inference.load_checkpoint(workdir)
    assert remote.path == workdir and remote.meta == local.meta
    assert remote.transformer_config == local.transformer_config
    assert_trees_equal(remote.transformer_params, local.transformer_params)
    np.testing.assert_array_equal(remote.null_embeddings[0], local.null_embeddings[0])

    # init.teacher / init.student given as the workdir: its exported bundle.
    assert loading.weights_path(workdir) == files.join(workdir, "bundle")
    remote_config, remote_params = load_transformer(loading.weights_path(workdir))
    local_config, local_params = load_transformer(teacher_run / "bundle")
    assert remote_config == local_config
    assert_trees_equal(remote_params, local_params)

"""SD3 text encoders: fp32 parity with transformers (CLIPTextModelWithProjection, T5EncoderModel), prompt
assembly against diffusers' StableDiffusion3Pipeline.encode_prompt, strict converters, caption rule."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smfsr_jax.convert.tensors import CheckpointError, read_safetensors, write_safetensors
from smfsr_jax.convert.text import (clip_config_from_shapes, convert, load_clip_text, load_null_embeddings,
                                    load_t5, load_text_encoders, t5_config_from_shapes)
from smfsr_jax.models.text import (CAPTION_SUFFIX, CLIPTextConfig, CLIPTextEncoder, T5Config, T5Encoder,
                                   encode_prompts, jitted_apply, null_prompt_embeddings, postprocess_caption,
                                   relative_position_buckets)
from tests import text_fixtures
from tests.conftest import import_torch

PROMPTS = ["a photo of the cat", "The dog, sharp detailed image with a green tree and the sky!", "",
           " ".join(["the green tree"] * 40)]  # longer than 77 CLIP tokens: truncated


CLIP_CONFIGS = {
    # SD3 CLIP-L rules: quick_gelu, EOS padding, legacy argmax pooling.
    "quick_gelu-legacy_eos": text_fixtures.TINY_CLIP_L,
    # SD3 CLIP-G rules: exact gelu, '!' padding, first-EOS pooling, projection != width.
    "gelu-first_eos": text_fixtures.TINY_CLIP_G,
    # One layer: hidden_states[-2] is the embedding output; short context.
    "one_layer": CLIPTextConfig(vocab_size=90, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                num_attention_heads=3, max_position_embeddings=20, projection_dim=16,
                                eos_token_id=89),
}
T5_CONFIGS = {
    "tiny": text_fixtures.TINY_T5,
    # Few buckets and a short max distance so that a 150-token sequence reaches the log-spaced and clipped buckets.
    "short_distance": T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                               relative_attention_num_buckets=16, relative_attention_max_distance=40),
}


def assert_close(ours, reference, rtol=1e-5):
    reference = np.asarray(reference, np.float64)
    err = np.abs(np.asarray(ours, np.float64) - reference).max()
    scale = np.abs(reference).max()
    assert err <= rtol * scale, f"max abs error {err:.3g}, max |reference| {scale:.3g}"


def clip_token_ids(rng, config: CLIPTextConfig, batch: int, pad: int) -> np.ndarray:
    """BOS, random body, EOS, padding; bodies of random length including a full one."""
    length, eos = config.max_position_embeddings, config.vocab_size - 1
    ids = np.full((batch, length), pad, np.int64)
    for b, body in enumerate([length - 2] + list(rng.integers(0, length - 2, batch - 1))):
        ids[b, 0] = eos - 1
        ids[b, 1:1 + body] = rng.integers(1, eos - 1, body)
        ids[b, 1 + body] = eos
    return ids


def torch_state(torch, state):
    return {k: torch.from_numpy(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def sd35_root(tmp_path_factory):
    return text_fixtures.write_tiny_sd35_root(str(tmp_path_factory.mktemp("sd35")), seed=0)


@pytest.fixture(scope="module")
def encoders(sd35_root):
    return text_fixtures.tiny_text_encoders(sd35_root, seed=0)  # rewrites the same seeded files


@pytest.mark.parametrize("name", list(CLIP_CONFIGS))
def test_clip_matches_transformers(name, tmp_path):
    torch = import_torch()
    from transformers import CLIPTextConfig as TorchConfig
    from transformers import CLIPTextModelWithProjection
    config = CLIP_CONFIGS[name]
    rng = np.random.default_rng(1)
    model = CLIPTextModelWithProjection(TorchConfig(**text_fixtures.clip_config_json(config))).eval()
    model.load_state_dict(torch_state(torch, text_fixtures.random_clip_state(config, rng)), strict=True)
    model.save_pretrained(tmp_path)

    loaded_config, params = load_clip_text(str(tmp_path))
    assert loaded_config == config
    pad = config.vocab_size - 1 if config.hidden_act == "quick_gelu" else 0
    ids = clip_token_ids(rng, config, batch=len(PROMPTS), pad=pad)  # the batch of the prompt tests: one compile
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    penultimate, pooled = jitted_apply(CLIPTextEncoder(config))({"params": params}, jnp.asarray(ids, jnp.int32))
    assert penultimate.shape == (len(PROMPTS), config.max_position_embeddings, config.hidden_size)
    assert_close(penultimate, out.hidden_states[-2].numpy())
    assert_close(pooled, out.text_embeds.numpy())


@pytest.mark.parametrize("name,batch,length,with_mask", [("tiny", 4, 77, False), ("short_distance", 2, 150, True)])
def test_t5_matches_transformers(name, batch, length, with_mask, tmp_path):
    torch = import_torch()
    from transformers import T5Config as TorchConfig
    from transformers import T5EncoderModel
    config = T5_CONFIGS[name]
    rng = np.random.default_rng(2)
    model = T5EncoderModel(TorchConfig(**text_fixtures.t5_config_json(config))).eval()
    missing, unexpected = model.load_state_dict(torch_state(torch, text_fixtures.random_t5_state(config, rng)),
                                                strict=False)
    assert missing == ["encoder.embed_tokens.weight"] and not unexpected  # tied to shared.weight
    model.save_pretrained(tmp_path)

    loaded_config, params = load_t5(str(tmp_path))
    assert loaded_config == config
    ids = rng.integers(0, config.vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[-1, length // 3:] = 0
    with torch.no_grad():
        reference = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if with_mask else None)
    ours = jitted_apply(T5Encoder(config))({"params": params}, jnp.asarray(ids, jnp.int32),
                                           jnp.asarray(mask) if with_mask else None)
    assert_close(ours, reference.last_hidden_state.numpy())


def test_relative_position_buckets_match_transformers():
    torch = import_torch()
    from transformers.models.t5.modeling_t5 import T5Attention
    length = 512
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    for buckets, distance in ((32, 128), (16, 40)):
        reference = T5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(length, length, buckets, distance), reference)


@pytest.mark.parametrize("t5_max_length", [77, 20])
def test_encode_prompts_matches_diffusers(t5_max_length, sd35_root, encoders):
    torch = import_torch()
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTextModelWithProjection, T5EncoderModel
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=None, scheduler=None, vae=None,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(os.path.join(sd35_root, "text_encoder")),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(os.path.join(sd35_root, "text_encoder_2")),
        text_encoder_3=T5EncoderModel.from_pretrained(os.path.join(sd35_root, "text_encoder_3")),
        tokenizer=encoders.tokenizer, tokenizer_2=encoders.tokenizer_2, tokenizer_3=encoders.tokenizer_3)
    with torch.no_grad():
        reference, _, reference_pooled, _ = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False,
            max_sequence_length=t5_max_length)

    prompt_embeds, pooled = encode_prompts(encoders, PROMPTS, t5_max_length)
    assert prompt_embeds.shape == (len(PROMPTS), 77 + t5_max_length, encoders.joint_dim)
    assert pooled.shape == (len(PROMPTS), encoders.pooled_dim)
    assert_close(prompt_embeds, reference.numpy())
    assert_close(pooled, reference_pooled.numpy())


def test_null_prompt_embeddings(encoders):
    null_embeds, null_pooled = null_prompt_embeddings(encoders, 77)
    assert null_embeds.shape == (154, encoders.joint_dim) and null_pooled.shape == (encoders.pooled_dim,)
    prompt_embeds, pooled = encode_prompts(encoders, PROMPTS)
    assert PROMPTS[2] == ""
    assert_close(null_embeds, prompt_embeds[2])
    assert_close(null_pooled, pooled[2])


def test_bf16_close_to_fp32(encoders):
    """bf16 compute (fp32 params, norm statistics and softmax) stays near fp32 for a CLIP and the T5."""
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 40, (len(PROMPTS), 77)), jnp.int32)
    for module, params in ((CLIPTextEncoder(encoders.clip_g), encoders.clip_g_params),
                           (T5Encoder(encoders.t5), encoders.t5_params)):
        reference = jitted_apply(module)({"params": params}, ids)
        ours = jitted_apply(module.clone(dtype=jnp.bfloat16))({"params": params}, ids)
        for leaf, reference_leaf in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
            assert leaf.dtype == jnp.bfloat16
            assert_close(leaf, reference_leaf, rtol=5e-2)


def test_convert_round_trip(sd35_root, encoders, tmp_path):
    convert(sd35_root, str(tmp_path / "converted"), show_progress=False)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert os.path.isdir(tmp_path / "converted" / name)
    converted = load_text_encoders(str(tmp_path / "converted"))
    assert (converted.clip_l, converted.clip_g, converted.t5) == (encoders.clip_l, encoders.clip_g, encoders.t5)
    for ours, theirs in ((converted.clip_l_params, encoders.clip_l_params),
                         (converted.clip_g_params, encoders.clip_g_params), (converted.t5_params, encoders.t5_params)):
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)
    assert converted.tokenizer_2("a photo").input_ids == encoders.tokenizer_2("a photo").input_ids
    with pytest.raises(CheckpointError, match="'clip' encoder, expected 't5'"):
        load_t5(str(tmp_path / "converted" / "text_encoder"))


def _copy_folder(sd35_root, tmp_path, sub="text_encoder"):
    return shutil.copytree(os.path.join(sd35_root, sub), tmp_path / sub)


def test_truncated_file_is_named(sd35_root, tmp_path):
    folder = _copy_folder(sd35_root, tmp_path)
    weights = folder / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) - 100)
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_clip_text(str(folder))
    assert str(weights) in str(error.value)


def test_renamed_and_misshaped_keys_are_named(sd35_root, tmp_path):
    folder = _copy_folder(sd35_root, tmp_path)
    state = dict(read_safetensors(str(folder / "model.safetensors")))
    state["text_model.final_layer_norm.gamma"] = state.pop("text_model.final_layer_norm.weight")
    state["text_model.encoder.layers.1.mlp.fc1.weight"] = np.zeros((3, 32), np.float32)
    write_safetensors(str(folder / "model.safetensors"), state)
    with pytest.raises(CheckpointError) as error:
        load_clip_text(str(folder))
    message = str(error.value)
    assert str(folder / "model.safetensors") in message
    assert "1 missing key(s):\n    text_model.final_layer_norm.weight" in message
    assert "1 unexpected key(s):\n    text_model.final_layer_norm.gamma" in message
    assert "text_model.encoder.layers.1.mlp.fc1.weight: expected (64, 32), found (3, 32)" in message


def test_unsupported_config_is_named(sd35_root, tmp_path):
    folder = _copy_folder(sd35_root, tmp_path)
    record = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(record, hidden_act="relu")))
    with pytest.raises(CheckpointError, match="config.json: unsupported config.json: hidden_act"):
        load_clip_text(str(folder))
    t5_folder = _copy_folder(sd35_root, tmp_path, "text_encoder_3")
    record = json.loads((t5_folder / "config.json").read_text())
    (t5_folder / "config.json").write_text(json.dumps(dict(record, feed_forward_proj="relu")))
    with pytest.raises(CheckpointError, match="'relu' is not T5 v1.1"):
        load_t5(str(t5_folder))


def test_sharded_t5_folder(sd35_root, encoders, tmp_path):
    folder = tmp_path / "text_encoder_3"
    folder.mkdir()
    shutil.copy(os.path.join(sd35_root, "text_encoder_3", "config.json"), folder)
    state = dict(read_safetensors(os.path.join(sd35_root, "text_encoder_3", "model.safetensors")))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        write_safetensors(str(folder / shard), {k: state[k] for k in keys})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    config, params = load_t5(str(folder))
    assert config == encoders.t5
    jax.tree.map(np.testing.assert_array_equal, params, encoders.t5_params)


def test_sd35_single_files(sd35_root, encoders, tmp_path):
    """text_encoders/{clip_l,clip_g,t5xxl_fp16}.safetensors variants: no config, CLIP-L without projection and
    with the position_ids buffer, CLIP-G under a combined-file prefix, T5 in fp16 with the tied embedding."""
    clip_l = dict(read_safetensors(os.path.join(sd35_root, "text_encoder", "model.safetensors")))
    del clip_l["text_projection.weight"]
    clip_l["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    write_safetensors(str(tmp_path / "clip_l.safetensors"), clip_l)
    config, params = load_clip_text(str(tmp_path / "clip_l.safetensors"), config=encoders.clip_l)
    np.testing.assert_array_equal(params["text_projection"]["kernel"], np.eye(32))
    np.testing.assert_array_equal(params["text_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"],
                                  encoders.clip_l_params["text_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"])

    prefix = "text_encoders.clip_g.transformer."
    clip_g = dict(read_safetensors(os.path.join(sd35_root, "text_encoder_2", "model.safetensors")))
    combined = {prefix + k: v for k, v in clip_g.items()}
    combined["model.diffusion_model.x_embedder.proj.bias"] = np.zeros(4, np.float32)
    write_safetensors(str(tmp_path / "combined.safetensors"), combined)
    _, params = load_clip_text(str(tmp_path / "combined.safetensors"), config=encoders.clip_g, prefix=prefix)
    jax.tree.map(np.testing.assert_array_equal, params, encoders.clip_g_params)
    del combined[prefix + "text_projection.weight"]  # only a CLIP-L (quick_gelu) may lack its projection
    write_safetensors(str(tmp_path / "combined.safetensors"), combined)
    with pytest.raises(CheckpointError, match="missing key"):
        load_clip_text(str(tmp_path / "combined.safetensors"), config=encoders.clip_g, prefix=prefix)

    t5 = dict(read_safetensors(os.path.join(sd35_root, "text_encoder_3", "model.safetensors")))
    t5 = {k: v.astype(np.float16) for k, v in t5.items()}
    t5["encoder.embed_tokens.weight"] = t5.pop("shared.weight")
    write_safetensors(str(tmp_path / "t5xxl_fp16.safetensors"), t5)
    config, params = load_t5(str(tmp_path / "t5xxl_fp16.safetensors"))
    assert config == encoders.t5
    expected = jax.tree.map(lambda x: np.asarray(x).astype(np.float16).astype(np.float32), encoders.t5_params)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    t5["shared.weight"] = t5["encoder.embed_tokens.weight"]
    write_safetensors(str(tmp_path / "t5xxl_fp16.safetensors"), t5)
    load_t5(str(tmp_path / "t5xxl_fp16.safetensors"))
    t5["shared.weight"] = t5["shared.weight"] + np.float16(1)
    write_safetensors(str(tmp_path / "t5xxl_fp16.safetensors"), t5)
    with pytest.raises(CheckpointError, match="tied in torch"):
        load_t5(str(tmp_path / "t5xxl_fp16.safetensors"))


def test_configs_inferred_from_real_shapes():
    clip_l = {"text_model.embeddings.token_embedding.weight": (49408, 768),
              "text_model.embeddings.position_embedding.weight": (77, 768),
              "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
              "text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768)}
    assert clip_config_from_shapes(clip_l) == CLIPTextConfig.clip_l()
    clip_g = {"text_model.embeddings.token_embedding.weight": (49408, 1280),
              "text_model.embeddings.position_embedding.weight": (77, 1280),
              "text_model.encoder.layers.0.mlp.fc1.weight": (5120, 1280),
              "text_model.encoder.layers.31.mlp.fc1.weight": (5120, 1280),
              "text_projection.weight": (1280, 1280)}
    assert clip_config_from_shapes(clip_g) == CLIPTextConfig.clip_g()
    with pytest.raises(CheckpointError, match="width 1024"):
        clip_config_from_shapes({k: (s[0], 1024) for k, s in clip_l.items()})
    t5 = {"shared.weight": (32128, 4096),
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
          "encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
          "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096),
          "encoder.block.23.layer.1.layer_norm.weight": (4096,)}
    assert t5_config_from_shapes(t5) == T5Config.t5_xxl()


def test_load_null_embeddings(tmp_path):
    torch = import_torch()
    embeds, pooled = torch.randn(2, 154, 96).half()[1], torch.randn(72)  # a view of a batch, as when sliced
    (tmp_path / "prompt_embeds").mkdir()
    (tmp_path / "pooled_prompt_embeds").mkdir()
    torch.save(embeds, tmp_path / "prompt_embeds" / "NULL_prompt_embeds.pt")
    torch.save(pooled, tmp_path / "pooled_prompt_embeds" / "NULL_pooled_prompt_embeds.pt")
    ours_embeds, ours_pooled = load_null_embeddings(str(tmp_path))
    assert ours_embeds.dtype == np.float32 and ours_embeds.shape == (154, 96)
    np.testing.assert_array_equal(ours_embeds, embeds.float().numpy())
    np.testing.assert_array_equal(ours_pooled, pooled.numpy())
    torch.save({"embeds": embeds}, tmp_path / "prompt_embeds" / "NULL_prompt_embeds.pt")
    with pytest.raises(CheckpointError, match="NULL_prompt_embeds.pt: expected one tensor of rank 2"):
        load_null_embeddings(str(tmp_path))
    with pytest.raises(CheckpointError, match="neither"):
        load_null_embeddings(str(tmp_path / "prompt_embeds"))


def test_postprocess_caption():
    assert postprocess_caption("A cat sits on a sofa. The focus is on its face. It is sunny!") == (
        "A cat sits on a sofa. It is sunny! " + CAPTION_SUFFIX)
    # Substring and case-insensitive matches; '?' ends a sentence too; the last piece keeps no punctuation.
    assert postprocess_caption("Blurry trees? A red car. The DEPTH of field is shallow. Close-up shot") == (
        "A red car. " + CAPTION_SUFFIX)
    assert postprocess_caption("The image is black and white.") == " " + CAPTION_SUFFIX
    assert postprocess_caption("") == " " + CAPTION_SUFFIX

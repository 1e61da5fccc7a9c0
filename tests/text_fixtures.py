"""A tiny SD3 text stack for tests: tokenizer files, seeded random transformers-layout weights, TextEncoders.

`write_tiny_sd35_root(root)` writes what an SD3.5 diffusers root holds for text (text_encoder, text_encoder_2,
text_encoder_3 with config.json + model.safetensors; tokenizer, tokenizer_2, tokenizer_3), small enough that
transformers, diffusers and our loaders all read it in a second. No torch needed.
"""

import json
import os

import numpy as np

from smfsr_jax.convert.tensors import write_safetensors
from smfsr_jax.convert.text import load_text_encoders
from smfsr_jax.models.text import CLIPTextConfig, T5Config, TextEncoders

WORDS = ("a", "photo", "of", "the", "cat", "dog", "sharp", "detailed", "image", "with", "green", "tree", "sky",
         "blur", "focus")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _clip_vocab_and_merges() -> tuple[list[str], list[tuple[str, str]]]:
    """Real CLIP order: 256 bytes, 256 end-of-word bytes, merged words, then <|startoftext|> and <|endoftext|>
    (so '!' is id 0 and EOS is the highest id)."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pair not in merges:
                merges.append(pair)
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    return vocab + ["<|startoftext|>", "<|endoftext|>"], merges


CLIP_VOCAB, CLIP_MERGES = _clip_vocab_and_merges()
CLIP_EOS = len(CLIP_VOCAB) - 1
T5_PIECES = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
             + [("▁" + w, -3.0 - 0.1 * i) for i, w in enumerate(WORDS)]
             + [(ch, -8.0) for ch in "abcdefghijklmnopqrstuvwxyz,.!?"])

# CLIP-L-like: quick_gelu, EOS padding, legacy argmax pooling (eos_token_id 2, as in the SD3 configs).
TINY_CLIP_L = CLIPTextConfig(vocab_size=len(CLIP_VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32, eos_token_id=2)
# CLIP-G-like: exact gelu, '!' padding, first-EOS pooling, projection wider than the model.
TINY_CLIP_G = CLIPTextConfig(vocab_size=len(CLIP_VOCAB), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, hidden_act="gelu", projection_dim=40, eos_token_id=CLIP_EOS)
# T5-like: inner width (heads * d_kv) != d_model, model vocab larger than the tokenizer's (as 32128 > 32100).
TINY_T5 = T5Config(vocab_size=64, d_model=96, d_kv=12, d_ff=80, num_layers=2, num_heads=4)


def write_clip_tokenizer(dst: str, pad_token: str):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(CLIP_VOCAB)}, f)
    with open(os.path.join(dst, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in CLIP_MERGES))
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}, f)


def write_t5_tokenizer(dst: str):
    """A Unigram tokenizer.json shaped like T5's (pad 0, </s> 1, unk 2, metaspace, '</s>' appended)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    tokenizer = Tokenizer(models.Unigram(T5_PIECES, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                             special_tokens=[("</s>", 1)])
    os.makedirs(dst, exist_ok=True)
    tokenizer.save(os.path.join(dst, "tokenizer.json"))
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "eos_token": "</s>",
                   "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0}, f)


def _linear(rng, out_features: int, in_features: int) -> np.ndarray:
    return rng.normal(0.0, in_features ** -0.5, (out_features, in_features)).astype(np.float32)


def _embedding(rng, n: int, features: int, std: float = 1.0) -> np.ndarray:
    return rng.normal(0.0, std, (n, features)).astype(np.float32)


def _vector(rng, n: int, mean: float = 0.0, std: float = 0.1) -> np.ndarray:
    return (mean + std * rng.standard_normal(n)).astype(np.float32)


def random_clip_state(config: CLIPTextConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """transformers `CLIPTextModelWithProjection` state dict with random weights."""
    c, h, i = config, config.hidden_size, config.intermediate_size
    state = {
        "text_model.embeddings.token_embedding.weight": _embedding(rng, c.vocab_size, h),
        "text_model.embeddings.position_embedding.weight": _embedding(rng, c.max_position_embeddings, h, 0.5),
        "text_model.final_layer_norm.weight": _vector(rng, h, 1.0),
        "text_model.final_layer_norm.bias": _vector(rng, h),
        "text_projection.weight": _linear(rng, c.projection_dim, h),
    }
    for layer in range(c.num_hidden_layers):
        prefix = f"text_model.encoder.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{prefix}self_attn.{name}.weight"] = _linear(rng, h, h)
            state[f"{prefix}self_attn.{name}.bias"] = _vector(rng, h)
        for name in ("layer_norm1", "layer_norm2"):
            state[f"{prefix}{name}.weight"] = _vector(rng, h, 1.0)
            state[f"{prefix}{name}.bias"] = _vector(rng, h)
        state[f"{prefix}mlp.fc1.weight"] = _linear(rng, i, h)
        state[f"{prefix}mlp.fc1.bias"] = _vector(rng, i)
        state[f"{prefix}mlp.fc2.weight"] = _linear(rng, h, i)
        state[f"{prefix}mlp.fc2.bias"] = _vector(rng, h)
    return state


def random_t5_state(config: T5Config, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """transformers `T5EncoderModel` state dict with random weights (embedding stored as `shared.weight`)."""
    c, d, inner = config, config.d_model, config.num_heads * config.d_kv
    state = {
        "shared.weight": _embedding(rng, c.vocab_size, d),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            _embedding(rng, c.relative_attention_num_buckets, c.num_heads),
        "encoder.final_layer_norm.weight": _vector(rng, d, 1.0),
    }
    for layer in range(c.num_layers):
        prefix = f"encoder.block.{layer}.layer."
        for name in ("q", "k", "v"):
            state[f"{prefix}0.SelfAttention.{name}.weight"] = _linear(rng, inner, d)
        state[f"{prefix}0.SelfAttention.o.weight"] = _linear(rng, d, inner)
        state[f"{prefix}0.layer_norm.weight"] = _vector(rng, d, 1.0)
        state[f"{prefix}1.DenseReluDense.wi_0.weight"] = _linear(rng, c.d_ff, d)
        state[f"{prefix}1.DenseReluDense.wi_1.weight"] = _linear(rng, c.d_ff, d)
        state[f"{prefix}1.DenseReluDense.wo.weight"] = _linear(rng, d, c.d_ff)
        state[f"{prefix}1.layer_norm.weight"] = _vector(rng, d, 1.0)
    return state


def clip_config_json(config: CLIPTextConfig) -> dict:
    """transformers CLIPTextConfig JSON (what the SD3.5 text_encoder folders hold)."""
    return dict(vars(config), architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model",
                bos_token_id=config.vocab_size - 2, pad_token_id=1, attention_dropout=0.0)


def t5_config_json(config: T5Config) -> dict:
    return dict(vars(config), architectures=["T5EncoderModel"], model_type="t5", feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, use_cache=False, dropout_rate=0.0, tie_word_embeddings=False)


def write_transformers_folder(dst: str, config_json: dict, state: dict[str, np.ndarray]) -> str:
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2)
    write_safetensors(os.path.join(dst, "model.safetensors"), state, metadata={"format": "pt"})
    return dst


def write_tiny_sd35_root(root: str, seed: int = 0) -> str:
    """The text part of an SD3.5 diffusers root, tiny and seeded; returns `root`."""
    rng = np.random.default_rng(seed)
    write_transformers_folder(os.path.join(root, "text_encoder"), clip_config_json(TINY_CLIP_L),
                              random_clip_state(TINY_CLIP_L, rng))
    write_transformers_folder(os.path.join(root, "text_encoder_2"), clip_config_json(TINY_CLIP_G),
                              random_clip_state(TINY_CLIP_G, rng))
    write_transformers_folder(os.path.join(root, "text_encoder_3"), t5_config_json(TINY_T5),
                              random_t5_state(TINY_T5, rng))
    write_clip_tokenizer(os.path.join(root, "tokenizer"), pad_token="<|endoftext|>")
    write_clip_tokenizer(os.path.join(root, "tokenizer_2"), pad_token="!")
    write_t5_tokenizer(os.path.join(root, "tokenizer_3"))
    return root


def tiny_text_encoders(tmp_dir: str, seed: int = 0, **kwargs) -> TextEncoders:
    """TextEncoders over a tiny SD3.5 root written into `tmp_dir` (kwargs: dtype, attention)."""
    return load_text_encoders(write_tiny_sd35_root(str(tmp_dir), seed), **kwargs)

"""SD3 text-encoder converters: transformers-layout safetensors -> Flax params (CLIP-L, CLIP-G, T5-XXL).

Accepted sources for `load_clip_text` / `load_t5`:
  - a transformers folder: config.json + model.safetensors, or sharded model-*.safetensors with
    model.safetensors.index.json (the SD3.5 diffusers subfolders text_encoder, text_encoder_2, text_encoder_3);
  - a single .safetensors file with transformers key names and no config: the SD3.5 repo's
    text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors. Stability-AI/sd3.5
    sd3_infer.py loads them with prefix "" into other_impls.py modules named like transformers
    (`text_model.*` + `text_projection.weight` for CLIP, `encoder.*` for T5), so these are the names we
    expect. The sizes come from the shapes; what shapes do not record takes the sd3_infer.py values
    (CLIP head width 64, quick_gelu at width 768 and gelu at 1280, T5 max distance 128, eps 1e-6);
  - `prefix` selects one encoder in a combined file (e.g. `text_encoders.clip_g.transformer.` in the
    SD3 single files that bundle the encoders, a layout diffusers' single-file loader reads);
  - a directory written by `convert`.
Unverified against the real files: whether clip_l.safetensors stores `text_projection.weight` (if absent, a
quick_gelu CLIP-L gets the identity, as diffusers' single-file loader and other_impls.py do) and whether
t5xxl_fp16.safetensors stores `shared.weight`, `encoder.embed_tokens.weight` or both (all accepted; both
must then be equal).
"""

import dataclasses
import json
import logging
import os
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.convert.converted_dir import is_converted, load_converted, save_converted
from smfsr_jax.convert.tensors import (CheckpointError, MergedTensors, SafetensorsFile, check_keys, check_tree,
                                       linear_kernel, open_weights, progress, tensor_shape, unflatten)
from smfsr_jax.convert.torch_pickle import load_torch_file
from smfsr_jax.core import files
from smfsr_jax.models.text import (CLIP_MAX_LENGTH, TOKENIZER_DIRS, CLIPTextConfig, CLIPTextEncoder, T5Config,
                                   T5Encoder, TextEncoders, config_from_dict, load_tokenizers)

TRANSFORMERS_WEIGHTS = "model.safetensors"
TRANSFORMERS_INDEX = "model.safetensors.index.json"
# Non-weight buffer saved by older transformers versions.
CLIP_IGNORE = (r"text_model\.embeddings\.position_ids",)
T5_GATED_GELU = ("gated-gelu", "gated-gelu_new")  # both mean transformers' tanh 'gelu_new'
# (diffusers subfolder, SD3.5 single file under text_encoders/, kind)
SD35_ENCODERS = (("text_encoder", "clip_l.safetensors", "clip"),
                 ("text_encoder_2", "clip_g.safetensors", "clip"),
                 ("text_encoder_3", "t5xxl_fp16.safetensors", "t5"))

# transformers' class defaults, used for fields a config.json leaves out.
_CLIP_JSON_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                           layer_norm_eps=1e-5, projection_dim=512, eos_token_id=49407)
_T5_JSON_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                         relative_attention_num_buckets=32, relative_attention_max_distance=128,
                         layer_norm_epsilon=1e-6)
# sd3_infer.py CLIPL_CONFIG / CLIPG_CONFIG: the activation is not visible in the shapes.
_CLIP_ACT_BY_WIDTH = {768: "quick_gelu", 1280: "gelu"}
_CLIP_HEAD_DIM = 64
_T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")
# DiT4SR's published NULL conditioning (Hugging Face acceptee/DiT4SR); its training root keeps them in
# prompt_embeds/ and pooled_prompt_embeds/.
NULL_EMBEDS_FILE, NULL_POOLED_FILE = "NULL_prompt_embeds.pt", "NULL_pooled_prompt_embeds.pt"

log = logging.getLogger(__name__)


class _Prefixed(Mapping):
    """The tensors under `prefix` of a combined file, with the prefix removed from their names."""

    def __init__(self, tensors: Mapping, prefix: str):
        self.tensors, self.prefix = tensors, prefix
        self.path = f"{tensors.path} (keys under {prefix!r})"
        self._keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)]

    def shape(self, key):
        return tensor_shape(self.tensors, self.prefix + key)

    def __getitem__(self, key):
        return self.tensors[self.prefix + key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def _open(path: str, prefix: str):
    """(tensors, config.json record or None, source name) of a transformers folder or a single file."""
    record = None
    if files.is_dir(path):
        config_path = os.path.join(path, "config.json")
        if not files.exists(config_path):
            raise CheckpointError(f"{path}: no config.json in this transformers folder")
        record = json.loads(files.read_text(config_path))
        index_path = os.path.join(path, TRANSFORMERS_INDEX)
        if files.exists(index_path):
            shards = sorted(set(json.loads(files.read_text(index_path))["weight_map"].values()))
            missing = [s for s in shards if not files.exists(os.path.join(path, s))]
            if missing:
                raise CheckpointError(f"{index_path}: shard(s) {missing} are missing")
            tensors = MergedTensors(SafetensorsFile(os.path.join(path, s)) for s in shards)
        elif files.exists(os.path.join(path, TRANSFORMERS_WEIGHTS)):
            tensors = SafetensorsFile(os.path.join(path, TRANSFORMERS_WEIGHTS))
        else:
            tensors = open_weights(path)
    else:
        tensors = open_weights(path)
    if prefix:
        tensors = _Prefixed(tensors, prefix)
        if not len(tensors):
            raise CheckpointError(f"{tensors.path}: no tensor has this prefix")
    return tensors, record, tensors.path


def _source_config(cls, path: str, tensors: Mapping, record: dict | None, source: str, json_defaults: dict,
                   from_shapes: Callable):
    """The config of a source: its config.json (transformers' defaults for absent fields) or its shapes."""
    if record is not None:
        try:
            return cls(**{name: record.get(name, default) for name, default in json_defaults.items()})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{os.path.join(path, 'config.json')}: unsupported config.json: {e}") from None
    try:
        return from_shapes({k: tensor_shape(tensors, k) for k in tensors})
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _stack(tensors: Mapping, key_format: str, num_layers: int, fn: Callable) -> np.ndarray:
    """One fp32 array (num_layers, ...) filled layer by layer (no per-layer fp32 copies kept)."""
    first = np.asarray(fn(tensors[key_format.format(0)]), np.float32)
    out = np.empty((num_layers,) + first.shape, np.float32)
    out[0] = first
    for i in range(1, num_layers):
        out[i] = fn(tensors[key_format.format(i)])
    return out


def _convert(source: str, tensors: Mapping, global_rules: dict, layer_rules: dict, layer_key: str,
             layer_path: str, num_layers: int, ignore, abstract, show_progress: bool, fixed: dict | None = None):
    """Strict key check, then {torch key: (flax path, fn, torch shape)} rules -> Flax params checked
    against the module's abstract tree. Layer tensors are stacked on a leading axis for nn.scan; `fixed`
    holds {flax path: array} for parameters the file does not store."""
    expected = {k: shape for k, (_, _, shape) in global_rules.items()}
    expected.update({layer_key.format(i) + k: shape for i in range(num_layers)
                     for k, (_, _, shape) in layer_rules.items()})
    check_keys(source, tensors, expected, ignore)
    flat = dict(fixed or {})
    flat.update({path: np.asarray(fn(tensors[k]), np.float32) for k, (path, fn, _) in global_rules.items()})
    for k, (path, fn, _) in progress(layer_rules.items(), total=len(layer_rules), desc=os.path.basename(source),
                                     enabled=show_progress):
        flat[f"{layer_path}/{path}"] = _stack(tensors, layer_key + k, num_layers, fn)
    params = unflatten(flat)
    check_tree(source, params, abstract)
    return params


def _load_converted(path: str, kind: str):
    record, meta, params = load_converted(path)
    if meta.get("encoder") != kind:
        raise CheckpointError(f"{path}: converted {meta.get('encoder')!r} encoder, expected {kind!r}")
    config = config_from_dict(CLIPTextConfig if kind == "clip" else T5Config, record)
    params = jax.tree.map(np.asarray, params)
    check_tree(path, params, abstract_params(config))
    return config, params


def abstract_params(config):
    """ShapeDtypeStruct tree of CLIPTextEncoder / T5Encoder params for `config`."""
    module = CLIPTextEncoder(config) if isinstance(config, CLIPTextConfig) else T5Encoder(config)
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]


# ---------------------------------------------------------------------------------------------- CLIP


def clip_config_from_shapes(shapes: Mapping[str, tuple]) -> CLIPTextConfig:
    """CLIPTextConfig of a transformers-named CLIP text state dict given {key: shape} (no config.json)."""
    token = shapes.get("text_model.embeddings.token_embedding.weight")
    position = shapes.get("text_model.embeddings.position_embedding.weight")
    fc1 = shapes.get("text_model.encoder.layers.0.mlp.fc1.weight")
    if token is None or position is None or fc1 is None:
        raise CheckpointError("cannot infer the CLIP config: the embeddings or layer 0 are missing")
    vocab, width = token
    if width not in _CLIP_ACT_BY_WIDTH:
        raise CheckpointError(f"cannot infer hidden_act for a CLIP of width {width} (known: "
                              f"{sorted(_CLIP_ACT_BY_WIDTH)}); pass config= or use a folder with config.json")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    projection = shapes.get("text_projection.weight", (width, width))
    # eos_token_id 2: other_impls.py pools at the argmax of the ids, transformers' legacy rule.
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=fc1[0],
                          num_hidden_layers=max(layers) + 1, num_attention_heads=width // _CLIP_HEAD_DIM,
                          max_position_embeddings=position[0], hidden_act=_CLIP_ACT_BY_WIDTH[width],
                          projection_dim=projection[0], eos_token_id=2)


def _clip_rules(c: CLIPTextConfig, with_projection: bool):
    h, i = c.hidden_size, c.intermediate_size
    global_rules = {
        "text_model.embeddings.token_embedding.weight":
            ("text_model/embeddings/token_embedding/embedding", np.asarray, (c.vocab_size, h)),
        "text_model.embeddings.position_embedding.weight":
            ("text_model/embeddings/position_embedding/embedding", np.asarray, (c.max_position_embeddings, h)),
        "text_model.final_layer_norm.weight": ("text_model/final_layer_norm/scale", np.asarray, (h,)),
        "text_model.final_layer_norm.bias": ("text_model/final_layer_norm/bias", np.asarray, (h,)),
    }
    if with_projection:
        global_rules["text_projection.weight"] = ("text_projection/kernel", linear_kernel, (c.projection_dim, h))
    layer_rules = {}
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer_rules[f"self_attn.{name}.weight"] = (f"self_attn/{name}/kernel", linear_kernel, (h, h))
        layer_rules[f"self_attn.{name}.bias"] = (f"self_attn/{name}/bias", np.asarray, (h,))
    for name in ("layer_norm1", "layer_norm2"):
        layer_rules[f"{name}.weight"] = (f"{name}/scale", np.asarray, (h,))
        layer_rules[f"{name}.bias"] = (f"{name}/bias", np.asarray, (h,))
    layer_rules["mlp.fc1.weight"] = ("mlp/fc1/kernel", linear_kernel, (i, h))
    layer_rules["mlp.fc1.bias"] = ("mlp/fc1/bias", np.asarray, (i,))
    layer_rules["mlp.fc2.weight"] = ("mlp/fc2/kernel", linear_kernel, (h, i))
    layer_rules["mlp.fc2.bias"] = ("mlp/fc2/bias", np.asarray, (h,))
    return global_rules, layer_rules


def load_clip_text(path: str, config: CLIPTextConfig | None = None, prefix: str = "",
                   show_progress: bool = False) -> tuple[CLIPTextConfig, dict]:
    """(CLIPTextConfig, Flax params as numpy fp32) of a transformers `CLIPTextModelWithProjection` source
    (module docstring). `config` replaces the config.json or the shape-inferred one."""
    if not prefix and is_converted(path):
        return _load_converted(path, "clip")
    tensors, record, source = _open(path, prefix)
    if config is None:
        config = _source_config(CLIPTextConfig, path, tensors, record, source, _CLIP_JSON_DEFAULTS,
                                clip_config_from_shapes)
    # A single CLIP-L file may lack the projection: diffusers' single-file loader and other_impls.py use the
    # identity there (diffusers documents CLIP-L's projection as identity-initialised).
    identity_projection = (record is None and "text_projection.weight" not in tensors
                           and config.hidden_act == "quick_gelu" and config.projection_dim == config.hidden_size)
    global_rules, layer_rules = _clip_rules(config, with_projection=not identity_projection)
    fixed = {}
    if identity_projection:
        log.warning("%s: no text_projection.weight; using the identity (CLIP-L single-file convention)", source)
        fixed["text_projection/kernel"] = np.eye(config.hidden_size, dtype=np.float32)
    params = _convert(source, tensors, global_rules, layer_rules, "text_model.encoder.layers.{}.",
                      "text_model/encoder/layers", config.num_hidden_layers, CLIP_IGNORE, abstract_params(config),
                      show_progress, fixed)
    return config, params


# ---------------------------------------------------------------------------------------------- T5


def t5_config_from_shapes(shapes: Mapping[str, tuple]) -> T5Config:
    """T5Config of a transformers-named T5 encoder state dict given {key: shape} (no config.json)."""
    embedding = next((shapes[k] for k in _T5_EMBEDDINGS if k in shapes), None)
    bias = shapes.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    q = shapes.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    wi_0 = shapes.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    if embedding is None or bias is None or q is None or wi_0 is None:
        raise CheckpointError("cannot infer the T5 config: the embedding, the relative attention bias or the "
                              "gated feed-forward of block 0 is missing")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    buckets, heads = bias
    return T5Config(vocab_size=embedding[0], d_model=embedding[1], d_kv=q[0] // heads, d_ff=wi_0[0],
                    num_layers=max(layers) + 1, num_heads=heads, relative_attention_num_buckets=buckets)


def _t5_rules(c: T5Config, embedding_key: str):
    d, inner, ff = c.d_model, c.num_heads * c.d_kv, c.d_ff
    global_rules = {
        embedding_key: ("shared/embedding", np.asarray, (c.vocab_size, d)),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
            ("encoder/relative_attention_bias/embedding", np.asarray, (c.relative_attention_num_buckets, c.num_heads)),
        "encoder.final_layer_norm.weight": ("encoder/final_layer_norm/scale", np.asarray, (d,)),
    }
    layer_rules = {f"layer.0.SelfAttention.{n}.weight": (f"layer_0/SelfAttention/{n}/kernel", linear_kernel, (inner, d))
                   for n in ("q", "k", "v")}
    layer_rules["layer.0.SelfAttention.o.weight"] = ("layer_0/SelfAttention/o/kernel", linear_kernel, (d, inner))
    layer_rules["layer.0.layer_norm.weight"] = ("layer_0/layer_norm/scale", np.asarray, (d,))
    for n in ("wi_0", "wi_1"):
        layer_rules[f"layer.1.DenseReluDense.{n}.weight"] = (f"layer_1/DenseReluDense/{n}/kernel", linear_kernel,
                                                             (ff, d))
    layer_rules["layer.1.DenseReluDense.wo.weight"] = ("layer_1/DenseReluDense/wo/kernel", linear_kernel, (d, ff))
    layer_rules["layer.1.layer_norm.weight"] = ("layer_1/layer_norm/scale", np.asarray, (d,))
    return global_rules, layer_rules


def load_t5(path: str, config: T5Config | None = None, prefix: str = "",
            show_progress: bool = False) -> tuple[T5Config, dict]:
    """(T5Config, Flax params as numpy fp32) of a transformers `T5EncoderModel` source (module docstring).

    The token embedding may be stored as `shared.weight`, `encoder.embed_tokens.weight` (tied in torch) or
    both, which must then be equal.
    """
    if not prefix and is_converted(path):
        return _load_converted(path, "t5")
    tensors, record, source = _open(path, prefix)
    if config is None:
        if record is not None and record.get("feed_forward_proj") not in T5_GATED_GELU:
            raise CheckpointError(f"{os.path.join(path, 'config.json')}: feed_forward_proj "
                                  f"{record.get('feed_forward_proj')!r} is not T5 v1.1's 'gated-gelu'")
        config = _source_config(T5Config, path, tensors, record, source, _T5_JSON_DEFAULTS, t5_config_from_shapes)
    present = [k for k in _T5_EMBEDDINGS if k in tensors]
    ignore = []
    if len(present) == 2:
        if tensor_shape(tensors, present[0]) != tensor_shape(tensors, present[1]) or not np.array_equal(
                tensors[present[0]], tensors[present[1]]):
            raise CheckpointError(f"{source}: {present[0]} and {present[1]} (tied in torch) differ")
        ignore.append(re.escape(present[1]))
    global_rules, layer_rules = _t5_rules(config, present[0] if present else _T5_EMBEDDINGS[0])
    params = _convert(source, tensors, global_rules, layer_rules, "encoder.block.{}.", "encoder/block",
                      config.num_layers, ignore, abstract_params(config), show_progress)
    return config, params


# ---------------------------------------------------------------------------------------------- SD3.5 root


def _encoder_sources(root: str) -> list[tuple[str, str, str]]:
    """[(subfolder name, source path, kind)] for the three encoders of an SD3.5 (or converted) root."""
    sources = []
    for sub, single_file, kind in SD35_ENCODERS:
        folder, single = os.path.join(root, sub), os.path.join(root, "text_encoders", single_file)
        if files.is_dir(folder):
            sources.append((sub, folder, kind))
        elif files.exists(single):
            sources.append((sub, single, kind))
        else:
            raise CheckpointError(f"{root}: neither {sub}/ nor text_encoders/{single_file} exists")
    return sources


def _load(path: str, kind: str, show_progress: bool = False):
    return (load_clip_text if kind == "clip" else load_t5)(path, show_progress=show_progress)


def load_text_encoders(sd35_dir: str, dtype=jnp.float32, attention: str | None = None) -> TextEncoders:
    """TextEncoders from an SD3.5 diffusers root (text_encoder{,_2,_3} or text_encoders/*.safetensors, plus
    tokenizer{,_2,_3}) or from a directory written by `convert`."""
    (clip_l, clip_l_params), (clip_g, clip_g_params), (t5, t5_params) = (
        _load(path, kind) for _, path, kind in _encoder_sources(sd35_dir))
    tokenizer, tokenizer_2, tokenizer_3 = load_tokenizers(sd35_dir)
    return TextEncoders(clip_l=clip_l, clip_g=clip_g, t5=t5, clip_l_params=clip_l_params,
                        clip_g_params=clip_g_params, t5_params=t5_params, tokenizer=tokenizer,
                        tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3, dtype=dtype, attention=attention)


def convert(src: str, dst: str, show_progress: bool = True):
    """Convert the three encoders of the SD3.5 root `src` into `dst/text_encoder{,_2,_3}` (orbax + JSON
    config) and copy `tokenizer{,_2,_3}`; `load_text_encoders(dst)` reads the result."""
    sources = _encoder_sources(src)
    tokenizer_dirs = [os.path.join(src, name) for name in TOKENIZER_DIRS]
    missing = [p for p in tokenizer_dirs if not files.is_dir(p)]
    if missing:
        raise CheckpointError(f"{src}: missing tokenizer folder(s) {missing}")
    for sub, path, kind in sources:
        config, params = _load(path, kind, show_progress)
        save_converted(os.path.join(dst, sub), dataclasses.asdict(config), params,
                       meta={"encoder": kind, "source": files.absolute(path)})
        del params  # T5-XXL is 19 GB in fp32: one encoder in memory at a time
    for name, folder in zip(TOKENIZER_DIRS, tokenizer_dirs):
        files.copy_tree(folder, os.path.join(dst, name))


def load_null_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
    """DiT4SR's NULL_prompt_embeds.pt (77 + n, joint dim) and NULL_pooled_prompt_embeds.pt (pooled dim,) as fp32
    numpy, from a folder holding both or a DiT4SR training root (prompt_embeds/, pooled_prompt_embeds/).
    Read without torch (convert/torch_pickle.py)."""
    candidates = [(os.path.join(path, NULL_EMBEDS_FILE), os.path.join(path, NULL_POOLED_FILE)),
                  (os.path.join(path, "prompt_embeds", NULL_EMBEDS_FILE),
                   os.path.join(path, "pooled_prompt_embeds", NULL_POOLED_FILE))]
    found = next((pair for pair in candidates if all(files.is_file(p) for p in pair)), None)
    if found is None:
        raise CheckpointError(f"{path}: neither {NULL_EMBEDS_FILE} + {NULL_POOLED_FILE} nor prompt_embeds/"
                              f"{NULL_EMBEDS_FILE} + pooled_prompt_embeds/{NULL_POOLED_FILE}")
    arrays = []
    for file, rank in zip(found, (2, 1)):
        value = load_torch_file(file)
        if not isinstance(value, np.ndarray) or value.ndim != rank:
            raise CheckpointError(f"{file}: expected one tensor of rank {rank}, found "
                                  f"{getattr(value, 'shape', type(value).__name__)}")
        arrays.append(value.astype(np.float32))
    prompt_embeds, pooled = arrays
    if prompt_embeds.shape[0] <= CLIP_MAX_LENGTH:
        raise CheckpointError(f"{found[0]}: {prompt_embeds.shape[0]} tokens, expected 77 CLIP + n T5 tokens")
    return prompt_embeds, pooled

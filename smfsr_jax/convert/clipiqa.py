"""CLIPIQA converter: OpenAI `RN50.pt` (a TorchScript archive; a plain CLIP state dict also works) -> Flax.

The archive is read without torch (convert/torch_pickle.py) and checked strictly against the state dict
of CLIP's build_model for `config`. As pyiqa loads CLIP through build_model, which casts the conv,
linear and attention weights and text_projection to fp16 before `model.float()`, those tensors are
rounded through fp16 here too (a no-op for OpenAI's fp16 file). The text tower runs once, on the ten
fixed prompts, and only its features are stored; the attention pool's positional embedding (unused:
pos_embedding=False) and BatchNorm's num_batches_tracked are checked and dropped.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from smfsr_jax.convert import torch_pickle
from smfsr_jax.convert.tensors import check_keys, check_tree, conv_kernel, linear_kernel, map_tensors, unflatten
from smfsr_jax.models.clipiqa import RN50, CLIPIQA, CLIPIQAConfig, TextTransformer, prompt_tokens

# Integer attributes that only TorchScript archives carry (build_model deletes them).
ARCHIVE_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")


def _half(fn):
    """build_model's convert_weights: the tensor passes through fp16 before pyiqa's model.float()."""
    return lambda w: fn(np.asarray(w).astype(np.float16).astype(np.float32))


def _rules(config: CLIPIQAConfig) -> tuple[dict, dict]:
    """({torch key: (flax path, fn)} of the tensors we use, {torch key: shape} of every key)."""
    rules, shapes = {}, {}

    def add(key, path, fn, shape):
        if path is not None:
            rules[key] = (path, fn)
        shapes[key] = tuple(shape)

    def conv(key, path, cin, cout, k):
        add(f"{key}.weight", f"{path}/kernel", _half(conv_kernel), (cout, cin, k, k))

    def linear(key, path, cin, cout):
        add(f"{key}.weight", f"{path}/kernel", _half(linear_kernel), (cout, cin))
        add(f"{key}.bias", f"{path}/bias", _half(np.asarray), (cout,))

    def batch_norm(key, path, channels):
        for torch_name, flax_name in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                                      ("running_var", "var")):
            add(f"{key}.{torch_name}", f"{path}/{flax_name}", np.asarray, (channels,))
        add(f"{key}.num_batches_tracked", None, None, ())

    def layer_norm(key, path, dim):
        add(f"{key}.weight", f"{path}/scale", np.asarray, (dim,))
        add(f"{key}.bias", f"{path}/bias", np.asarray, (dim,))

    width = config.vision_width
    for i, (cin, cout, stride) in enumerate(((3, width // 2, 2), (width // 2, width // 2, 1), (width // 2, width, 1)),
                                            start=1):
        conv(f"visual.conv{i}", f"visual/conv{i}", cin, cout, 3)
        batch_norm(f"visual.bn{i}", f"visual/bn{i}", cout)
    inplanes = width
    for stage, blocks in enumerate(config.vision_layers, start=1):
        planes = width * 2 ** (stage - 1)
        for j in range(blocks):
            key, path = f"visual.layer{stage}.{j}", f"visual/layer{stage}_{j}"
            conv(f"{key}.conv1", f"{path}/conv1", inplanes, planes, 1)
            batch_norm(f"{key}.bn1", f"{path}/bn1", planes)
            conv(f"{key}.conv2", f"{path}/conv2", planes, planes, 3)
            batch_norm(f"{key}.bn2", f"{path}/bn2", planes)
            conv(f"{key}.conv3", f"{path}/conv3", planes, 4 * planes, 1)
            batch_norm(f"{key}.bn3", f"{path}/bn3", 4 * planes)
            if (stage > 1 and j == 0) or inplanes != 4 * planes:
                conv(f"{key}.downsample.0", f"{path}/downsample_0", inplanes, 4 * planes, 1)
                batch_norm(f"{key}.downsample.1", f"{path}/downsample_1", 4 * planes)
            inplanes = 4 * planes
    pooled = 32 * width
    add("visual.attnpool.positional_embedding", None, None, ((config.image_resolution // 32) ** 2 + 1, pooled))
    for proj in ("q_proj", "k_proj", "v_proj"):
        linear(f"visual.attnpool.{proj}", f"visual/attnpool/{proj}", pooled, pooled)
    linear("visual.attnpool.c_proj", "visual/attnpool/c_proj", pooled, config.embed_dim)

    d = config.text_width
    add("token_embedding.weight", "text/token_embedding/embedding", np.asarray, (config.vocab_size, d))
    add("positional_embedding", "text/positional_embedding", np.asarray, (config.context_length, d))
    for i in range(config.text_layers):
        key, path = f"transformer.resblocks.{i}", f"text/resblocks_{i}"
        add(f"{key}.attn.in_proj_weight", f"{path}/attn/in_proj/kernel", _half(linear_kernel), (3 * d, d))
        add(f"{key}.attn.in_proj_bias", f"{path}/attn/in_proj/bias", _half(np.asarray), (3 * d,))
        linear(f"{key}.attn.out_proj", f"{path}/attn/out_proj", d, d)
        layer_norm(f"{key}.ln_1", f"{path}/ln_1", d)
        linear(f"{key}.mlp.c_fc", f"{path}/mlp/c_fc", d, 4 * d)
        linear(f"{key}.mlp.c_proj", f"{path}/mlp/c_proj", 4 * d, d)
        layer_norm(f"{key}.ln_2", f"{path}/ln_2", d)
    layer_norm("ln_final", "text/ln_final", d)
    add("text_projection", "text/text_projection", _half(np.asarray), (d, config.embed_dim))
    add("logit_scale", "logit_scale", np.asarray, ())
    return rules, shapes


def checkpoint_shapes(config: CLIPIQAConfig = RN50) -> dict:
    """{torch key: shape} of CLIP's state dict for `config` (without the archive's integer attributes)."""
    return _rules(config)[1]


def abstract_params(config: CLIPIQAConfig):
    images = jnp.zeros((1, 64, 64, 3))
    return jax.eval_shape(lambda: CLIPIQA(config).init(jax.random.key(0), images))["params"]


def text_features(text_params, config: CLIPIQAConfig) -> np.ndarray:
    """(10, embed_dim) CLIP text features of the prompt pairs, in fp32 like pyiqa's model.float()."""
    with jax.default_matmul_precision("highest"):
        features = TextTransformer(config).apply({"params": text_params}, prompt_tokens(config.context_length))
    return np.asarray(features, np.float32)


def convert_state_dict(tensors: Mapping, config: CLIPIQAConfig = RN50, source: str = "state dict") -> dict:
    """Strictly checked CLIP state dict {key: array} -> CLIPIQA Flax params (visual tower, prompt features,
    logit scale), numpy fp32."""
    rules, shapes = _rules(config)
    check_keys(source, tensors, shapes, ignore=ARCHIVE_ATTRIBUTES)
    tree = unflatten(map_tensors(tensors, rules))
    text = tree.pop("text")
    abstract_text = jax.eval_shape(lambda: TextTransformer(config).init(
        jax.random.key(0), prompt_tokens(config.context_length)))["params"]
    check_tree(source, text, abstract_text)
    params = {**tree, "text_features": text_features(text, config)}
    check_tree(source, params, abstract_params(config))
    return params


def convert(src: str, dst: str, config: CLIPIQAConfig = RN50) -> CLIPIQAConfig:
    """CLIP RN50.pt -> orbax params + JSON config in `dst` (read by evaluation.scoring.load_clipiqa)."""
    return torch_pickle.convert_torch_file(src, dst, "clipiqa", config, convert_state_dict)

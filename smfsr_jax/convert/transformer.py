"""MM-DiT checkpoints (SD3.5 / DiT4SR / SMFSR) -> Flax params for `smfsr_jax.models.mmdit.MMDiT`.

Accepted sources:
- a diffusers transformer directory (`config.json` + `diffusion_pytorch_model*.safetensors`), or an SD3.5
  root holding `transformer/`; DiT4SR / Teacher / SMFSR releases use this layout with control keys;
- a single diffusers-layout `.safetensors` file (config inferred from tensor shapes);
- the original single file `sd3.5_medium.safetensors` (`model.diffusion_model.*` with fused qkv and the
  swapped (shift, scale) halves of the last context adaLN and of the final norm);
- a directory written by `convert` (orbax params + JSON config).

Strict: every missing, unexpected or mis-shaped key is listed in one error. The only keys dropped are
DiT4SR's never-called `attn2` added-KV weights and SMFSR's unused top-level `interval_embedder`.
"""

import json
import os
import re

import jax
import numpy as np

from smfsr_jax.convert import converted_dir
from smfsr_jax.convert import tensors as tensors_lib
from smfsr_jax.core import files
from smfsr_jax.models import mmdit

ORIGINAL_PREFIX = "model.diffusion_model."


def ignored_keys(cfg: mmdit.MMDiTConfig) -> tuple:
    """DiT4SR's never-called added-KV weights of the dual blocks' attn2, SMFSR's unused top-level
    `interval_embedder`: dropped by exact name, present or absent (neither model ever reads them)."""
    dual = "|".join(str(i) for i in cfg.dual_attention_layers) or "-"
    return (rf"transformer_blocks\.({dual})\.attn2\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)\.(weight|bias)",
            rf"transformer_blocks\.({dual})\.attn2\.norm_added_[qk]\.weight",
            r"interval_embedder\.[02]\.(weight|bias)")


# ---------------------------------------------------------------------------------------------
# diffusers key <-> Flax path.

def _linear(key, path):
    return {f"{key}.weight": (f"{path}/kernel", tensors_lib.linear_kernel),
            f"{key}.bias": (f"{path}/bias", np.asarray)}


def _rms(key, path):
    return {f"{key}.weight": (f"{path}/scale", np.asarray)}


def _block_rules(cfg: mmdit.MMDiTConfig, i: int) -> dict:
    """diffusers suffix (after `transformer_blocks.i.`) -> (Flax subpath, tensor fn)."""
    last = i == cfg.num_layers - 1
    dual = i in cfg.dual_attention_layers
    rules = {}
    rules.update(_linear("norm1.linear", "norm1/linear"))
    rules.update(_linear("norm1_context.linear", "norm1_context/linear"))
    attns = ["attn"] + (["attn2"] if dual else [])
    for attn in attns:
        for proj in ("to_q", "to_k", "to_v"):
            rules.update(_linear(f"{attn}.{proj}", f"{attn}/{proj}"))
        rules.update(_linear(f"{attn}.to_out.0", f"{attn}/to_out"))
        if cfg.qk_norm:
            rules.update(_rms(f"{attn}.norm_q", f"{attn}/norm_q"))
            rules.update(_rms(f"{attn}.norm_k", f"{attn}/norm_k"))
        if cfg.lr_stream:
            for proj in ("to_q_control", "to_k_control", "to_v_control", "to_out_control"):
                rules.update(_linear(f"{attn}.{proj}", f"{attn}/{proj}"))
    for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
        rules.update(_linear(f"attn.{proj}", f"attn/{proj}"))
    if cfg.qk_norm:
        rules.update(_rms("attn.norm_added_q", "attn/norm_added_q"))
        rules.update(_rms("attn.norm_added_k", "attn/norm_added_k"))
    rules.update(_linear("ff.net.0.proj", "ff/fc1"))
    rules.update(_linear("ff.net.2", "ff/fc2"))
    if cfg.lr_stream:
        rules["ff.control_conv.weight"] = ("ff/control_conv/kernel", tensors_lib.conv_kernel)
        rules["ff.control_conv.bias"] = ("ff/control_conv/bias", np.asarray)
    if not last:
        rules.update(_linear("attn.to_add_out", "attn/to_add_out"))
        rules.update(_linear("ff_context.net.0.proj", "ff_context/fc1"))
        rules.update(_linear("ff_context.net.2", "ff_context/fc2"))
    return rules


def _block_group(cfg: mmdit.MMDiTConfig, i: int) -> tuple[str, int]:
    """Scan group (`MMDiTConfig.block_runs`) and index in the group of block i; `last_block` has index -1."""
    if i == cfg.num_layers - 1:
        return "last_block", -1
    for name, start, length, _ in cfg.block_runs:
        if start <= i < start + length:
            return name, i - start
    raise ValueError(f"block {i} is not a block of a {cfg.num_layers}-block network")


def _top_rules(cfg: mmdit.MMDiTConfig) -> dict:
    rules = {"pos_embed.pos_embed": ("pos_embed/pos_embed", np.asarray),
             "pos_embed.proj.weight": ("pos_embed/proj/kernel", tensors_lib.conv_kernel),
             "pos_embed.proj.bias": ("pos_embed/proj/bias", np.asarray)}
    if cfg.time_conditioning == "interval":
        embed_key, embed_path = "time_text_embed_interval.time_text_embed", "time_text_embed_interval/time_text_embed"
        rules.update(_linear("time_text_embed_interval.interval_embedder.0",
                             "time_text_embed_interval/interval_embedder/linear_1"))
        rules.update(_linear("time_text_embed_interval.interval_embedder.2",
                             "time_text_embed_interval/interval_embedder/linear_2"))
    else:
        embed_key, embed_path = "time_text_embed", "time_text_embed"
    for sub in ("timestep_embedder", "text_embedder"):
        for lin in ("linear_1", "linear_2"):
            rules.update(_linear(f"{embed_key}.{sub}.{lin}", f"{embed_path}/{sub}/{lin}"))
    rules.update(_linear("context_embedder", "context_embedder"))
    rules.update(_linear("norm_out.linear", "norm_out/linear"))
    rules.update(_linear("proj_out", "proj_out"))
    return rules


def expected_shapes(cfg: mmdit.MMDiTConfig) -> dict:
    """The diffusers state-dict keys and torch shapes of a network with this config."""
    d, p = cfg.hidden_size, cfg.patch_size
    lin = lambda out, inp: {"weight": (out, inp), "bias": (out,)}  # noqa: E731
    shapes = {"pos_embed.pos_embed": (1, cfg.pos_embed_max_size ** 2, d),
              "pos_embed.proj.weight": (d, cfg.in_channels, p, p), "pos_embed.proj.bias": (d,)}

    def add_linear(key, out, inp):
        shapes.update({f"{key}.{k}": v for k, v in lin(out, inp).items()})

    embed = "time_text_embed_interval.time_text_embed" if cfg.time_conditioning == "interval" else "time_text_embed"
    add_linear(f"{embed}.timestep_embedder.linear_1", d, 256)
    add_linear(f"{embed}.timestep_embedder.linear_2", d, d)
    add_linear(f"{embed}.text_embedder.linear_1", d, cfg.pooled_projection_dim)
    add_linear(f"{embed}.text_embedder.linear_2", d, d)
    if cfg.time_conditioning == "interval":
        add_linear("time_text_embed_interval.interval_embedder.0", d, 2 * d)
        add_linear("time_text_embed_interval.interval_embedder.2", d, d)
    add_linear("context_embedder", d, cfg.joint_attention_dim)
    add_linear("norm_out.linear", 2 * d, d)
    add_linear("proj_out", p * p * cfg.out_channels, d)
    for i in range(cfg.num_layers):
        last, dual = i == cfg.num_layers - 1, i in cfg.dual_attention_layers
        out_rows = {"norm1.linear": (9 if dual else 6) * d, "norm1_context.linear": (2 if last else 6) * d,
                    "ff.net.0.proj": 4 * d, "ff_context.net.0.proj": 4 * d}
        in_cols = {"ff.net.2": 4 * d, "ff_context.net.2": 4 * d}
        for key in _block_rules(cfg, i):
            name, kind = key.rsplit(".", 1)
            full = f"transformer_blocks.{i}.{key}"
            if "norm_q" in name or "norm_k" in name or "norm_added" in name:
                shapes[full] = (cfg.head_dim,)
            elif name == "ff.control_conv":
                shapes[full] = (4 * d, 1, 3, 3) if kind == "weight" else (4 * d,)
            else:
                rows, cols = out_rows.get(name, d), in_cols.get(name, d)
                shapes[full] = (rows, cols) if kind == "weight" else (rows,)
    return shapes


def diffusers_to_flax(tensors, cfg: mmdit.MMDiTConfig, source: str, dtype=np.float32,
                      show_progress: bool = False) -> dict:
    """Strictly check a diffusers-named state dict and map it to the stacked Flax tree."""
    tensors_lib.check_keys(source, tensors, expected_shapes(cfg), ignored_keys(cfg))
    rules = dict(_top_rules(cfg))
    stacks = {}  # flax path -> list of per-block arrays
    for i in range(cfg.num_layers):
        group, index = _block_group(cfg, i)
        for key, (sub, fn) in _block_rules(cfg, i).items():
            if group == "last_block":
                rules[f"transformer_blocks.{i}.{key}"] = (f"last_block/{sub}", fn)
            else:
                stacks.setdefault(f"{group}/{sub}", []).append((f"transformer_blocks.{i}.{key}", fn))
    items = [(path, key, fn, False) for key, (path, fn) in rules.items()]
    items += [(path, key, fn, True) for path, entries in stacks.items() for key, fn in entries]
    flat, stacked = {}, {}
    for path, key, fn, is_stacked in tensors_lib.progress(items, total=len(items), desc="transformer",
                                                          enabled=show_progress):
        array = np.asarray(fn(np.asarray(tensors[key])), dtype=dtype)
        if is_stacked:
            stacked.setdefault(path, []).append(array)  # blocks arrive in order
        else:
            flat[path] = array
    flat.update({path: np.stack(arrays) for path, arrays in stacked.items()})
    return tensors_lib.unflatten(flat)


# ---------------------------------------------------------------------------------------------
# Original SD3.5 single-file layout -> diffusers names.

def _swap_halves(w):
    shift, scale = np.split(np.asarray(w), 2, axis=0)
    return np.concatenate([scale, shift], axis=0)


class _OriginalAsDiffusers:
    """A lazy view of `model.diffusion_model.*` tensors under diffusers names (as diffusers'
    `convert_sd3_transformer_checkpoint_to_diffusers`: fused qkv split, `joint_blocks` -> `transformer_blocks`)."""

    def __init__(self, tensors, prefix: str = ORIGINAL_PREFIX):
        self.tensors, self.prefix = tensors, prefix
        self.path = getattr(tensors, "path", "<tensors>")
        keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)]
        if not keys:
            raise tensors_lib.CheckpointError(f"{self.path}: no '{prefix}*' tensors (not an SD3 single file)")
        blocks = {int(m.group(1)) for k in keys if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
        self.last = max(blocks) if blocks else -1
        self.map = {}  # diffusers key -> (original key, fn)
        for k in keys:
            for dk, fn in self._rename(k):
                self.map[dk] = (prefix + k, fn)

    def _rename(self, k):
        top = {"pos_embed": "pos_embed.pos_embed", "x_embedder.proj": "pos_embed.proj",
               "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
               "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
               "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
               "context_embedder": "context_embedder", "final_layer.linear": "proj_out",
               "final_layer.adaLN_modulation.1": "norm_out.linear"}
        m = re.fullmatch(r"joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)\.(weight|bias)", k)
        if not m:
            base, _, kind = k.rpartition(".")
            if k == "pos_embed":
                return [("pos_embed.pos_embed", np.asarray)]
            if base in top:
                fn = _swap_halves if base == "final_layer.adaLN_modulation.1" else np.asarray
                return [(f"{top[base]}.{kind}", fn)]
            return [(self.prefix + k, np.asarray)]  # unknown: reported under its own name as unexpected
        i, stream, name, kind = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        pre = f"transformer_blocks.{i}."
        if stream == "x_block":
            names = {"attn.proj": "attn.to_out.0", "attn2.proj": "attn2.to_out.0", "attn.ln_q": "attn.norm_q",
                     "attn.ln_k": "attn.norm_k", "attn2.ln_q": "attn2.norm_q", "attn2.ln_k": "attn2.norm_k",
                     "adaLN_modulation.1": "norm1.linear", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
            qkv = {"attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                   "attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
        else:
            names = {"attn.proj": "attn.to_add_out", "attn.ln_q": "attn.norm_added_q",
                     "attn.ln_k": "attn.norm_added_k", "adaLN_modulation.1": "norm1_context.linear",
                     "mlp.fc1": "ff_context.net.0.proj", "mlp.fc2": "ff_context.net.2"}
            qkv = {"attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
        if name in qkv:
            return [(f"{pre}{dk}.{kind}", (lambda w, j=j: np.split(np.asarray(w), 3, axis=0)[j]))
                    for j, dk in enumerate(qkv[name])]
        if name in names:
            swap = stream == "context_block" and name == "adaLN_modulation.1" and i == self.last
            return [(f"{pre}{names[name]}.{kind}", _swap_halves if swap else np.asarray)]
        return [(self.prefix + k, np.asarray)]

    def shape(self, key):
        original, fn = self.map[key]
        shape = tensors_lib.tensor_shape(self.tensors, original)
        if original.endswith("qkv.weight") or original.endswith("qkv.bias"):
            return (shape[0] // 3,) + tuple(shape[1:])
        return shape

    def __getitem__(self, key):
        original, fn = self.map[key]
        return fn(self.tensors[original])

    def __iter__(self):
        return iter(self.map)

    def __len__(self):
        return len(self.map)


# ---------------------------------------------------------------------------------------------
# Config from a diffusers config.json or from tensor shapes.

def _config_from_shapes(tensors, overrides: dict) -> mmdit.MMDiTConfig:
    shape = lambda k: tensors_lib.tensor_shape(tensors, k)  # noqa: E731
    try:
        d, in_ch, p, _ = shape("pos_embed.proj.weight")
        blocks = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
        interval = any(k.startswith("time_text_embed_interval.") for k in tensors)
        embed = "time_text_embed_interval.time_text_embed" if interval else "time_text_embed"
        qk_norm = "transformer_blocks.0.attn.norm_q.weight" in tensors
        head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0] if qk_norm else 64
        derived = dict(
            patch_size=p, in_channels=in_ch, out_channels=shape("proj_out.weight")[0] // (p * p),
            num_layers=len(blocks), num_heads=d // head_dim, head_dim=head_dim,
            joint_attention_dim=shape("context_embedder.weight")[1],
            pooled_projection_dim=shape(f"{embed}.text_embedder.linear_1.weight")[1],
            pos_embed_max_size=int(round(shape("pos_embed.pos_embed")[1] ** 0.5)),
            dual_attention_layers=tuple(i for i in blocks if f"transformer_blocks.{i}.attn2.to_q.weight" in tensors),
            qk_norm="rms_norm" if qk_norm else None,
            lr_stream="transformer_blocks.0.attn.to_q_control.weight" in tensors,
            time_conditioning="interval" if interval else "single",
            time_scale=1.0 if interval else 1000.0)
    except KeyError as e:
        raise tensors_lib.CheckpointError(f"{getattr(tensors, 'path', '<tensors>')}: cannot infer the MM-DiT config, "
                                          f"missing tensor {e}") from None
    return mmdit.MMDiTConfig(**{**derived, **overrides})


def _config_from_diffusers_json(path: str, tensors, overrides: dict) -> mmdit.MMDiTConfig:
    raw = json.loads(files.read_text(path))
    inferred = _config_from_shapes(tensors, {})
    d = raw["num_attention_heads"] * raw["attention_head_dim"]
    if raw.get("caption_projection_dim", d) != d:
        raise tensors_lib.CheckpointError(f"{path}: caption_projection_dim {raw['caption_projection_dim']} must equal "
                                          f"the model width {d}")
    fields = dict(
        patch_size=raw.get("patch_size", 2), in_channels=raw.get("in_channels", 16),
        out_channels=raw.get("out_channels") or raw.get("in_channels", 16), num_layers=raw["num_layers"],
        num_heads=raw["num_attention_heads"], head_dim=raw["attention_head_dim"],
        joint_attention_dim=raw.get("joint_attention_dim", 4096),
        pooled_projection_dim=raw.get("pooled_projection_dim", 2048),
        pos_embed_max_size=raw.get("pos_embed_max_size", 96), sample_size=raw.get("sample_size", 128),
        dual_attention_layers=tuple(raw.get("dual_attention_layers", ())), qk_norm=raw.get("qk_norm"),
        lr_stream=inferred.lr_stream, time_conditioning=inferred.time_conditioning,
        time_scale=inferred.time_scale)
    return mmdit.MMDiTConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------
# Public API.

def _resolve_dir(path: str) -> str:
    """An SD3.5 root or a model bundle holds the transformer in `transformer/`."""
    if files.is_dir(os.path.join(path, "transformer")) and not files.exists(os.path.join(path, "config.json")):
        return os.path.join(path, "transformer")
    return path


def load_transformer(path: str, *, params_dtype=np.float32, show_progress: bool = False, **config_overrides):
    """(MMDiTConfig, params) from any supported source; `config_overrides` replace config fields.

    `lr_key_bug` cannot be read from weights: it defaults to True (dit4sr_q/f, Teacher, SMFSR); pass
    `lr_key_bug=False` for dit4sr_r1. Converted directories carry it in their config.
    """
    path = str(path)
    is_dir = files.is_dir(path)
    if is_dir:
        path = _resolve_dir(path)
    if is_dir and converted_dir.is_converted(path):
        config_dict, _ = converted_dir.read_converted_config(path)
        cfg = mmdit.MMDiTConfig.from_dict({**config_dict, **config_overrides})
        abstract = mmdit.abstract_params(cfg)
        _, _, params = converted_dir.load_converted(path, abstract)
        tensors_lib.check_tree(path, params, abstract)
        return cfg, jax.tree.map(lambda x: np.asarray(x, params_dtype), params)
    tensors = tensors_lib.open_weights(path)
    source = getattr(tensors, "path", path)
    if any(k.startswith(ORIGINAL_PREFIX) for k in tensors):
        tensors = _OriginalAsDiffusers(tensors)
    config_json = os.path.join(path if is_dir else os.path.dirname(path), "config.json")
    if files.exists(config_json) and not isinstance(tensors, _OriginalAsDiffusers):
        cfg = _config_from_diffusers_json(config_json, tensors, config_overrides)
    else:
        cfg = _config_from_shapes(tensors, config_overrides)
    params = diffusers_to_flax(tensors, cfg, source, dtype=params_dtype, show_progress=show_progress)
    return cfg, params


def convert(src: str, dst: str, show_progress: bool = True, variant: str = "", **config_overrides):
    """Convert once to an orbax checkpoint + JSON config (records `lr_key_bug` and the variant)."""
    cfg, params = load_transformer(src, show_progress=show_progress, **config_overrides)
    meta = {"source": files.absolute(src), "variant": variant, "lr_key_bug": cfg.lr_key_bug}
    converted_dir.save_converted(dst, cfg.to_dict(), params, meta)
    return cfg

"""A model bundle: everything `SRModel.from_checkpoint` (sampling/model.py) needs, in one directory.

Layout (written by `save_bundle`, read by `load_bundle`):

  DIR/bundle.json               {"format": "smfsr_jax.sr_bundle", "version": 1, "kind": "student" | "teacher",
                                 "transformer": "transformer", "autoencoder": "autoencoder",
                                 "null_embeddings": "null_embeddings.npz",
                                 "negative_embeddings": "negative_embeddings.npz" | null,
                                 "text_encoders": null | "text_encoders" (copied) | an absolute path (referenced),
                                 "meta": {...caller's JSON-serialisable record: stage, step, source...}}
  DIR/transformer/              MM-DiT, converted format (config.json + orbax params/; `load_transformer` reads it)
  DIR/autoencoder/              VAE, converted format (`load_vae` reads it); a pixel autoencoder has no
                                weights and stores config.json only
  DIR/null_embeddings.npz       prompt_embeds (77 + n, joint dim) and pooled (pooled dim,), float32: the NULL
                                conditioning used when no caption is given (DiT4SR's NULL_*.pt or encode(""))
  DIR/negative_embeddings.npz   optional, same shapes: the teacher's CFG unconditional branch (the negative prompt)
  DIR/text_encoders/            optional copy of a `convert text` directory (T5-XXL is ~19 GB in fp32, so the
                                default is a reference to the caller's directory instead of a copy)

DIR may be a bucket URL (gs://...). bundle.json is written last (an older one is removed first): a directory with
it is a complete bundle, locally or in a bucket.

The kind follows the transformer: interval time conditioning is an SMFSR student (cosine-grid sampler), single
time conditioning a DiT4SR-style teacher (SD3 Euler sampler with CFG). Training saves one at the end of each stage:

  save_bundle(workdir / "bundle", student_config=cfg, student_params=params, autoencoder_config=vae_cfg,
              autoencoder_params=vae_params, null_embeddings=(null_embeds, null_pooled),
              text_encoders_dir=config.text.encoders,
              meta={"stage": "student_isc", "step": step, "variant": "sd35m", "tile_size": 64})

(training/loop.py `export_bundle`; `meta` is `stages.stage.bundle_meta`: the stage's name, its last step, the
config variant and the latent tile SR uses by default.)
"""

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np

from smfsr_jax.convert import converted_dir
from smfsr_jax.convert.transformer import load_transformer
from smfsr_jax.convert.vae import load_vae
from smfsr_jax.core import files
from smfsr_jax.models.mmdit import MMDiTConfig
from smfsr_jax.models.vae import VAEConfig

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT, BUNDLE_VERSION = "smfsr_jax.sr_bundle", 1
TRANSFORMER_DIR, AUTOENCODER_DIR, TEXT_ENCODERS_DIR = "transformer", "autoencoder", "text_encoders"
NULL_EMBEDDINGS_FILE, NEGATIVE_EMBEDDINGS_FILE = "null_embeddings.npz", "negative_embeddings.npz"


@dataclasses.dataclass
class Bundle:
    path: str
    transformer_config: MMDiTConfig
    transformer_params: Any
    autoencoder_config: VAEConfig
    autoencoder_params: Any
    null_embeddings: tuple[np.ndarray, np.ndarray]
    negative_embeddings: tuple[np.ndarray, np.ndarray] | None
    text_encoders_dir: str | None
    meta: dict

    @property
    def kind(self) -> str:
        return transformer_kind(self.transformer_config)


def transformer_kind(config: MMDiTConfig) -> str:
    return "student" if config.time_conditioning == "interval" else "teacher"


def _check_embeddings(what: str, embeddings, config: MMDiTConfig) -> tuple[np.ndarray, np.ndarray]:
    prompt_embeds, pooled = (np.asarray(a, np.float32) for a in embeddings)
    want = f"(L, {config.joint_attention_dim}) and ({config.pooled_projection_dim},)"
    if (prompt_embeds.ndim != 2 or prompt_embeds.shape[1] != config.joint_attention_dim
            or pooled.shape != (config.pooled_projection_dim,)):
        raise ValueError(f"{what}: expected (prompt_embeds, pooled) shaped {want} for this transformer, "
                         f"got {prompt_embeds.shape} and {pooled.shape}")
    return prompt_embeds, pooled


def _save_embeddings(path: str, embeddings):
    prompt_embeds, pooled = embeddings
    buffer = io.BytesIO()
    np.savez(buffer, prompt_embeds=prompt_embeds, pooled=pooled)
    files.write_bytes(path, buffer.getvalue())


def _load_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(io.BytesIO(files.read_bytes(path))) as record:
        return record["prompt_embeds"], record["pooled"]


def text_encoders_path(path: str, record: dict) -> str | None:
    """The text encoders directory a bundle record names: its copy inside the bundle at `path`, or the absolute
    path or bucket URL it references; None without text encoders."""
    text_encoders = record.get("text_encoders")
    if text_encoders is None or files.is_remote(text_encoders):
        return text_encoders
    return os.path.join(path, text_encoders)  # an absolute local reference stays as it is


def save_bundle(dst: str, *, student_config: MMDiTConfig, student_params, autoencoder_config: VAEConfig,
                autoencoder_params, null_embeddings, text_encoders_dir: str | None = None, meta: dict | None = None,
                negative_embeddings=None, copy_text_encoders: bool = False) -> str:
    """Write a bundle directory (module docstring) and return its absolute path.

    `student_config` may also be a teacher config (single time conditioning). `null_embeddings` and
    `negative_embeddings` are (prompt_embeds (L, joint dim), pooled (pooled dim,)). `text_encoders_dir` (a
    `python -m smfsr_jax.convert text` output) is referenced by absolute path or bucket URL, or copied with
    `copy_text_encoders=True`.
    """
    dst = files.absolute(os.fspath(dst))
    config = student_config
    if not (config.in_channels == config.out_channels == autoencoder_config.latent_channels):
        raise ValueError(f"transformer channels in={config.in_channels}, out={config.out_channels} do not match the "
                         f"autoencoder's latent_channels={autoencoder_config.latent_channels}")
    null_embeddings = _check_embeddings("null_embeddings", null_embeddings, config)
    if negative_embeddings is not None:
        negative_embeddings = _check_embeddings("negative_embeddings", negative_embeddings, config)
        if negative_embeddings[0].shape != null_embeddings[0].shape:
            raise ValueError(f"negative_embeddings {negative_embeddings[0].shape} and null_embeddings "
                             f"{null_embeddings[0].shape} must have the same token count")
    if text_encoders_dir is not None and not files.is_dir(text_encoders_dir):
        raise FileNotFoundError(f"text_encoders_dir {text_encoders_dir}: no such directory")

    files.makedirs(dst)
    bundle_file = os.path.join(dst, BUNDLE_FILE)
    if files.exists(bundle_file):  # an older bundle: no longer complete while its parts are replaced
        files.remove(bundle_file)
    converted_dir.save_converted(os.path.join(dst, TRANSFORMER_DIR), config.to_dict(), student_params,
                                 meta={"kind": transformer_kind(config), "lr_key_bug": config.lr_key_bug})
    autoencoder_dir = os.path.join(dst, AUTOENCODER_DIR)
    autoencoder_record = dataclasses.asdict(autoencoder_config)
    if autoencoder_config.kind == "pixel":  # no weights: orbax cannot save an empty tree
        files.write_text(os.path.join(autoencoder_dir, converted_dir.CONFIG_NAME),
                         json.dumps({"config": autoencoder_record, "meta": {}}, indent=2, sort_keys=True))
    else:
        converted_dir.save_converted(autoencoder_dir, autoencoder_record, autoencoder_params)
    _save_embeddings(os.path.join(dst, NULL_EMBEDDINGS_FILE), null_embeddings)
    if negative_embeddings is not None:
        _save_embeddings(os.path.join(dst, NEGATIVE_EMBEDDINGS_FILE), negative_embeddings)

    text_encoders = None
    if text_encoders_dir is not None and copy_text_encoders:
        files.copy_tree(text_encoders_dir, os.path.join(dst, TEXT_ENCODERS_DIR))
        text_encoders = TEXT_ENCODERS_DIR
    elif text_encoders_dir is not None:
        text_encoders = files.absolute(text_encoders_dir)
    record = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "kind": transformer_kind(config),
              "transformer": TRANSFORMER_DIR, "autoencoder": AUTOENCODER_DIR,
              "null_embeddings": NULL_EMBEDDINGS_FILE,
              "negative_embeddings": NEGATIVE_EMBEDDINGS_FILE if negative_embeddings is not None else None,
              "text_encoders": text_encoders, "meta": meta or {}}
    files.write_text(bundle_file, json.dumps(record, indent=2, sort_keys=True))
    return dst


def read_bundle_record(path: str) -> dict:
    """bundle.json of `path`, checked; a clear error when `path` is not a bundle."""
    file = os.path.join(os.fspath(path), BUNDLE_FILE)
    if not files.is_file(file):
        raise FileNotFoundError(f"{path}: not a model bundle (no {BUNDLE_FILE}); write one with "
                                "smfsr_jax.weights.bundle.save_bundle")
    record = json.loads(files.read_text(file))
    if record.get("format") != BUNDLE_FORMAT or record.get("version") != BUNDLE_VERSION:
        raise ValueError(f"{file}: format {record.get('format')!r} version {record.get('version')!r}, expected "
                         f"{BUNDLE_FORMAT!r} version {BUNDLE_VERSION}")
    return record


def read_null_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The NULL (prompt_embeds, pooled) of the bundle at `path`, without loading its networks."""
    record = read_bundle_record(path)
    return _load_embeddings(os.path.join(os.fspath(path), record["null_embeddings"]))


def load_bundle(path: str, **transformer_overrides) -> Bundle:
    """Read a bundle; `transformer_overrides` replace MMDiTConfig fields (e.g. dtype="bfloat16", attention="cudnn")."""
    path = files.absolute(os.fspath(path))
    record = read_bundle_record(path)
    transformer_config, transformer_params = load_transformer(os.path.join(path, record["transformer"]),
                                                              **transformer_overrides)
    autoencoder_dir = os.path.join(path, record["autoencoder"])
    autoencoder_record, _ = converted_dir.read_converted_config(autoencoder_dir)
    if autoencoder_record.get("kind") == "pixel":
        autoencoder_config, autoencoder_params = VAEConfig.from_dict(autoencoder_record), {}
    else:
        autoencoder_config, autoencoder_params = load_vae(autoencoder_dir)
    null_embeddings = _load_embeddings(os.path.join(path, record["null_embeddings"]))
    negative_embeddings = (_load_embeddings(os.path.join(path, record["negative_embeddings"]))
                           if record.get("negative_embeddings") else None)
    text_encoders = text_encoders_path(path, record)
    return Bundle(path=path, transformer_config=transformer_config, transformer_params=transformer_params,
                  autoencoder_config=autoencoder_config, autoencoder_params=autoencoder_params,
                  null_embeddings=null_embeddings, negative_embeddings=negative_embeddings,
                  text_encoders_dir=text_encoders, meta=record.get("meta", {}))

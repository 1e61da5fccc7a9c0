"""torch -> Flax converters (numpy + safetensors only; torch is never imported).

Public API (imported lazily, so that e.g. the VAE converter does not import transformers):
  load_transformer(path, **config_overrides) -> (MMDiTConfig, params)
  load_vae(path) -> (VAEConfig, params)
  load_dinov3(path) -> (DINOv3Config, params)
"""

import importlib

_EXPORTS = {
    "load_transformer": "transformer",
    "student_from_teacher": "transformer",
    "load_vae": "vae",
    "load_text_encoder": "text",
    "load_dinov3": "dinov3",
    "CheckpointError": "common",
}


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

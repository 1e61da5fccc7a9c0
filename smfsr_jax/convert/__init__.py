"""torch -> Flax converters (numpy + safetensors only; torch is never imported).

Public API (imported lazily, so that e.g. the VAE converter does not import transformers):
  load_transformer(path, **config_overrides) -> (MMDiTConfig, params)
  load_vae(path) -> (VAEConfig, params)
  load_dinov3(path) -> (DINOv3Config, params)
  load_text_encoders(sd35_dir) -> TextEncoders; load_clip_text / load_t5 for one encoder
  load_lpips(net, trunk_path, lin_path) / load_lpips_from(path, net) -> (LPIPSConfig, params)
"""

import importlib

_EXPORTS = {
    "load_transformer": "transformer",
    "load_vae": "vae",
    "load_text_encoders": "text",
    "load_clip_text": "text",
    "load_t5": "text",
    "load_lpips": "lpips",
    "load_lpips_from": "lpips",
    "load_dinov3": "dinov3",
    "CheckpointError": "tensors",
}


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

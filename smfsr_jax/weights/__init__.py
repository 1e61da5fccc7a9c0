"""Trained and released weights as the rest of the package loads them (docs/design.md#sampling).

- `bundle`: `save_bundle` / `load_bundle`, the directory a training stage hands to inference.
- `pretrained`: released SMFSR / DiT4SR / SD3.5 weights (local, Hub or bucket) converted once into a cached bundle.

This layer sits above `convert` (whose converters it calls) and below `sampling`, `training` and `evaluation`.
"""

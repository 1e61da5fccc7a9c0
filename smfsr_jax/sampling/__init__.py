"""One-step and multi-step sampling, latent tiling and colour correction (docs/design.md#sampling).

- `samplers`: pure, jittable samplers over a velocity function: `one_step`, `euler_sample` (cosine-grid student
  or teacher Euler), `student_velocity` / `teacher_velocity` (CFG in one 2B batch) around an MM-DiT apply function.
- `tiling`: 64/24 latent tiles with upstream's Gaussian blend, batched through the network in equal chunks.
- `color`: AdaIN and wavelet colour correction with 8-bit truncation.
- `settings`: `SRSettings`, every sampling, tiling, batching and output setting with its default (one frozen value).
- `model`: `SRModel`, a model loaded for SR (device parameters, text embeddings and encoders).
- `pipeline`: LR preprocessing, per-image seeds, and the fused SR function (encode, sample, decode, colour fix as
  one XLA program for one image size).
- `canvas`: the same SR as functions that compile per canvas size and latent-tile chunk, not per image size.
- `runner`: `super_resolve`, the batch runner every entry point uses, and `SRPipeline` for images in memory.

The sampling grids (the student's cosine grid, the teacher's SD3 shift-3 sigmas) are in `core/schedules.py`; model
bundles and released weights in `weights/`.
"""

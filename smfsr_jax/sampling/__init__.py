"""One-step and multi-step sampling, latent tiling and colour correction (docs/design.md#sampling).

- `samplers`: pure, jittable samplers over a velocity function: `one_step`, `euler_sample` (cosine-grid student
  or teacher Euler), `student_velocity` / `teacher_velocity` (CFG in one 2B batch) around an MM-DiT apply function.
- `tiling`: 64/24 latent tiles with upstream's Gaussian blend, batched through the network in equal chunks.
- `color`: AdaIN and wavelet colour correction with 8-bit truncation.
- `pipeline`: `SRPipeline` (LR preprocessing, per-image seeds, captions, decode); CLI `python -m smfsr_jax.sr`.

The sampling grids (the student's cosine grid, the teacher's SD3 shift-3 sigmas) are in `core/schedules.py`; model
bundles and released weights in `weights/`.
"""

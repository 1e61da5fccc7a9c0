"""One-step and multi-step sampling, latent tiling and colour correction (docs/design.md#sampling).

- `schedules`: the student's cosine grid and the teacher's SD3 shift-3 sigmas (diffusers `set_timesteps`).
- `samplers`: pure, jittable samplers over a velocity function: `one_step`, `euler_sample` (cosine-grid student
  or teacher Euler), `student_velocity` / `teacher_velocity` (CFG in one 2B batch) around an MM-DiT apply function.
- `tiling`: 64/24 latent tiles with upstream's Gaussian blend, batched through the network in chunks.
- `color`: AdaIN and wavelet colour correction with 8-bit truncation.
- `bundle`: `save_bundle` / `load_bundle`, the directory a training stage hands to inference.
- `pipeline`: `SRPipeline` (LR preprocessing, per-image seeds, captions, decode); CLI `python -m smfsr_jax.sr`.
"""

"""Data: TFDS builders, grain pipelines, Real-ESRGAN degradation, caption embeddings.

- `degradation`: the Real-ESRGAN second-order degradation (OSEDiff 512 variant) in numpy/OpenCV,
  torch-semantics resizes, the DiffJPEG port, and `upsample_lr` (the model's bicubic x4 LR input).
- `images`: intake checks (corrupt, truncated, grayscale, RGBA, 16-bit, CMYK, EXIF) and decoding.
- `tfds/`: builders `lsdir`, `ffhq10k`, `paired_sr/*`, `lq_only/*`, `bundled`; `build` prepares them:
  `python -m smfsr_jax.data.build --dataset bundled --data_dir DIR`.
- `pipeline`: grain train/eval pipelines over `tfds.data_source`, with the batch contract, sharding
  and checkpointable iterators.
- `captions`: SD3 prompt embeddings computed once and stored beside a dataset.
"""

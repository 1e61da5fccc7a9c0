r"""Stage `teacher_fm` (stage 0): the DiT4SR teacher, LR-conditioned flow matching.

Objective (config.flow_matching): sd35m keeps DiT4SR's setting, the x0-space loss on SD3.5's shift-3 grid,
because it fine-tunes SD3.5, whose base already knows the low-noise velocity. The tiny variant trains from
nothing and uses the paper's Eq. 3 (velocity MSE, sigma ~ U(0, 1)): on the known-answer toy the x0/shift-3
teacher ends 10x farther from the truth at 50 steps (docs/experiments.md, teacher objectives).

Launch (paper settings; SD3.5-M weights and the LSDIR/FFHQ records prepared beforehand):

  python train.py --config configs/teacher_fm.py:sd35m --workdir runs/teacher_fm \
    --config.init.base=/ckpt/stable-diffusion-3.5-medium --config.autoencoder.path=/ckpt/stable-diffusion-3.5-medium \
    --config.data.data_dir=/data/tfds

  (Caption embeddings are read by default: build them first with python -m smfsr_jax.data.captions; a
  missing cache is an error that names the command.)

  Expected (not yet run at this scale: no SD3.5 weights or GPU here): 80K steps at global batch 32 (4x RTX
  5880 in the paper; 16 per device fit a 141 GB H200, see the README's memory table, so use two or more, or
  --config.batch_size=16 on one); the loss (x0-space MSE) should fall from ~0.3 to ~0.1 within the first
  thousand steps; the result is sampled with 40 Euler steps and CFG.

Tiny (CPU, the embedded default; `make demo` runs it). Its data, scikit-image's photographs, is built
once into runs/tfds (a few seconds; the tiny student configs read it too):

  python -m smfsr_jax.data.build --dataset bundled --data_dir runs/tfds
  python train.py --config configs/teacher_fm.py:tiny --workdir runs/tiny/teacher_fm \
    --config.data.data_dir=runs/tfds

  Expected: 800 steps in ~3.5 min on 2 cores; the velocity loss falls from ~1.1 to ~0.12 (its floor is set
  by the unpredictable noise half of v = eps - x0). On the held-back photographs, over training seeds 0-2:
  21.96 ± 0.06 dB with one Euler step (the conditional mean: detail ratio 0.29), 20.05 ± 0.12 dB with 16
  (samples with the HR's amount of fine detail, 0.93 ± 0.04; no token mosaic: block ratio 1.08).
"""

import ml_collections

from configs import base


def get_config(arg: str = "sd35m") -> ml_collections.ConfigDict:
    variant = base.check_variant(arg)
    c = base.base_config(variant)
    c.stage = "teacher_fm"
    tiny = variant == "tiny"
    c.model = base.model_config(variant, "dit4sr_teacher", loaded=not tiny)
    c.init = ml_collections.ConfigDict(dict(
        base=None if tiny else ml_collections.config_dict.placeholder(str),  # SD3.5-M (any layout)
        random=tiny))
    # The tiny run has no pretrained SD3.5 to freeze: it trains every weight (base and control at once).
    c.trainable = (".*",) if tiny else ("control",)
    # Which objective and why: the module docstring.
    c.flow_matching = ml_collections.ConfigDict(dict(
        loss="velocity" if tiny else "x0", sigma_sampler="uniform" if tiny else "sd3", shift=3.0))
    c.batch_size = 8 if tiny else 32
    c.total_steps = 800 if tiny else 80_000
    c.optimizer.lr = 1e-3 if tiny else 5e-5
    if tiny:
        c.ema_decay = 0.995  # the bundle (what the student distils and the demo samples) holds the EMA weights
    return c

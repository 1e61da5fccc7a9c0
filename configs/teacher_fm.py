r"""Stage 0: the DiT4SR teacher, LR-conditioned flow matching (training.md §2).

Launch (paper settings; SD3.5-M weights and the LSDIR/FFHQ records prepared beforehand):

  python train.py --config configs/teacher_fm.py:sd35m --workdir runs/teacher \
    --config.init.base=/ckpt/stable-diffusion-3.5-medium --config.autoencoder.path=/ckpt/stable-diffusion-3.5-medium \
    --config.data.data_dir=/data/tfds --config.data.captions=True

  Expected: 80K steps at global batch 32 (4x RTX 5880 in the paper; 16 per device fit a 141 GB H200, see
  the README's memory table, so use two or more, or --config.batch_size=16 on one); the loss (x0-space
  MSE) falls from ~0.3 to ~0.1 within the first thousand steps; the result is sampled with 40 Euler steps
  and CFG.

Tiny (CPU, the embedded default; `make demo` runs it):

  python train.py --config configs/teacher_fm.py:tiny --workdir runs/tiny_teacher \
    --config.data.data_dir=runs/tfds

  Expected: 400 steps in a few minutes on 2 cores; the loss falls from ~0.5 to below 0.1.
"""

import ml_collections

from configs import common


def get_config(arg: str = "sd35m") -> ml_collections.ConfigDict:
    variant = common.check_variant(arg)
    c = common.base_config(variant)
    c.stage = "teacher"
    tiny = variant == "tiny"
    c.model = common.model_config(variant, "dit4sr_teacher")
    c.init = ml_collections.ConfigDict(dict(
        base=None if tiny else ml_collections.config_dict.placeholder(str),  # SD3.5-M (any layout)
        random=tiny))
    # The tiny run has no pretrained SD3.5 to freeze: it trains every weight (base and control at once).
    c.trainable = (".*",) if tiny else ("control",)
    c.flow_matching = ml_collections.ConfigDict(dict(shift=3.0))
    c.batch_size = 8 if tiny else 32
    c.total_steps = 400 if tiny else 80_000
    c.optimizer.lr = 1e-3 if tiny else 5e-5
    return c

r"""Stage 1: the SMFSR student, Interval Splitting Consistency + boundary loss (training.md §3).

Launch (paper settings; the teacher from stage 0, the released SMFSR `Teacher`, or a DiT4SR checkpoint):

  python train.py --config configs/student_isc.py:sd35m --workdir runs/student \
    --config.init.teacher=runs/teacher/bundle --config.autoencoder.path=/ckpt/stable-diffusion-3.5-medium \
    --config.data.data_dir=/data/tfds --config.data.captions=True

  Expected: 40K steps at batch 16; the ISC loss drops quickly (the student starts as the teacher with a
  fresh interval MLP) and one-step samples become sharp within a few thousand steps.

Tiny (CPU, after the tiny teacher; `make demo` runs both):

  python train.py --config configs/student_isc.py:tiny --workdir runs/tiny_student \
    --config.init.teacher=runs/tiny_teacher/bundle --config.data.data_dir=runs/tfds

  Expected: a few hundred steps in a few minutes; one-step PSNR on the held-back crops near the
  teacher's multi-step PSNR.
"""

import ml_collections

from configs import common


def get_config(arg: str = "sd35m") -> ml_collections.ConfigDict:
    variant = common.check_variant(arg)
    c = common.base_config(variant)
    c.stage = "student"
    tiny = variant == "tiny"
    c.model = common.model_config(variant, "smfsr_student")
    c.init = ml_collections.ConfigDict(dict(teacher=ml_collections.config_dict.placeholder(str)))
    c.trainable = ("control", "^time_text_embed_interval/")
    c.isc = ml_collections.ConfigDict(dict(
        p_boundary=0.6, per_sample=False,
        boundary_cfg=ml_collections.config_dict.placeholder(float)))  # None: the paper's "w/o CFG"
    c.batch_size = 8 if tiny else 16
    c.total_steps = 200 if tiny else 40_000
    c.optimizer.lr = 1e-3 if tiny else 5e-5
    return c

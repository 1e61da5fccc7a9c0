r"""Stage `student_reward` (stage 3): reward fine-tuning of the one-step student with its preserved
stochasticity (DiffusionNFT through the average-velocity head, or direct reward back-propagation).

Launch (from the stage-2 student; the reward networks converted with python -m smfsr_jax.convert
musiq / maniqa / clipiqa into ckpt/metrics/<name>, the evaluator's --weights_dir layout; the held-out set is
DRealSR, built with python -m smfsr_jax.data.build --dataset paired_sr/drealsr):

  python train.py --config configs/student_reward.py:sd35m --workdir runs/student_reward \
    --config.init.student=runs/student_gan/bundle --config.init.teacher=runs/teacher_fm/bundle \
    --config.autoencoder.path=ckpt/vae --config.reward.weights_dir=ckpt/metrics \
    --config.data.data_dir=/data/tfds

  Memory (benchmarks/memory_sd35m.py, README): nft with 2 LR images x 8 seeds per device compiles to 104 GiB,
  so batch 8 needs 4 devices; direct back-propagates through the decoder and the IQA networks and fits
  1 image x 2 seeds per device (108 GiB): pass --config.reward.seeds=2. Expected: unverified at this scale (no
  SD3.5 or IQA weights here). Watch holdout/<reward> rise while
  holdout/psnr, holdout/lpips and holdout/diversity hold; `--config.reward.method=direct` is the
  back-propagation baseline.

Tiny (CPU, from the demo's stage-2 bundle, with the analytic LR-consistency reward; benchmarks/reward_tiny.py
runs both methods and prints the before/after table):

  python train.py --config configs/student_reward.py:tiny --workdir runs/tiny/student_reward \
    --config.init.student=runs/tiny/student_gan/bundle --config.init.teacher=runs/tiny/teacher_fm/bundle \
    --config.data.data_dir=runs/tfds

  Expected: 100 steps in ~2.5 min; holdout/lr_consistency rises from -0.040 to about -0.033 (nft) or -0.025
  (direct, --config.reward.method=direct) while holdout/psnr rises from 22.4 to 22.5 / 22.8 dB and
  holdout/diversity stays at ~8.6 levels (docs/experiments.md, stage 3 in miniature).
"""

import ml_collections

from configs import base
from smfsr_jax.objectives import isc


def get_config(arg: str = "sd35m") -> ml_collections.ConfigDict:
    variant = base.check_variant(arg)
    c = base.student_config(variant)
    c.stage = "student_reward"
    tiny = variant == "tiny"
    placeholder = ml_collections.config_dict.placeholder
    # student: a stage-2 (or stage-1) bundle, converted directory or finished workdir; teacher: for the ISC term.
    c.init = ml_collections.ConfigDict(dict(student=placeholder(str), teacher=placeholder(str)))
    c.reward = ml_collections.ConfigDict(dict(
        method="nft",  # "nft" | "direct"
        # (name, weight) pairs from objectives/rewards.py's registry; nft normalises each within its group.
        rewards=(("lr_consistency", 1.0),) if tiny else
        (("musiq", 1.0), ("maniqa", 1.0), ("clipiqa", 1.0), ("lr_consistency", 1.0)),
        weights_dir=placeholder(str),  # DIR/<network>: musiq, maniqa, clipiqa, lpips
        networks=dict(musiq=placeholder(str), maniqa=placeholder(str), clipiqa=placeholder(str),
                      lpips=placeholder(str)),
        lpips_net="alex",  # lpips_hr and the held-out LPIPS: the evaluator's LPIPS
        seeds=4 if tiny else 8,  # K samples per LR image
        rollout_batches=4,  # steps (rollout batches) per epoch: the old policy moves once per epoch
        old_decay=dict(per_epoch=0.001, max=0.5),  # d = min(per_epoch * epoch, max)
        beta=1.0,
        clip=5.0,  # A_max
        advantage_std="group",  # "group": spread of the image's K seeds; "global": of the whole batch
        kl_weight=1e-4,
        p_t_one=0.25,  # NFT times: t = 1 (the deployed one-step map) with this probability, else U(0, 1]
    ))
    # Optional terms that keep the student a consistent average-velocity field and close to the HR.
    c.weights = ml_collections.ConfigDict(dict(isc=1.0, rec=0.0))
    c.isc = ml_collections.ConfigDict(dict(p_boundary=0.6, per_sample=False, **isc.DEFAULT_OPTIONS))
    c.rec = ml_collections.ConfigDict(dict(
        lpips_weight=1.0,
        lpips=dict(net="alex" if tiny else "vgg", weights=placeholder(str), random_init=tiny)))
    c.holdout = ml_collections.ConfigDict(dict(
        dataset="bundled" if tiny else "paired_sr/drealsr", split="holdout" if tiny else "test",
        data_dir=placeholder(str),  # default: data.data_dir
        image_size=128 if tiny else 512,  # HR side of HR-only sets' centre crops
        max_crops=32 if tiny else 16, seeds=4, seed=0,
        every=20 if tiny else 500,
        lpips=placeholder(str),  # LPIPS weights: adds holdout/lpips and holdout/lpips_between_seeds
    ))
    # LoRA (rank > 0) on the trainable set's kernels matching `targets`, as DiffusionNFT trains SD3.5-M (rank 32,
    # alpha 64, lr 3e-4, weight decay 1e-4); rank 0 trains the stage's trainable set itself.
    c.lora = ml_collections.ConfigDict(dict(rank=0 if tiny else 32, alpha=64.0,
                                            targets=(r"to_(q|k|v|out)_control/",)))
    c.batch_size = 4 if tiny else 8
    c.total_steps = 100 if tiny else 2_000
    c.optimizer.lr = 1e-4 if tiny else 3e-4
    c.optimizer.weight_decay = 1e-2 if tiny else 1e-4
    c.log_every = 5 if tiny else 50
    return c

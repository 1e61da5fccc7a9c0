"""The training stages, one module each, keyed by the name of their config file (= `config.stage`):

    teacher_fm    stage 0, teacher.py: LR-conditioned flow matching (DiT4SR)
    student_isc   stage 1, student.py: Interval Splitting Consistency + boundary loss against the teacher
    student_gan   stage 2, gan.py: ISC + reconstruction + VSD + DINOv3-feature hinge GAN
    student_reward  stage 3, reward.py: reward fine-tuning (DiffusionNFT or direct) of the one-step student

Each module has `build(config, abstract=False) -> Stage` (everything a training step needs) and
`network(config, abstract=False) -> Network` (what sampling needs: no teacher, LPIPS or discriminator).
"""

import ml_collections

from smfsr_jax.training.stages import gan, reward, student, teacher
from smfsr_jax.training.stages import stage as stage_lib

STAGES = {module.NAME: module for module in (teacher, student, gan, reward)}


def stage_module(config: ml_collections.ConfigDict):
    if config.stage not in STAGES:
        raise ValueError(f"unknown stage {config.stage!r}; expected one of {sorted(STAGES)}")
    return STAGES[config.stage]


def build_stage(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Stage:
    return stage_module(config).build(config, abstract)


def build_network(config: ml_collections.ConfigDict, abstract: bool = False) -> stage_lib.Network:
    return stage_module(config).network(config, abstract)

"""The stage registry and its builders: one name per stage, abstract (shapes-only) trees that match the real ones."""

import jax
import pytest

from configs import student_gan, student_isc, student_reward, teacher_fm
from smfsr_jax.training import stages
from tests import tiny_runs

MODULES = (teacher_fm, student_isc, student_gan, student_reward)


def test_one_name_per_stage():
    """The registry is keyed by the config files' names, which are the configs' `stage`."""
    assert sorted(stages.STAGES) == sorted(m.__name__.split(".")[-1] for m in MODULES)
    for module in MODULES:
        for variant in ("tiny", "sd35m"):
            assert module.get_config(variant).stage == module.__name__.split(".")[-1]
    config = teacher_fm.get_config("tiny")
    config.stage = "teacher"
    with pytest.raises(ValueError, match="unknown stage 'teacher'"):
        stages.build_stage(config)


def _signature(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def _tiny(module, data_dir, teacher_run=None, student_run=None, **overrides):
    init = dict(overrides)
    if teacher_run is not None:
        init["init.teacher"] = str(teacher_run / "bundle")
    if student_run is not None:
        init["init.student"] = str(student_run / "bundle")
    return tiny_runs.tiny(module, data_dir, **init)


def test_abstract_trees_match_the_loaded_ones(data_dir, teacher_run, student_run):
    """What benchmarks lower (abstract=True, from the config alone) has the trees training builds from files."""
    for module, runs, overrides in ((teacher_fm, (), {}), (student_isc, (teacher_run,), {}),
                                    (student_gan, (teacher_run, student_run), {}),
                                    (student_reward, (teacher_run, student_run), {}),
                                    (student_reward, (teacher_run, student_run), {"lora.rank": 4})):
        config = _tiny(module, data_dir, *runs, **overrides)
        real, abstract = stages.build_stage(config), stages.build_stage(config, abstract=True)
        assert real.name == abstract.name == config.stage
        for field in ("trainable", "frozen", "model_state"):
            assert _signature(getattr(abstract, field)) == _signature(getattr(real, field)), (config.stage, field)
        network = stages.build_network(config, abstract=True)
        assert _signature(network.trainable) == _signature(real.trainable[network.part] if network.part
                                                           else real.trainable)


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.split(".")[-1])
def test_full_size_stages_build_as_shapes(module):
    """The sd35m configs build without any file (SD3.5-M shapes, bf16 frozen base); slow: ~45 s each, and
    `make test-slow`'s benchmarks lower them too."""
    stage = stages.build_stage(module.get_config("sd35m"), abstract=True)
    leaves = jax.tree.leaves(stage.frozen["base"])
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert sum(x.size for x in leaves) > 1e9

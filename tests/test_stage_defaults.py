"""Defaults that would otherwise weaken full-scale training quietly: captions, the teacher's NULL, per-stage data
seeds, fp32 positional tables, and config fields a stage ignores."""

import logging
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import student_gan, student_isc, teacher_fm
from smfsr_jax.data.captions import CaptionEmbeddings
from smfsr_jax.training import stages
from smfsr_jax.training.stages import batch as batch_lib
from smfsr_jax.training.stages import loading
from smfsr_jax.training.stages import stage as stage_lib
from tests import tiny_runs
from tests.conftest import REPO, import_torch

MODULES = (teacher_fm, student_isc, student_gan)


def test_full_size_stages_read_captions():
    for module in MODULES:
        assert module.get_config("sd35m").data.captions, module.__name__
        assert not module.get_config("tiny").data.captions  # the bundled photographs have no caption cache


def test_a_missing_caption_cache_names_the_command(data_dir):
    with pytest.raises(FileNotFoundError, match="python -m smfsr_jax.data.captions --dataset bundled --split train"):
        CaptionEmbeddings.for_dataset("bundled", "train", data_dir)


def test_fields_a_stage_ignores_are_errors():
    for config, field in (("configs/student_isc.py:tiny", "model.time_scale=1.0"),
                          ("configs/student_gan.py:tiny", "isc.boundary_cfg=4.5")):
        result = subprocess.run([sys.executable, "train.py", f"--config={config}", f"--config.{field}",
                                 "--workdir=/nonexistent"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and field.split("=")[0].split(".")[-1] in result.stderr, result.stderr[-2000:]


def test_every_stage_draws_its_own_crops():
    seeds = {module.get_config("tiny").stage: batch_lib.data_seed(module.get_config("tiny")) for module in MODULES}
    assert len(set(seeds.values())) == len(MODULES)
    assert batch_lib.data_seed(teacher_fm.get_config("tiny")) == seeds["teacher_fm"]  # deterministic


def test_frozen_bf16_keeps_the_positional_table_in_fp32():
    tree = {"pos_embed": {"pos_embed": np.ones((1, 4, 8), np.float32), "proj": {"kernel": np.ones((2, 8), np.float32)}}}
    cast = stage_lib.frozen_cast(tree, ml_collections.ConfigDict({"frozen_dtype": "bfloat16"}))
    assert cast["pos_embed"]["pos_embed"].dtype == np.float32
    assert cast["pos_embed"]["proj"]["kernel"].dtype.name == "bfloat16"


def test_the_null_in_use_must_be_the_teachers(teacher_run, data_dir, tmp_path):
    other = tmp_path / "other_null.npz"
    np.savez(other, prompt_embeds=np.zeros((8, 32), np.float32), pooled_prompt_embeds=np.zeros(32, np.float32))
    config = tiny_runs.tiny(student_isc, data_dir, **{"init.teacher": str(teacher_run / "bundle"),
                                                     "text.null": str(other)})
    with pytest.raises(ValueError, match="NULL prompt_embeds in use .* differ from those of the teacher bundle"):
        stages.build_stage(config)


def null_config(**text):
    return ml_collections.ConfigDict({"text": {"null": "placeholder", "published_null": None, **text},
                                      "data": {"captions": False}})


def test_a_released_teacher_is_checked_against_the_published_null(tmp_path, caplog):
    torch = import_torch()
    prompt, pooled = np.random.default_rng(0).normal(size=(80, 32)), np.random.default_rng(1).normal(size=32)
    torch.save(torch.from_numpy(prompt.astype(np.float32)), tmp_path / "NULL_prompt_embeds.pt")
    torch.save(torch.from_numpy(pooled.astype(np.float32)), tmp_path / "NULL_pooled_prompt_embeds.pt")
    released = str(tmp_path / "dit4sr_q")  # not a bundle of this project
    same = {"prompt_embeds": prompt, "pooled_prompt_embeds": pooled}
    loading.check_null_embeddings(null_config(published_null=str(tmp_path)), released, same)
    with pytest.raises(ValueError, match="NULL pooled in use"):
        loading.check_null_embeddings(null_config(published_null=str(tmp_path)), released,
                                      {**same, "pooled_prompt_embeds": pooled + 1})
    with caplog.at_level(logging.WARNING):
        loading.check_null_embeddings(null_config(), released, same)
    assert "cannot check the NULL embeddings" in caplog.text

"""Stage `student_reward` end to end on tiny runs: both methods train and export a bundle SR reads, a killed NFT
run resumes exactly (old policy included), reward networks load from the evaluator's layout and missing ones are
named before anything compiles (devices, processes and preemption: tests/test_run_contract.py)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from configs import student_reward
from smfsr_jax.convert.converted_dir import save_converted
from smfsr_jax.convert.tensors import flatten
from smfsr_jax.core import errors
from smfsr_jax.evaluation.scoring import load_musiq
from smfsr_jax.models import musiq
from smfsr_jax.sampling.runner import SRPipeline
from smfsr_jax.training import checkpoints, inference, loop, writers
from smfsr_jax.training.stages import reward as reward_stage
from tests.test_train import DiesAtBatch, assert_trees_close
from tests.tiny_runs import bundle_params, tiny

STEPS = 8
# Small and without the ISC term (its teacher doubles the compile time); the LoRA test turns it on.
SMALL = {"total_steps": STEPS, "reward.seeds": 2, "reward.rollout_batches": 3, "weights.isc": 0.0,
         "holdout.every": 4, "holdout.max_crops": 2, "holdout.seeds": 2}


def reward_config(data_dir, teacher_run, student_run, **overrides):
    return tiny(student_reward, data_dir, **{"init.teacher": str(teacher_run / "bundle"),
                                             "init.student": str(student_run), **SMALL, **overrides})


@pytest.fixture(scope="module")
def nft_run(data_dir, teacher_run, student_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reward_nft")
    loop.train(reward_config(data_dir, teacher_run, student_run), str(workdir))
    return workdir


def test_nft_trains_logs_and_exports_a_bundle_sr_reads(nft_run, student_run):
    records = list(writers.read_jsonl(nft_run / "metrics.jsonl"))
    steps = [r for r in records if "nft_policy_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for r in steps:
        assert np.isfinite(r["loss"]) and np.isfinite(r["kl"]) and np.isfinite(r["nft_policy_loss"])
        assert 0.0 <= r["optimality_mean"] <= 1.0 and r["rollout_diversity"] > 0
    # The old policy moves at the start of each epoch of 3 rollout batches: steps 4 and 7.
    assert [r["step"] for r in steps if r["old_decay"] > 0] == [4, 7]
    holdout = {r["step"]: r for r in records if "holdout/psnr" in r}
    assert sorted(holdout) == [0, 4, 8]  # before training, every 4 steps, and at the end
    assert {"holdout/lr_consistency", "holdout/lr_consistency_std", "holdout/diversity"} <= set(holdout[0])
    meta = json.loads((nft_run / "bundle" / "bundle.json").read_text())["meta"]
    assert meta["stage"] == "student_reward" and meta["step"] == STEPS
    trained, before = bundle_params(nft_run), bundle_params(student_run)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(before)))
    sr = SRPipeline.from_checkpoint(str(nft_run / "bundle"), process_size=32)  # no upscaling of small inputs
    lr = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
    assert sr(lr, seed=0).shape == (32, 32, 3)


def test_killed_nft_run_resumes_exactly(nft_run, data_dir, teacher_run, student_run, tmp_path, monkeypatch):
    """Killed after the checkpoint at step 4 (the old policy moved there), resumed: the same weights as the
    uninterrupted run, so the old policy, the rollout count and the data position came back."""
    config = reward_config(data_dir, teacher_run, student_run, checkpoint_every=4)
    original = loop.data_iterator
    monkeypatch.setattr(loop, "data_iterator", lambda cfg: DiesAtBatch(original(cfg), 7))
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, str(tmp_path))
    assert checkpoints.finished_steps(str(tmp_path / "checkpoints")) == [4]
    monkeypatch.setattr(loop, "data_iterator", original)
    loop.train(config, str(tmp_path))
    assert_trees_close(bundle_params(tmp_path), bundle_params(nft_run), atol=0.0)


def test_direct_method_with_lora_exports_merged_weights(data_dir, teacher_run, student_run, tmp_path):
    """Direct reward back-propagation with the ISC and reconstruction terms, training LoRA adapters only: the
    bundle holds the merged weights, and a checkpoint of the workdir loads to the same network."""
    config = reward_config(data_dir, teacher_run, student_run, **{"reward.method": "direct", "total_steps": 3,
                                                                  "weights.isc": 1.0, "weights.rec": 1.0,
                                                                  "lora.rank": 4, "holdout.dataset": None})
    loop.train(config, str(tmp_path))
    steps = [r for r in writers.read_jsonl(tmp_path / "metrics.jsonl") if "reward_loss" in r]
    assert len(steps) == 3 and all(np.isfinite(r["rec_mse"]) and np.isfinite(r["isc_loss"]) and r["kl"] >= 0
                                   for r in steps)
    assert json.loads((tmp_path / "bundle" / "bundle.json").read_text())["meta"]["stage"] == "student_reward"
    exported, before = flatten(bundle_params(tmp_path)), flatten(bundle_params(student_run))
    moved = {path for path in exported if not np.array_equal(exported[path], before[path])}
    assert moved and all("_control/kernel" in path for path in moved), moved  # only the LoRA targets
    loaded = flatten(inference.load_checkpoint(str(tmp_path)).transformer_params)
    for path, value in exported.items():
        np.testing.assert_array_equal(loaded[path], value, err_msg=path)


def test_missing_reward_weights_are_all_named_before_anything_runs(data_dir, teacher_run, student_run, tmp_path):
    config = reward_config(data_dir, teacher_run, student_run,
                           **{"reward.rewards": (("musiq", 1.0), ("clipiqa", 1.0), ("lr_consistency", 1.0)),
                              "reward.weights_dir": str(tmp_path / "metrics")})
    with pytest.raises(errors.UserError) as error:
        loop.train(config, str(tmp_path / "run"))
    message = str(error.value)
    assert str(tmp_path / "metrics" / "musiq") in message and str(tmp_path / "metrics" / "clipiqa") in message
    assert "python -m smfsr_jax.convert" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_iqa_reward_is_the_evaluators_score(tmp_path):
    """A MUSIQ reward loaded from the evaluator's --weights_dir layout scores what evaluate.py scores."""
    params = jax.device_get(musiq.MUSIQ(musiq.TINY).init(jax.random.PRNGKey(0), *_musiq_inputs())["params"])
    save_converted(tmp_path / "musiq", dataclasses.asdict(musiq.TINY), params, meta={"converter": "musiq"})
    config = student_reward.get_config("tiny").reward
    config.rewards = (("musiq", 1.0),)
    config.weights_dir = str(tmp_path)
    fns, weights = reward_stage.load_rewards(config)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 32, 3), np.uint8)
    signed = images.astype(np.float32) / 127.5 - 1
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(fns["musiq"])(weights["musiq"], signed, {}))
    np.testing.assert_allclose(ours, load_musiq(tmp_path / "musiq")(images), rtol=1e-4)


def _musiq_inputs():
    images = np.zeros((1, 48, 32, 3), np.float32)
    return musiq.multiscale_tokens(images, musiq.TINY)

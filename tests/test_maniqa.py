"""MANIQA against pyiqa: crops, scores and activations (goldens written by tools/make_iqa_goldens.py from
pyiqa's own `maniqa-pipal` metric with the same random weights), strict converter.

The default tests run a reduced network (ViT width 32, 2 crops) through every code path; the 20-crop
geometry is checked on its own and the published architecture is a slow test (minutes on CPU).
Tolerances: max abs error <= 1e-5 * max |reference| (CONTRIBUTING); scores 5e-5 relative (SCORE_REL).
"""

import jax
import numpy as np
import pytest

from smfsr_jax.convert import maniqa as maniqa_convert
from smfsr_jax.evaluation.scoring import load_maniqa
from smfsr_jax.models import maniqa
from tests.conftest import REPO
from tests.iqa_checks import (SCORE_REL, assert_close, assert_conversion_fails, assert_converts_file, assert_keys_match,
                              save_pth, saved_scorer, unit)
from tools.make_iqa_goldens import golden_images, random_state_dict

GOLDEN = np.load(REPO / "tests" / "golden" / "iqa_maniqa.npz")
IMAGES = golden_images()  # 224 x 224 and 256 x 192 (H x W) uint8: both are upscaled before cropping


def crops_of(image, num_crops):
    return maniqa.uniform_crops(maniqa.upscale_for_crops((unit(image) - 0.5) / 0.5, 224), 224, num_crops)


def test_twenty_uniform_crops_match_pyiqa():
    for i, image in enumerate(IMAGES):
        crops = np.asarray(crops_of(image, 20))
        assert crops.shape == (20, 224, 224, 3)
        assert_close(crops[:, ::37, ::37].transpose(0, 3, 1, 2), GOLDEN[f"full/crops/{i}"])


def test_checkpoint_keys_match_pyiqa():
    assert_keys_match(maniqa_convert.checkpoint_shapes, (("tiny", maniqa.TINY), ("full", maniqa.PIPAL)), GOLDEN)


def scores_and_activations(params, config, crops):
    names = ("blocks_6", "tablock1_0", "swintransformer1", "swintransformer2")
    scores, state = maniqa.MANIQA(config).apply({"params": params}, crops, mutable=["intermediates"],
                                                capture_intermediates=lambda module, _: module.name in names)
    acts = state["intermediates"]
    grid = config.grid

    def swin_nchw(x):  # tokens (B', N, C) -> pyiqa's (B', C, H, W) slice [:3, :5, 0, :8]
        return x.reshape(x.shape[0], grid, grid, -1)[:3, 0, :8, :5].transpose(0, 2, 1)

    return scores, {
        "block6": acts["vit"]["blocks_6"]["__call__"][0][:3, :5, :8],
        "tab": acts["tablock1_0"]["__call__"][0][:3, :5, :8],
        "swin1": swin_nchw(acts["swintransformer1"]["__call__"][0]),
        "swin2": swin_nchw(acts["swintransformer2"]["__call__"][0]),
    }


def check_activations(preset, config, image_index):
    params = maniqa_convert.convert_state_dict(random_state_dict(maniqa_convert.checkpoint_shapes(config)), config)
    crops = crops_of(IMAGES[image_index], config.num_crops)
    scores, acts = jax.jit(scores_and_activations, static_argnums=1)(params, config, crops)
    assert_close(scores[0], GOLDEN[f"{preset}/scores"][image_index], SCORE_REL)
    for name, value in acts.items():
        assert_close(value, GOLDEN[f"{preset}/{name}/{image_index}"], rel=1e-5)


def test_tiny_scores_match_pyiqa(tmp_path):
    """Converted, saved and loaded like a real checkpoint (the portrait image is scored below)."""
    params = maniqa_convert.convert_state_dict(random_state_dict(maniqa_convert.checkpoint_shapes(maniqa.TINY)),
                                               maniqa.TINY)
    score = saved_scorer(tmp_path, "maniqa", maniqa.TINY, params, load_maniqa)
    expected = GOLDEN["tiny/scores"][[0, 0]]
    assert_close(score([IMAGES[0], IMAGES[0].astype(np.float32) / 255]), expected, SCORE_REL)


def test_tiny_activations_match_pyiqa():
    check_activations("tiny", maniqa.TINY, 1)


@pytest.mark.slow
def test_full_size_matches_pyiqa():
    """The published architecture (ViT-B/8, 20 crops) on both images."""
    check_activations("full", maniqa.PIPAL, 0)
    check_activations("full", maniqa.PIPAL, 1)


def test_converter_fails_loudly_on_bad_keys():
    tensors = random_state_dict(maniqa_convert.checkpoint_shapes(maniqa.TINY))
    tensors["tablock1.0.c_q.weights"] = tensors.pop("tablock1.0.c_q.weight")  # renamed
    del tensors["swintransformer2.downsample.bias"]  # missing, though unused: pyiqa loads strictly
    tensors["vit.pos_embed"] = tensors["vit.pos_embed"][:, 1:]  # mis-shaped
    assert_conversion_fails(maniqa_convert.convert_state_dict, tensors, maniqa.TINY, "MANIQA_PIPAL.pth",
                            ("2 missing", "tablock1.0.c_q.weight\n", "swintransformer2.downsample.bias",
                             "1 unexpected", "tablock1.0.c_q.weights", "1 mis-shaped",
                             "vit.pos_embed: expected (1, 785, 32), found (1, 784, 32)"))


def test_convert_reads_the_pth_file(tmp_path):
    tensors = random_state_dict(maniqa_convert.checkpoint_shapes(maniqa.TINY))
    save_pth(tensors, tmp_path / "maniqa.pth")
    assert_converts_file(maniqa_convert, "maniqa", maniqa.TINY, maniqa.config_from_dict, tmp_path / "maniqa.pth",
                         tensors, tmp_path / "converted")

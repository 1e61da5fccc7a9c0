"""MUSIQ against pyiqa: preprocessing facts, scores and activations (goldens written by
tools/make_iqa_goldens.py from pyiqa's own `musiq` metric with the same random weights), strict converter.

Tolerances: max abs error <= 1e-5 * max |reference| (CONTRIBUTING); scores 5e-5 relative (SCORE_REL).
"""

import jax
import numpy as np
import pytest

from smfsr_jax.convert import musiq as musiq_convert
from smfsr_jax.convert.converted_dir import save_converted
from smfsr_jax.convert.tensors import CheckpointError
from smfsr_jax.evaluation.scoring import load_musiq
from smfsr_jax.models import musiq
from tests.conftest import REPO
from tests.iqa_checks import (SCORE_REL, assert_close, assert_conversion_fails, assert_converts_file, assert_keys_match,
                              save_pth, saved_scorer, unit)
from tools.make_iqa_goldens import golden_images, random_state_dict, resize_input

GOLDEN = np.load(REPO / "tests" / "golden" / "iqa_musiq.npz")
IMAGES = golden_images()  # 224 x 224 and 256 x 192 (H x W) uint8


def test_hashed_positions_match_torch_nearest():
    for count in range(1, 65):
        np.testing.assert_array_equal(musiq.nearest_indices(10, count), GOLDEN[f"hash/{count}"], err_msg=f"{count}")


def test_bicubic_resize_matches_torch():
    x = resize_input().transpose(0, 2, 3, 1)
    for h, w in ((13, 10), (57, 43), (40, 30)):
        assert_close(musiq.resize_bicubic(x, h, w)[0, :16, :16], GOLDEN[f"resize/{h}x{w}"])


def test_multiscale_tokens_match_pyiqa():
    tokens_of = jax.jit(lambda images: musiq.multiscale_tokens((images - 0.5) * 2, musiq.KONIQ))
    for i, image in enumerate(IMAGES):
        patches, spatial, scales, mask = tokens_of(unit(image))
        np.testing.assert_array_equal(spatial, GOLDEN[f"tokens/{i}/spatial"])
        np.testing.assert_array_equal(scales, GOLDEN[f"tokens/{i}/scale"])
        np.testing.assert_array_equal(mask, GOLDEN[f"tokens/{i}/mask"])
        assert_close(np.asarray(patches, np.float64).sum(axis=(2, 3, 4))[0], GOLDEN[f"tokens/{i}/patch_sums"])


def scores_and_activations(params, config, images):
    """Scores plus the embedding and encoder outputs, in one call."""
    patches, spatial, scales, mask = musiq.multiscale_tokens((images - 0.5) * 2, config)
    scores, state = musiq.MUSIQ(config).apply(
        {"params": params}, patches, spatial, scales, mask, mutable=["intermediates"],
        capture_intermediates=lambda module, _: module.name in ("embedding", "transformer_encoder"))
    return scores, state["intermediates"]


def check_activations(preset, config, image_index):
    """Score, CLS output and embedded tokens of one image, from one jitted call."""
    params = musiq_convert.convert_state_dict(random_state_dict(musiq_convert.checkpoint_shapes(config)), config)
    forward = jax.jit(scores_and_activations, static_argnums=1)
    scores, acts = forward(params, config, unit(IMAGES[image_index]))
    assert_close(scores[0], GOLDEN[f"{preset}/scores"][image_index], SCORE_REL)
    assert_close(acts["transformer_encoder"]["__call__"][0][0, 0], GOLDEN[f"{preset}/cls"][image_index])
    assert_close(acts["embedding"]["__call__"][0][0, :4, :64], GOLDEN[f"{preset}/embedding/{image_index}"])


def test_checkpoint_keys_match_pyiqa():
    assert_keys_match(musiq_convert.checkpoint_shapes, (("tiny", musiq.TINY), ("full", musiq.KONIQ)), GOLDEN)


def test_tiny_scores_match_pyiqa(tmp_path):
    """Converted, saved and loaded like a real checkpoint; images of two sizes (one jit per size)."""
    params = musiq_convert.convert_state_dict(random_state_dict(musiq_convert.checkpoint_shapes(musiq.TINY)),
                                              musiq.TINY)
    score = saved_scorer(tmp_path, "musiq", musiq.TINY, params, load_musiq)
    expected = GOLDEN["tiny/scores"]
    assert_close(score(IMAGES), expected, SCORE_REL)
    assert_close(score(np.stack([IMAGES[0], IMAGES[0]]).astype(np.float32) / 255), expected[[0, 0]], SCORE_REL)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score([IMAGES[0].astype(np.float32)])
    with pytest.raises(ValueError, match="H x W x 3"):
        score([IMAGES[0][..., 0]])


def test_load_names_a_wrong_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a converted musiq directory"):
        load_musiq(tmp_path)
    save_converted(tmp_path, {}, {"w": np.zeros(1, np.float32)}, meta={"converter": "maniqa"})
    with pytest.raises(CheckpointError, match="holds 'maniqa' weights, not 'musiq'"):
        load_musiq(tmp_path)


def test_full_size_matches_pyiqa():
    """The published architecture (27M parameters, 14 layers) on the portrait image; the reduced one is
    checked through `load` above."""
    check_activations("full", musiq.KONIQ, 1)


def test_converter_fails_loudly_on_bad_keys():
    tensors = random_state_dict(musiq_convert.checkpoint_shapes(musiq.TINY))
    tensors["head.weights"] = tensors.pop("head.weight")  # renamed
    del tensors["transformer_encoder.cls"]  # missing
    tensors["embedding.bias"] = tensors["embedding.bias"][:-1]  # mis-shaped
    assert_conversion_fails(musiq_convert.convert_state_dict, tensors, musiq.TINY, "musiq_koniq_ckpt.pth",
                            ("2 missing", "head.weight\n", "transformer_encoder.cls", "1 unexpected", "head.weights",
                             "1 mis-shaped", "embedding.bias: expected (32,), found (31,)"))


def test_convert_reads_the_pth_file(tmp_path):
    tensors = random_state_dict(musiq_convert.checkpoint_shapes(musiq.TINY))
    save_pth(tensors, tmp_path / "musiq.pth")
    assert_converts_file(musiq_convert, "musiq", musiq.TINY, musiq.config_from_dict, tmp_path / "musiq.pth", tensors,
                         tmp_path / "converted")

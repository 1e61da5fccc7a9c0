"""CLIPIQA against pyiqa: prompt tokens, text features, scores and activations (goldens written by
tools/make_iqa_goldens.py from pyiqa's own `clipiqa` metric, which loaded the same random weights from a
TorchScript archive like OpenAI's RN50.pt), strict converter.

Tolerances: max abs error <= 1e-5 * max |reference| (CONTRIBUTING); scores 5e-5 relative (SCORE_REL).
"""

import jax
import numpy as np

from smfsr_jax.convert import clipiqa as clipiqa_convert
from smfsr_jax.evaluation.scoring import load_clipiqa
from smfsr_jax.models import clipiqa
from tests.conftest import REPO, import_torch
from tests.iqa_checks import (SCORE_REL, assert_close, assert_conversion_fails, assert_converts_file, assert_keys_match,
                              saved_scorer, unit)
from tools.make_iqa_goldens import CLIP_RN50, CLIP_TINY, clip_archive_tensors, golden_images, save_torchscript_archive

GOLDEN = np.load(REPO / "tests" / "golden" / "iqa_clipiqa.npz")
IMAGES = golden_images()  # 224 x 224 and 256 x 192 (H x W) uint8, scored at native resolution
PRESETS = {"tiny": (clipiqa.TINY, CLIP_TINY), "full": (clipiqa.RN50, CLIP_RN50)}


def archive_tensors(preset):
    config, clip_config = PRESETS[preset]
    return clip_archive_tensors(clipiqa_convert.checkpoint_shapes(config), clip_config)


def test_prompt_tokens_match_clip_tokenizer():
    np.testing.assert_array_equal(clipiqa.prompt_tokens(77), GOLDEN["prompt_tokens"])


def test_checkpoint_keys_match_clip():
    assert_keys_match(clipiqa_convert.checkpoint_shapes, ((preset, config) for preset, (config, _) in PRESETS.items()),
                      GOLDEN)


def scores_and_activations(params, config, images):
    """Scores, image features and the output of the first bottleneck stage (its last block)."""
    x = (images - np.float32(clipiqa.CLIP_MEAN)) / np.float32(clipiqa.CLIP_STD)
    layer1 = f"layer1_{config.vision_layers[0] - 1}"
    scores, state = clipiqa.CLIPIQA(config).apply({"params": params}, x, mutable=["intermediates"],
                                                  capture_intermediates=lambda m, _: m.name in ("visual", layer1))
    acts = state["intermediates"]["visual"]
    return scores, acts["__call__"][0], acts[layer1]["__call__"][0]


def check_preset(preset, image_indices):
    config = PRESETS[preset][0]
    params = clipiqa_convert.convert_state_dict(archive_tensors(preset), config)
    assert_close(params["text_features"][:, :32], GOLDEN[f"{preset}/text_features"])
    forward = jax.jit(scores_and_activations, static_argnums=1)
    for i in image_indices:
        scores, features, layer1 = forward(params, config, unit(IMAGES[i]))
        assert_close(scores[0], GOLDEN[f"{preset}/scores"][i], SCORE_REL)
        assert_close(features[:, :32], GOLDEN[f"{preset}/image_features/{i}"])
        assert_close(layer1[0, :4, :4, :8].transpose(2, 0, 1), GOLDEN[f"{preset}/layer1/{i}"])


def test_tiny_scores_match_pyiqa(tmp_path):
    """Converted, saved and loaded like a real checkpoint (the portrait image is scored below)."""
    params = clipiqa_convert.convert_state_dict(archive_tensors("tiny"), clipiqa.TINY)
    score = saved_scorer(tmp_path, "clipiqa", clipiqa.TINY, params, load_clipiqa)
    expected = GOLDEN["tiny/scores"][[0, 0]]
    assert_close(score([IMAGES[0], IMAGES[0].astype(np.float32) / 255]), expected, SCORE_REL)


def test_tiny_activations_match_pyiqa():
    check_preset("tiny", (1,))


def test_full_size_matches_pyiqa():
    """The published architecture (RN50 image tower, 12-layer text tower; 102M random weights) on the portrait
    image."""
    check_preset("full", (1,))


def test_converter_fails_loudly_on_bad_keys():
    tensors = archive_tensors("tiny")
    tensors["visual.attnpool.c_proj.weights"] = tensors.pop("visual.attnpool.c_proj.weight")  # renamed
    del tensors["visual.layer2.0.downsample.1.running_var"]  # missing
    tensors["text_projection"] = tensors["text_projection"].T  # mis-shaped
    assert_conversion_fails(clipiqa_convert.convert_state_dict, tensors, clipiqa.TINY, "RN50.pt",
                            ("2 missing", "visual.attnpool.c_proj.weight\n", "visual.layer2.0.downsample.1.running_var",
                             "1 unexpected", "visual.attnpool.c_proj.weights", "1 mis-shaped",
                             "text_projection: expected (64, 32), found (32, 64)"))


def test_convert_reads_the_torchscript_archive(tmp_path):
    import_torch()
    tensors = archive_tensors("tiny")
    save_torchscript_archive(tensors, str(tmp_path / "RN50.pt"))
    assert_converts_file(clipiqa_convert, "clipiqa", clipiqa.TINY, clipiqa.config_from_dict, tmp_path / "RN50.pt",
                         tensors, tmp_path / "converted")

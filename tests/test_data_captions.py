"""Cached caption embeddings: stored rows equal the encoders' output, NULL row, pipeline delivery."""

import pickle

import grain
import numpy as np

from smfsr_jax.data import build, captions, degradation, pipeline
from smfsr_jax.models import text
from tests.text_fixtures import tiny_text_encoders


def test_caption_embeddings_are_stored_once_and_delivered(tmp_path):
    encoders = tiny_text_encoders(tmp_path / "sd35")
    data_dir = str(tmp_path / "tfds")
    build.build("bundled", data_dir)
    stored = captions.encode_dataset("bundled", "train", data_dir, encoders, t5_max_length=8, batch_size=4)
    source = pipeline.open_source("bundled", "train", data_dir)
    assert stored.directory == captions.embeddings_dir("bundled", "train", data_dir, 8)
    assert len(stored) == len(source) == 7 and stored.info["captions"] == 6  # the motorcycle pair shares one

    record_caption = source[0]["caption"].decode()
    expected_embeds, expected_pooled = text.encode_prompts(encoders, [record_caption], 8)
    embeds, pooled = stored.record(0)
    assert embeds.shape == (77 + 8, encoders.joint_dim) and pooled.shape == (encoders.pooled_dim,)
    np.testing.assert_allclose(embeds, np.asarray(expected_embeds[0]), rtol=2e-3, atol=2e-3)  # float16 rows
    np.testing.assert_allclose(pooled, np.asarray(expected_pooled[0]), rtol=2e-3, atol=2e-3)
    null_embeds, null_pooled = text.null_prompt_embeddings(encoders, 8)
    np.testing.assert_allclose(stored.null[0], np.asarray(null_embeds), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored.null[1], np.asarray(null_pooled), rtol=2e-3, atol=2e-3)

    reopened = pickle.loads(pickle.dumps(captions.CaptionEmbeddings.for_dataset("bundled", "train", data_dir, 8)))
    config = degradation.default_config()
    config.crop_size = 32
    for dropout in (0.0, 1.0):
        batch = next(iter(pipeline.train_pipeline(
            source, batch_size=2, seed=0, degradation_config=config, text_dropout=dropout, embeddings=reopened,
            shard_options=grain.sharding.NoSharding())))
        for row, index in enumerate(batch["index"]):
            expected = stored.null if dropout else stored.record(index)
            np.testing.assert_array_equal(batch["prompt_embeds"][row], expected[0])
            np.testing.assert_array_equal(batch["pooled_prompt_embeds"][row], expected[1])

"""grain pipelines: batch contract, determinism, resume, worker processes, sharding, eval padding."""

import grain
import numpy as np
import pytest

from smfsr_jax.data import build, degradation, images, pipeline
from tests.test_data_builders import _png, _rgb

NO_SHARDING = grain.sharding.NoSharding()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    build.build("bundled", str(directory))
    return str(directory)


def _config(crop_size=32):
    config = degradation.default_config()
    config.crop_size = crop_size
    return config


def _train(source, seed=0, crop_size=32, batch_size=3, **kwargs):
    kwargs.setdefault("shard_options", NO_SHARDING)
    return pipeline.train_pipeline(source, batch_size=batch_size, seed=seed, degradation_config=_config(crop_size),
                                   **kwargs)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_stream(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batch_contract(data_dir):
    source = pipeline.open_source("bundled", "train", data_dir)
    batch = next(iter(_train(source, crop_size=64, batch_size=4)))
    assert batch["hr"].shape == (4, 64, 64, 3) and batch["lr"].shape == (4, 16, 16, 3)
    assert batch["lr_up"].shape == (4, 64, 64, 3)
    assert all(batch[key].dtype == np.uint8 for key in ("hr", "lr", "lr_up"))
    upsampled = [degradation.upsample_lr(lr.astype(np.float32) / 255) for lr in batch["lr"]]
    np.testing.assert_array_equal(batch["lr_up"], degradation.to_uint8(np.stack(upsampled)))
    image = _rgb(40, 44, seed=9)
    hr = next(iter(_train([{"hr": _png(image), "file_name": "x.png"}], batch_size=1)))["hr"][0]
    crops = [image[i:i + 32, j:j + 32] for i in range(9) for j in range(13)]
    assert any(np.array_equal(hr, c) or np.array_equal(hr, c[:, ::-1]) for c in crops)  # the GT crop, exact
    assert batch["text_dropped"].dtype == np.bool_ and batch["index"].dtype == np.int64
    assert set(batch["index"]) <= set(range(len(source))) and np.all(batch["epoch"] == 0)


def test_same_seed_same_stream_and_resume_from_state(data_dir):
    source = pipeline.open_source("bundled", "train", data_dir)
    uninterrupted = _take(iter(_train(source)), 6)
    _assert_same_stream(uninterrupted, _take(iter(_train(source)), 6))
    assert not np.array_equal(uninterrupted[0]["lr"], next(iter(_train(source, seed=1)))["lr"])
    # Epochs reshuffle: 7 records, batches of 3 -> epoch 1 starts inside batch 3.
    assert uninterrupted[5]["epoch"].max() == 2
    iterator = iter(_train(source))
    _take(iterator, 2)
    state = iterator.get_state()
    resumed = iter(_train(source))
    resumed.set_state(state)
    _assert_same_stream(uninterrupted[2:], _take(resumed, 4))


def test_worker_processes_give_the_same_stream_and_state(data_dir):
    source = pipeline.open_source("bundled", "train", data_dir)
    reference = _take(iter(_train(source)), 5)
    iterator = iter(_train(source, worker_count=2))
    try:
        _assert_same_stream(reference[:3], _take(iterator, 3))
        state = iterator.get_state()
    finally:
        iterator.close()
    resumed = iter(_train(source))
    resumed.set_state(state)
    _assert_same_stream(reference[3:], _take(resumed, 2))


def test_two_process_shards_are_disjoint_and_cover(data_dir):
    """Each process takes its rows of every global batch: together they are the one-process batches."""
    source = pipeline.open_source("bundled", "train", data_dir)
    whole = list(_train(source, batch_size=2, num_epochs=2))
    shards = [list(_train(source, batch_size=1, num_epochs=2,
                          shard_options=grain.sharding.ShardOptions(shard_index=i, shard_count=2)))
              for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole) == 7  # 14 examples, 7 global batches of 2
    for batch, first, second in zip(whole, *shards):
        for key in ("index", "epoch", "hr", "lr"):
            np.testing.assert_array_equal(batch[key], np.concatenate([first[key], second[key]]))
    epoch0 = [(int(b["index"][0]), int(b["epoch"][0])) for shard in shards for b in shard if b["epoch"][0] == 0]
    assert len(epoch0) == len({i for i, _ in epoch0}) >= len(source) - 1  # disjoint; all but a remainder


def test_text_dropout_swaps_in_null_embeddings():
    class Embeddings:
        null = (np.zeros((5, 8), np.float32), np.zeros((4,), np.float32))

        def __len__(self):
            return 4

        def record(self, index):
            return np.full((5, 8), index + 1, np.float32), np.full((4,), index + 1, np.float32)

    source = [{"hr": _png(_rgb(40, 40, seed=i)), "file_name": f"{i}.png"} for i in range(4)]
    for dropout in (0.0, 1.0):
        batch = next(iter(_train(source, batch_size=4, text_dropout=dropout, embeddings=Embeddings())))
        assert batch["prompt_embeds"].shape == (4, 5, 8) and batch["pooled_prompt_embeds"].shape == (4, 4)
        expected = (batch["index"] + 1) * (dropout == 0.0)
        np.testing.assert_array_equal(batch["prompt_embeds"][:, 0, 0], expected)
        assert np.all(batch["text_dropped"] == (dropout == 1.0))
    flags = np.concatenate([b["text_dropped"] for b in _take(iter(_train(source, batch_size=4)), 25)])
    assert 0.1 < flags.mean() < 0.3  # p = 0.2 over 100 draws


def test_bad_records_are_skipped_and_small_images_padded():
    source = [{"hr": _png(_rgb(40, 40, seed=0)), "file_name": "good.png"},
              {"hr": b"truncated", "file_name": "broken.png"},
              {"hr": _png(_rgb(20, 24, seed=1)), "file_name": "small.png"}]
    pipeline.bad_records.clear()
    pipeline.padded_records.clear()
    batches = list(_train(source, batch_size=1, num_epochs=1))
    assert len(batches) == 3 and all(b["hr"].shape == (1, 32, 32, 3) for b in batches)
    assert sorted(int(b["index"][0]) for b in batches) == [0, 2, 2]  # broken.png -> the next record
    assert pipeline.bad_records == {"broken.png": 1} and pipeline.padded_records["small.png"] == 2


def test_eval_pads_the_last_batch_and_shards_evenly(data_dir, tmp_path):
    holdout = pipeline.open_source("bundled", "holdout", data_dir)
    config = _config(64)
    batches = list(pipeline.eval_pipeline(holdout, batch_size=3, degradation_config=config, shard_options=NO_SHARDING))
    assert len(batches) == 1
    batch = batches[0]
    assert list(batch["mask"]) == [True, True, False] and list(batch["index"]) == [0, 1, -1]
    assert list(batch["file_name"]) == ["chelsea.png", "coffee.png", ""]
    assert batch["hr"].shape == (3, 64, 64, 3) and batch["lr"].shape == (3, 16, 16, 3)
    again = next(iter(pipeline.eval_pipeline(holdout, batch_size=3, degradation_config=config,
                                             shard_options=NO_SHARDING)))
    np.testing.assert_array_equal(batch["lr"], again["lr"])  # the synthetic LR is fixed

    source = [{"lr": _png(_rgb(16, 16, seed=i)), "hr": _png(_rgb(64, 64, seed=i)), "file_name": f"{i}.png"}
              for i in range(5)]
    shards = [list(pipeline.eval_pipeline(source, batch_size=2,
                                          shard_options=grain.sharding.ShardOptions(shard_index=i, shard_count=2)))
              for i in range(2)]
    assert [len(s) for s in shards] == [2, 2]  # same number of steps on every process
    indices = [set(np.concatenate([b["index"][b["mask"]] for b in s])) for s in shards]
    assert not indices[0] & indices[1] and indices[0] | indices[1] == set(range(5))
    assert images.decode_rgb8(source[0]["lr"]).shape == shards[0][0]["lr"].shape[1:]

    source[1]["lr"] = b"corrupt"
    batch = next(iter(pipeline.eval_pipeline(source, batch_size=5, shard_options=NO_SHARDING)))
    assert list(batch["mask"]) == [True, False, True, True, True] and batch["index"][1] == -1

"""Datasets and caption caches in a bucket (the local GCS emulator): built locally and uploaded, read in place."""

import pickle
import re
import uuid

import grain
import numpy as np
import pytest

from smfsr_jax.core import errors, files
from smfsr_jax.data import build, captions, degradation, pipeline
from tests.conftest import BUCKET
from tests.test_data_builders import _png, _rgb
from tests.text_fixtures import tiny_text_encoders


@pytest.fixture(scope="module")
def bucket_data_dir(gcs):
    """`bundled` built into a bucket once for this module."""
    data_dir = f"gs://{BUCKET}/tfds-{uuid.uuid4().hex[:8]}"
    build.build("bundled", data_dir)
    return data_dir


def _records(source):
    return [source[i] for i in range(len(source))]


def test_a_build_into_a_bucket_is_uploaded_and_read_in_place(bucket_data_dir, data_dir, gcs):
    built = [[name for name in files.listdir(files.join(directory, "bundled", "1.0.0")) if name != "caption_embeddings"]
             for directory in (bucket_data_dir, data_dir)]
    assert built[0] == built[1] and "dataset_info.json" in built[0]
    for split in ("train", "holdout"):
        remote = _records(pipeline.open_source("bundled", split, bucket_data_dir))
        local = _records(pipeline.open_source("bundled", split, data_dir))
        assert [r["file_name"] for r in remote] == [r["file_name"] for r in local]
        assert [r["hr"] for r in remote] == [r["hr"] for r in local]
    for ours, theirs in zip(pipeline.eval_pairs("bundled", "holdout", bucket_data_dir, 64),
                            pipeline.eval_pairs("bundled", "holdout", data_dir, 64)):
        np.testing.assert_array_equal(ours, theirs)
    uploads = gcs.counts().get("upload", 0)
    again = build.build("bundled", bucket_data_dir)  # prepared already: reused, nothing uploaded
    assert gcs.counts().get("upload", 0) == uploads
    assert build.summary(again)["splits"]["train"] == {"records": 7, "skipped": 0, "converted": 0}
    assert build.summary(again)["data_dir"] == f"{bucket_data_dir}/bundled/1.0.0"


def test_check_prepared_names_a_missing_or_unbuilt_bucket(bucket_dir, bucket_data_dir):
    command = f"python -m smfsr_jax.data.build --dataset bundled --data_dir {bucket_dir}"
    with pytest.raises(pipeline.DataNotPrepared, match=re.escape(f"data_dir {bucket_dir} does not exist; build it "
                                                                 f"with: {command}")):
        pipeline.check_prepared("bundled", "train", bucket_dir)
    # An upload cut short (no dataset_info.json yet) is not a prepared dataset.
    files.write_bytes(f"{bucket_dir}/bundled/1.0.0/bundled-train.array_record-00000-of-00001", b"partial")
    with pytest.raises(pipeline.DataNotPrepared,
                       match=re.escape(f"data_dir {bucket_dir} holds no prepared bundled dataset; build it with: ")):
        pipeline.check_prepared("bundled", "train", bucket_dir)
    with pytest.raises(pipeline.DataNotPrepared, match=r"no split 'validation' \(it has train, holdout\)"):
        pipeline.check_prepared("bundled", "validation", bucket_data_dir)


def test_a_manual_dir_in_a_bucket_is_staged(bucket_dir, tmp_path):
    for name, seed in (("0001/a.png", 1), ("0002/b.png", 2)):
        files.write_bytes(f"{bucket_dir}/lsdir/{name}", _png(_rgb(seed=seed)))
    files.write_text(f"{bucket_dir}/lsdir/0001/a.txt", "a caption in the bucket")
    build.build("lsdir", str(tmp_path), f"{bucket_dir}/lsdir")
    records = _records(pipeline.open_source("lsdir", "train", str(tmp_path)))
    assert [r["file_name"] for r in records] == [b"0001/a.png", b"0002/b.png"]
    assert records[0]["caption"] == b"a caption in the bucket" and records[1]["hr"] == _png(_rgb(seed=2))
    with pytest.raises(errors.UserError, match=re.escape(f"manual_dir {bucket_dir}/none is not a folder")):
        build.build("lsdir", str(tmp_path / "other"), f"{bucket_dir}/none")


def test_caption_cache_in_a_bucket_reads_rows_by_range_and_trains_like_a_local_one(bucket_data_dir, data_dir,
                                                                                   tmp_path, gcs):
    encoders = tiny_text_encoders(tmp_path / "sd35")
    remote = captions.encode_dataset("bundled", "train", bucket_data_dir, encoders, t5_max_length=8, batch_size=8)
    assert remote.directory == f"{bucket_data_dir}/bundled/1.0.0/caption_embeddings/t5_8/train"
    assert files.listdir(remote.directory) == sorted(captions._NAMES)
    source = pipeline.open_source("bundled", "train", data_dir)
    texts = [pipeline.record_text(source[i]["caption"]) for i in range(len(source))]
    local = captions.encode_captions(texts, encoders, tmp_path / "cache", t5_max_length=8, batch_size=8,
                                     info=remote.info)  # same info: the same dataset, split, options
    remote = pickle.loads(pickle.dumps(captions.CaptionEmbeddings.for_dataset("bundled", "train", bucket_data_dir, 8)))
    assert remote.info == local.info and np.array_equal(remote.caption_index, local.caption_index)
    rows = remote.info["captions"] + 1
    downloads = gcs.counts()["download"]
    for row in range(rows):
        for ours, theirs in zip(remote.row(row), local.row(row)):
            np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(remote.pooled_rows(4), local.pooled_rows(4))
    # Opening reads each array's header (2 requests each); then one ranged read per row, one for pooled_rows.
    assert gcs.counts()["download"] - downloads == 2 * 2 + 2 * rows + 1

    config = degradation.default_config()
    config.crop_size = 32
    batches = []
    for directory, embeddings in ((bucket_data_dir, remote), (data_dir, local)):
        # read_threads=0: no read-ahead thread left reading the bucket after the test.
        batches.append(next(iter(pipeline.train_pipeline(
            pipeline.open_source("bundled", "train", directory), batch_size=3, seed=0, degradation_config=config,
            embeddings=embeddings, shard_options=grain.sharding.NoSharding(), read_threads=0))))
    assert batches[0].keys() == batches[1].keys() and "prompt_embeds" in batches[0]
    for key in batches[0]:
        np.testing.assert_array_equal(batches[0][key], batches[1][key], err_msg=key)

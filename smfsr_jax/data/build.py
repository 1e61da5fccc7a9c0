"""Prepare one of the project's TFDS datasets as ArrayRecord files.

    python -m smfsr_jax.data.build --dataset paired_sr/drealsr --manual_dir path/to/drealsr --data_dir DIR
    python -m smfsr_jax.data.build --dataset bundled --data_dir DIR

`--dataset` is a builder name, with `/config` for `paired_sr` and `lq_only`. The result is read
without TensorFlow by `tfds.data_source(name, split=..., data_dir=DIR)` (after importing
`smfsr_jax.data.tfds`, or through `smfsr_jax.data.pipeline.open_source`). Skipped and converted files
are logged and listed in the dataset's metadata.json; the last line printed is a JSON summary.

DIR and the manual_dir may be bucket URLs (gs://...). TFDS's ArrayRecord writer writes local files only, so a
dataset for a bucket is built in local scratch and its version folder uploaded to
DIR/name[/config]/version/, dataset_info.json last: a half-uploaded build is never taken for a prepared one.
A manual_dir in a bucket is first copied to local scratch (the builders read local files).
"""

import argparse
import json
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # noqa: E402
from absl import logging  # noqa: E402

from smfsr_jax.core import errors, files  # noqa: E402
from smfsr_jax.data.tfds import BUILDERS  # noqa: E402


def build(dataset: str, data_dir: str, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Prepare `dataset` ("name" or "name/config") under `data_dir` (a local folder or a bucket URL); returns
    the prepared builder."""
    name, _, config = dataset.partition("/")
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    if manual_dir is not None and files.is_remote(manual_dir):
        if not files.is_dir(manual_dir):
            raise errors.UserError(f"{name}: manual_dir {manual_dir} is not a folder (no objects under it)")
        manual_dir = files.stage(manual_dir, what=f"the {name} builder")
    if not files.is_remote(data_dir):
        return _prepare(_builder(name, config, data_dir), manual_dir)
    builder = _builder(name, config, data_dir)
    if files.exists(files.join(builder.data_dir, "dataset_info.json")):
        logging.info("%s is already prepared in %s: reusing it", dataset, builder.data_dir)
        return builder
    scratch = tempfile.mkdtemp(prefix=f"{name}-", dir=files.scratch_dir("build"))
    logging.info("building %s in local scratch %s (TFDS writes ArrayRecord files locally only), then uploading it "
                 "to %s", dataset, scratch, builder.data_dir)
    try:
        local = _prepare(_builder(name, config, scratch), manual_dir)
        # dataset_info.json last: TFDS and check_prepared take a version folder that has it for a prepared one.
        files.copy_tree(local.data_dir, builder.data_dir, last=["dataset_info.json"], what=f"uploading {dataset}")
    finally:
        shutil.rmtree(scratch)
    logging.info("%s built locally and uploaded to %s", dataset, builder.data_dir)
    return _builder(name, config, data_dir)


def _builder(name: str, config: str, data_dir: str) -> tfds.core.DatasetBuilder:
    return BUILDERS[name](data_dir=data_dir, config=config or None, file_format="array_record")


def _prepare(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> tfds.core.DatasetBuilder:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def summary(builder: tfds.core.DatasetBuilder) -> dict:
    intake = builder.info.metadata.get("intake", {})
    return {"dataset": builder.info.full_name, "data_dir": str(builder.data_dir),
            "splits": {split: {"records": info.num_examples,
                               "skipped": len(intake.get(split, {}).get("skipped", {})),
                               "converted": len(intake.get(split, {}).get("converted", {}))}
                       for split, info in builder.info.splits.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="builder name, with /config where it has configs")
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into (folder or gs://...)")
    parser.add_argument("--manual_dir", default=None,
                        help="source files (layout in the builder's docstring; folder or gs://...)")
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO)
    print(json.dumps(summary(build(args.dataset, args.data_dir, args.manual_dir))))


if __name__ == "__main__":
    main()

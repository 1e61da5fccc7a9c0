"""Prepare one of the project's TFDS datasets as ArrayRecord files.

    python -m smfsr_jax.data.build --dataset paired_sr/drealsr --manual_dir path/to/drealsr --data_dir DIR
    python -m smfsr_jax.data.build --dataset bundled --data_dir DIR

`--dataset` is a builder name, with `/config` for `paired_sr` and `lq_only`. The result is read
without TensorFlow by `tfds.data_source(name, split=..., data_dir=DIR)` (after importing
`smfsr_jax.data.tfds`, or through `smfsr_jax.data.pipeline.open_source`). Skipped and converted files
are logged and listed in the dataset's metadata.json; the last line printed is a JSON summary.
"""

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # noqa: E402
from absl import logging  # noqa: E402

from smfsr_jax.data.tfds import BUILDERS  # noqa: E402


def build(dataset: str, data_dir: str, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Prepare `dataset` ("name" or "name/config") under `data_dir`; returns the prepared builder."""
    name, _, config = dataset.partition("/")
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    builder = BUILDERS[name](data_dir=data_dir, config=config or None, file_format="array_record")
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=download_config)
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
    parser.add_argument("--data_dir", required=True, help="TFDS data directory to write into")
    parser.add_argument("--manual_dir", default=None, help="source files (layout in the builder's docstring)")
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO)
    print(json.dumps(summary(build(args.dataset, args.data_dir, args.manual_dir))))


if __name__ == "__main__":
    main()

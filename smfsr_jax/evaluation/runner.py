"""Super-resolve the LR images of a TFDS benchmark set with an SRPipeline, one seed at a time.

The sets are the project's `paired_sr/*` (LR + HR) and `lq_only/*` (LR only) builders, split `test`,
read in record order (the builders write file-name order; evaluation.md §0, §1). Image k (its record
index) is sampled with fold_in(PRNGKey(seed), k), so an image's output does not depend on --max_images,
on batching or on the other images. SR images are written as 8-bit PNGs named like the LR file
(`<stem>.png`); a second LR file with the same stem is skipped and named, as `python -m smfsr_jax.sr` does.

The model is a bundle directory or a training workdir (its latest finished checkpoint, or `step`).
"""

import dataclasses
import os
from typing import Iterable, Iterator, Optional

import numpy as np
from PIL import Image

from smfsr_jax.data import images as image_io
from smfsr_jax.data.pipeline import open_source, record_text
from smfsr_jax.sampling import bundle as bundle_lib
from smfsr_jax.sampling.pipeline import SRPipeline
from smfsr_jax.training import inference, stages

SPLIT = "test"
BENCHMARK_BUILDERS = ("paired_sr", "lq_only")  # the sets with LR images


@dataclasses.dataclass
class BenchmarkImage:
    index: int  # record index: the noise index k
    name: str  # the SR file name, <LR stem>.png
    lr: np.ndarray  # (h, w, 3) uint8
    hr: Optional[np.ndarray]  # (4h, 4w, 3) uint8, None for LR-only sets
    caption: Optional[str]  # None: the NULL prompt


class BenchmarkSet:
    """The first `max_images` records of one TFDS benchmark set; `images()` decodes them lazily."""

    def __init__(self, dataset: str, data_dir: str, max_images: Optional[int] = None):
        from smfsr_jax.data.tfds import BUILDERS  # imports TensorFlow Datasets: not for directory mode

        name, _, config = dataset.partition("/")
        if name not in BENCHMARK_BUILDERS or not config:
            raise ValueError(f"{dataset!r} is not a benchmark set; expected "
                             f"{' or '.join(f'{b}/<config>' for b in BENCHMARK_BUILDERS)}")
        try:
            builder = BUILDERS[name](data_dir=data_dir, config=config)
        except ValueError as e:  # an unknown config
            raise ValueError(f"{dataset}: {e}") from None
        # Checked first, to answer an unbuilt set with the command that builds it.
        if not builder.is_prepared():
            raise FileNotFoundError(f"{dataset} is not built in {data_dir}: python -m smfsr_jax.data.build "
                                    f"--dataset {dataset} --manual_dir SOURCE_FILES --data_dir {data_dir}")
        self.source = open_source(dataset, SPLIT, data_dir)
        self.dataset = dataset
        self.has_reference = "hr" in builder.info.features
        self.count = len(self.source) if max_images is None else min(max_images, len(self.source))

    def images(self, skipped: dict, use_captions: bool = True) -> Iterator[BenchmarkImage]:
        """Decoded records; unreadable ones and repeated output names go to `skipped` {name: reason}."""
        first_with_name = {}
        for index in range(self.count):
            name = f"record {index}"
            try:
                record = self.source[index]
                name = record_text(record["file_name"])
                output_name = os.path.splitext(os.path.basename(name))[0] + ".png"
                if output_name in first_with_name:
                    raise ValueError(f"same output name {output_name} as {first_with_name[output_name]}")
                first_with_name[output_name] = name
                lr = image_io.decode_rgb8(record["lr"], name)
                hr = image_io.decode_rgb8(record["hr"], name) if self.has_reference else None
            except (KeyError, ValueError, OSError) as e:  # image_io.BadImage is a ValueError
                skipped[name] = str(e)
                continue
            caption = record_text(record["caption"]).strip() if use_captions else ""
            yield BenchmarkImage(index, output_name, lr, hr, caption or None)


def super_resolve(pipeline: SRPipeline, images: Iterable[BenchmarkImage], seed: int, sr_dir: str, *,
                  batch_size: int, steps: Optional[int] = None,
                  color_fix: str = "adain") -> Iterator[tuple[list[BenchmarkImage], list[np.ndarray]]]:
    """(images, SR images) in chunks of `batch_size`, each SR image written to sr_dir/<name> first."""
    os.makedirs(sr_dir, exist_ok=True)

    def run(chunk):
        outputs = pipeline([image.lr for image in chunk], seed=seed, steps=steps,
                           caption=[image.caption for image in chunk], color_fix=color_fix,
                           indices=[image.index for image in chunk])
        for image, sr in zip(chunk, outputs):
            Image.fromarray(sr).save(os.path.join(sr_dir, image.name))
        return chunk, outputs

    chunk = []
    for image in images:
        chunk.append(image)
        if len(chunk) == batch_size:
            yield run(chunk)
            chunk = []
    if chunk:
        yield run(chunk)


def load_model(path: str, step: Optional[int] = None, stage: Optional[stages.Stage] = None) -> bundle_lib.Bundle:
    """A model bundle, or a training workdir at `step` (default: its latest finished checkpoint)."""
    if os.path.isfile(os.path.join(path, bundle_lib.BUNDLE_FILE)):
        if step is not None:
            raise ValueError(f"{path} is a model bundle; a step applies to training workdirs only")
        return bundle_lib.load_bundle(path)
    if os.path.isfile(stages.workdir_paths(path)["config"]):
        return inference.load_checkpoint(path, step, stage)
    raise FileNotFoundError(f"{path}: neither a model bundle ({bundle_lib.BUNDLE_FILE}) nor a training workdir "
                            "(config.json)")

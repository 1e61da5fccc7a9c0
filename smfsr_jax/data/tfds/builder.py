"""Shared machinery of the project's TFDS builders: file scanning, captions, intake accounting.

Every builder writes ArrayRecord files (`file_format="array_record"`, set by `build.py`) in file-name
order (`disable_shuffling`), so record i is the i-th accepted file and stays stable for the cached
caption embeddings. Images are validated by `images.load_rgb8` and stored as encoded bytes (as read,
or as PNG when converted); `tfds.data_source` then reads them without TensorFlow.

Intake accounting: each skipped file (corrupt, truncated, unsupported, too small, unmatched pair)
and each converted file is logged with its name and reason, and the lists are kept in the dataset's
`metadata.json` under `intake/<split>` (`records`, `skipped`, `converted`).

Captions (optional), looked up in this order for an image `a/b/name.png` under `manual_dir`:
1. `manual_dir/captions.jsonl`: one JSON object per line, `{"file": "a/b/name.png" or "name", "caption": "..."}`;
2. `manual_dir/captions/name.txt`;
3. `name.txt` beside the image.
A missing caption is stored as "" (its embedding is the NULL prompt's).
"""

import inspect
import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from smfsr_jax.core.images import is_image_name
from smfsr_jax.data import images


def image_bytes() -> tfds.features.Tensor:
    """Encoded image bytes, decoded by the pipeline (not by TFDS)."""
    return tfds.features.Tensor(shape=(), dtype=np.object_)


def list_images(folder: pathlib.Path) -> list[pathlib.Path]:
    """Image files under `folder` (recursive), sorted by relative path."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found")
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_name(p.name))


def require_manual_dir(dl_manager, builder_name: str) -> pathlib.Path:
    manual_dir = dl_manager.manual_dir
    if manual_dir is None or not pathlib.Path(manual_dir).is_dir():
        raise FileNotFoundError(f"{builder_name}: manual_dir {manual_dir} is not a folder; pass --manual_dir "
                                f"(see the builder's docstring for the expected layout)")
    return pathlib.Path(manual_dir)


class Captions:
    """Caption lookup for files under one manual_dir (the rules in this module's docstring)."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.table = {}
        jsonl = root / "captions.jsonl"
        if jsonl.is_file():
            for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    self.table[str(entry["file"])] = str(entry["caption"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{jsonl}:{number}: expected {{\"file\": ..., \"caption\": ...}} "
                                     f"({type(e).__name__}: {e})") from None

    def __call__(self, *paths: pathlib.Path) -> str:
        """Caption of the first of `paths` that has one (paired sets try the LR, then the HR file)."""
        for path in paths:
            relative = path.relative_to(self.root).as_posix()
            for key in (relative, path.name, path.stem):
                if key in self.table:
                    return self.table[key].strip()
            for text in (self.root / "captions" / f"{path.stem}.txt", path.with_suffix(".txt")):
                if text.is_file():
                    return text.read_text(encoding="utf-8").strip()
        return ""


class ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the project's builders: ArrayRecord-friendly defaults and intake accounting."""

    # tfds 4.9.10 reaches for `importlib_resources` (declared only for Python < 3.9) when it
    # derives code_path from a package; the module file is what it would find.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def _info_from_features(self, features: dict, description: str) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=description,
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True)

    def _intake(self, split: str) -> dict:
        intake = self.info.metadata.setdefault("intake", {})
        return intake.setdefault(split, {"records": 0, "skipped": {}, "converted": {}})

    def _skip(self, split: str, name: str, reason: str):
        self._intake(split)["skipped"][name] = reason
        logging.warning("%s/%s: skipped %s: %s", self.name, split, name, reason)

    def _read(self, split: str, path: pathlib.Path, name: str):
        """(pixels, stored bytes) of one file, or None when skipped (logged and counted)."""
        try:
            pixels, stored, note = images.load_rgb8(path.read_bytes(), name)
        except (images.BadImage, OSError) as e:
            self._skip(split, name, str(e))
            return None
        if note:
            self._intake(split)["converted"][name] = note
            logging.warning("%s/%s: converted %s: %s", self.name, split, name, note)
        return pixels, stored

    def _accepted(self, split: str):
        self._intake(split)["records"] += 1

    def _summarise(self, split: str, expected: int | None = None):
        intake = self._intake(split)
        logging.info("%s/%s: %d records, %d skipped, %d converted", self.name, split, intake["records"],
                     len(intake["skipped"]), len(intake["converted"]))
        if expected is not None and intake["records"] != expected:
            logging.warning("%s/%s: %d records, the reference set has %d", self.name, split,
                            intake["records"], expected)

    def _generate_examples(self, split: str, root: pathlib.Path, files: list[pathlib.Path], captions: Captions,
                           expected: int | None = None, image_key: str = "hr"):
        """Examples of a one-image set (`hr_features`, the image under `image_key`), keyed by position in
        `files`; file names are relative to `root`."""
        for key, path in enumerate(files):
            name = path.relative_to(root).as_posix()
            read = self._read(split, path, name)
            if read is None:
                continue
            pixels, stored = read
            self._accepted(split)
            yield key, {image_key: stored, "file_name": name, "caption": captions(path),
                        "height": pixels.shape[0], "width": pixels.shape[1]}
        self._summarise(split, expected)


def hr_features(image_key: str = "hr") -> dict:
    """A one-image set's features: the image under `image_key`, its file name, caption and size."""
    return {image_key: image_bytes(), "file_name": tfds.features.Text(), "caption": tfds.features.Text(),
            "height": tfds.features.Scalar(dtype=np.int32), "width": tfds.features.Scalar(dtype=np.int32)}

"""`paired_sr`: benchmark LR/HR pairs (DRealSR, RealSR, DIV2K-Val), one config per benchmark.

manual_dir layout (the StableSR test-set layout, also cswry/OSEDiff preset/datasets):
    manual_dir/test_LR/<name>.png   LR, 128x128 for the reference sets
    manual_dir/test_HR/<name>.png   HR, exactly `scale` (4) times the LR size
Pairs are matched by relative path, else by file stem with a trailing LR/HR marker removed
(`_LR4`, `_HR`, `x4`, ...). Unmatched files and pairs whose sizes are not exactly x`scale` are skipped,
counted and logged. Optional captions (of the LR image, as SMFSR's test prompts are) as described in
`smfsr_jax.data.tfds.builder`; the LR file is tried first, then the HR file. One split, `test`, in
name order.

Configs: `drealsr` (93 pairs), `realsr` (100), `div2k_val` (3000), `custom` (any count).

Build (then read with `tfds.data_source("paired_sr/drealsr", split="test", data_dir=DIR)`):
    python -m smfsr_jax.data.build --dataset paired_sr/drealsr --manual_dir path/to/drealsr --data_dir DIR
"""

import dataclasses
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from smfsr_jax.data.tfds import builder

_MARKER = re.compile(r"[_-]?(lr|hr|lq|gt)\d*$|[_-]?x\d+$", re.IGNORECASE)


@dataclasses.dataclass
class PairedConfig(tfds.core.BuilderConfig):
    expected_pairs: int | None = None
    scale: int = 4


def _pair_key(path: pathlib.Path, folder: pathlib.Path) -> str:
    relative = path.relative_to(folder).with_suffix("")
    return (relative.parent / _MARKER.sub("", relative.name)).as_posix()


class PairedSr(builder.ImageBuilder):
    """LR/HR benchmark pairs; records {lr, hr, file_name, caption, height, width} (HR size)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PairedConfig(name="drealsr", description="DRealSR centre crops, 128 -> 512.", expected_pairs=93),
        PairedConfig(name="realsr", description="RealSR v3 centre crops, 128 -> 512.", expected_pairs=100),
        PairedConfig(name="div2k_val", description="DIV2K-Val synthetic pairs, 128 -> 512.", expected_pairs=3000),
        PairedConfig(name="custom", description="Any x4 LR/HR pair folders."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Get the benchmark (e.g. the Hugging Face dataset Iceclear/StableSR-TestSets or cswry/OSEDiff
    preset/datasets) and pass the folder holding test_LR/ and test_HR/ as --manual_dir.
    """

    def _info(self):
        features = {"lr": builder.image_bytes(), **builder.hr_features()}
        return self._info_from_features(features, "Benchmark LR/HR pairs matched by name.")

    def _split_generators(self, dl_manager):
        root = builder.require_manual_dir(dl_manager, self.name)
        return {"test": self._generate_examples("test", root)}

    def _generate_examples(self, split: str, root: pathlib.Path):
        lr_dir, hr_dir = root / "test_LR", root / "test_HR"
        lr_files, hr_files = builder.list_images(lr_dir), builder.list_images(hr_dir)
        hr_by_name = {p.relative_to(hr_dir).with_suffix("").as_posix(): p for p in hr_files}
        hr_by_key = {_pair_key(p, hr_dir): p for p in hr_files}
        captions = builder.Captions(root)
        matched_hr = set()
        for key, lr_path in enumerate(lr_files):
            name = lr_path.relative_to(lr_dir).as_posix()
            hr_path = hr_by_name.get(lr_path.relative_to(lr_dir).with_suffix("").as_posix())
            hr_path = hr_path or hr_by_key.get(_pair_key(lr_path, lr_dir))
            if hr_path is None:
                self._skip(split, f"test_LR/{name}", "no HR image with a matching name in test_HR/")
                continue
            matched_hr.add(hr_path)
            lr = self._read(split, lr_path, f"test_LR/{name}")
            hr = self._read(split, hr_path, f"test_HR/{hr_path.relative_to(hr_dir).as_posix()}")
            if lr is None or hr is None:
                continue
            scale = self.builder_config.scale
            if hr[0].shape[:2] != tuple(np.multiply(lr[0].shape[:2], scale)):
                self._skip(split, f"test_LR/{name}", f"LR {lr[0].shape[1]}x{lr[0].shape[0]} and HR "
                           f"{hr[0].shape[1]}x{hr[0].shape[0]} are not an exact x{scale} pair")
                continue
            self._accepted(split)
            yield key, {"lr": lr[1], "hr": hr[1], "file_name": name, "caption": captions(lr_path, hr_path),
                        "height": hr[0].shape[0], "width": hr[0].shape[1]}
        for hr_path in sorted(set(hr_files) - matched_hr):
            self._skip(split, f"test_HR/{hr_path.relative_to(hr_dir).as_posix()}", "no LR image with a matching name")
        self._summarise(split, self.builder_config.expected_pairs)

"""`ffhq10k`: the first 10,000 FFHQ images (00000-09999), the face part of the training set.

manual_dir layout: FFHQ images named by their 5-digit index anywhere below manual_dir, e.g. the
official `images1024x1024/00000/00000.png ... 69999.png` tree or a flat folder. Only stems 00000 to
09999 are used, in index order; other files are ignored. Optional captions as described in
`smfsr_jax.data.tfds.builder`. One split, `train`.

Build (then read with `tfds.data_source("ffhq10k", split="train", data_dir=DIR)`):
    python -m smfsr_jax.data.build --dataset ffhq10k --manual_dir /path/to/ffhq/images1024x1024 --data_dir DIR
"""

import tensorflow_datasets as tfds

from smfsr_jax.data.tfds import builder

NUM_IMAGES = 10_000


class Ffhq10k(builder.ImageBuilder):
    """FFHQ 00000-09999; records {hr, file_name, caption, height, width}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download FFHQ (https://github.com/NVlabs/ffhq-dataset; images1024x1024) and pass the folder that
    holds the numbered PNGs (directly or in sub-folders) as --manual_dir.
    """

    def _info(self):
        return self._info_from_features(builder.hr_features(), "The first 10,000 FFHQ images.")

    def _split_generators(self, dl_manager):
        root = builder.require_manual_dir(dl_manager, self.name)
        files = [p for p in builder.list_images(root) if p.stem.isdigit() and int(p.stem) < NUM_IMAGES]
        files.sort(key=lambda p: int(p.stem))
        return {"train": self._generate_examples("train", root, files, builder.Captions(root), NUM_IMAGES)}

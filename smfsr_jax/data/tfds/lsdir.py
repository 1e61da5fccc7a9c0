"""`lsdir`: the LSDIR HR training images (Li et al. 2023), the main training set (docs/design.md#data).

manual_dir layout: the HR training images anywhere below manual_dir, as unpacked from the LSDIR
shards, e.g. `manual_dir/0001000/0000001.png`, `manual_dir/0002000/0001001.png`, ... Optional
captions as described in `smfsr_jax.data.tfds.builder`. One split, `train`, in relative-path order.

Build (then read with `tfds.data_source("lsdir", split="train", data_dir=DIR)`):
    python -m smfsr_jax.data.build --dataset lsdir --manual_dir /path/to/LSDIR/train --data_dir DIR
"""

import tensorflow_datasets as tfds

from smfsr_jax.data.tfds import builder


class Lsdir(builder.ImageBuilder):
    """LSDIR HR training images; records {hr, file_name, caption, height, width}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the LSDIR HR training shards (https://ofsoundof.github.io/lsdir-data/), unpack them into
    one folder and pass it as --manual_dir. Images may sit in sub-folders; .txt captions are optional.
    """

    def _info(self):
        return self._info_from_features(builder.hr_features(), "LSDIR HR training images.")

    def _split_generators(self, dl_manager):
        root = builder.require_manual_dir(dl_manager, self.name)
        return {"train": self._generate_examples("train", root, builder.list_images(root), builder.Captions(root))}

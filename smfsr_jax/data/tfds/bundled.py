"""`bundled`: the colour photographs shipped inside the scikit-image wheel; the embedded default.

No download and no manual_dir: the files are read from the installed `skimage/data/` folder (never
through pooch). They are what `make demo` and the tests train and evaluate on (docs/design.md#embedded-default).

Splits (fixed, by file name):
    train    astronaut, hubble_deep_field, ihc, motorcycle_left, motorcycle_right, retina, rocket
    holdout  chelsea, coffee   (never trained on: the demo's outputs and experiments)
Each record carries a short hand-written caption, so the caption-embedding path has real text.

Build (then read with `tfds.data_source("bundled", split="train", data_dir=DIR)`):
    python -m smfsr_jax.data.build --dataset bundled --data_dir DIR
"""

import pathlib

import skimage
import tensorflow_datasets as tfds

from smfsr_jax.data.tfds import builder

PHOTOGRAPHS = {
    "astronaut.png": "A portrait of an astronaut in a white spacesuit in front of an American flag.",
    "hubble_deep_field.jpg": "Hundreds of distant galaxies scattered across a dark sky.",
    "ihc.png": "A microscope image of stained tissue with brown and blue cells.",
    "motorcycle_left.png": "A red motorcycle parked in a garage next to a helmet and tools.",
    "motorcycle_right.png": "A red motorcycle parked in a garage next to a helmet and tools.",
    "retina.jpg": "A fundus photograph of a human retina with branching blood vessels.",
    "rocket.jpg": "A rocket standing on its launch pad under a blue sky.",
    "chelsea.png": "A tabby cat with green eyes looking to the side.",
    "coffee.png": "A cup of coffee with latte art on a saucer with a spoon.",
}
HOLDOUT = ("chelsea.png", "coffee.png")


def skimage_data_dir() -> pathlib.Path:
    return pathlib.Path(skimage.__file__).parent / "data"


class Bundled(builder.ImageBuilder):
    """scikit-image's colour photographs; records {hr, file_name, caption, height, width}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self):
        return self._info_from_features(builder.hr_features(), "Colour photographs bundled with scikit-image.")

    def _split_generators(self, dl_manager):
        root = skimage_data_dir()
        captions = builder.Captions(root)
        captions.table.update(PHOTOGRAPHS)
        files = {split: [root / name for name in sorted(PHOTOGRAPHS) if (name in HOLDOUT) == (split == "holdout")]
                 for split in ("train", "holdout")}
        for split, paths in files.items():
            for path in paths:
                if not path.is_file():
                    self._skip(split, path.name, f"not found in {root} (scikit-image {skimage.__version__})")
        return {split: self._generate_examples(split, root, [p for p in paths if p.is_file()], captions)
                for split, paths in files.items()}

"""`lq_only`: real-world LR images without ground truth (RealLQ250, RealSet65), for no-reference metrics.

manual_dir layout: the LR images anywhere below manual_dir (a flat folder as released), e.g.
`manual_dir/0001.png ...`; a `test_LR/` sub-folder is used instead when present. Optional captions
as described in `smfsr_jax.data.tfds.builder`. One split, `test`, in relative-path order.

Configs: `reallq250` (250 images), `realset65` (65), `custom` (any count).

Build (then read with `tfds.data_source("lq_only/reallq250", split="test", data_dir=DIR)`):
    python -m smfsr_jax.data.build --dataset lq_only/reallq250 --manual_dir /path/to/RealLQ250 --data_dir DIR
"""

import dataclasses

import tensorflow_datasets as tfds

from smfsr_jax.data.tfds import builder


@dataclasses.dataclass
class LqConfig(tfds.core.BuilderConfig):
    expected_images: int | None = None


class LqOnly(builder.ImageBuilder):
    """LR-only test images; records {lr, file_name, caption, height, width} (LR size)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        LqConfig(name="reallq250", description="RealLQ250 (DreamClear release).", expected_images=250),
        LqConfig(name="realset65", description="RealSet65.", expected_images=65),
        LqConfig(name="custom", description="Any folder of LR images."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Get RealLQ250 (DreamClear release) or RealSet65 and pass the image folder as --manual_dir.
    """

    def _info(self):
        return self._info_from_features(builder.hr_features(image_key="lr"),
                                        "Real-world LR images without ground truth.")

    def _split_generators(self, dl_manager):
        root = builder.require_manual_dir(dl_manager, self.name)
        folder = root / "test_LR" if (root / "test_LR").is_dir() else root
        return {"test": self._generate_examples("test", folder, builder.list_images(folder), builder.Captions(root),
                                                self.builder_config.expected_images, image_key="lr")}

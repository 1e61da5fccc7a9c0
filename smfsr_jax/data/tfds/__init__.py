"""The project's TFDS builders; importing this package registers them with TFDS.

`lsdir`, `ffhq10k` (training HR images), `paired_sr/{drealsr,realsr,div2k_val,custom}` (benchmark
pairs), `lq_only/{reallq250,realset65,custom}` (LR-only test images) and `bundled` (scikit-image's
photographs, no download). Each module's docstring gives its manual_dir layout and build command;
`smfsr_jax.data.build` prepares any of them.
"""

from smfsr_jax.data.tfds import bundled, ffhq10k, lq_only, lsdir, paired_sr  # noqa: F401 (registration)

BUILDERS = {"lsdir": lsdir.Lsdir, "ffhq10k": ffhq10k.Ffhq10k, "paired_sr": paired_sr.PairedSr,
            "lq_only": lq_only.LqOnly, "bundled": bundled.Bundled}

"""smfsr-jax: one-step real-world x4 super-resolution (SMFSR) in JAX/Flax."""

from smfsr_jax.core import files as _files

# Before any library opens a bucket: one client for every gs:// path, and the emulator when one is named.
_files.configure_storage()

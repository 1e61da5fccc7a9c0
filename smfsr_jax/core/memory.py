"""The memory a computation may fill with temporaries, the budget that sizes the VAE's whole-or-tiled choice
(models/vae_tiling.py `tile_for_budget`).

On a GPU or TPU it is half of the device's free memory when first asked (the transformer's temporaries and the
allocator's fragmentation need the rest); a CPU reports no limit, so it is CPU_BUDGET there.
"""

import functools

import jax

CPU_BUDGET = 8 * 2**30  # what a 16 GB host can spare for one image's temporaries
DEVICE_FRACTION = 0.5


@functools.lru_cache(maxsize=None)
def activation_budget(device: jax.Device | None = None) -> int:
    """Bytes of temporaries one computation on `device` (default: the first local one) may use; fixed per process
    once asked, so that the settings it sizes (and the compiled functions they key) stay the same."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return CPU_BUDGET
    return int(DEVICE_FRACTION * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))

"""Image files for evaluation: listing in protocol order, 8-bit RGB reading, [0, 1] floats. Folders and files
may be local or in a bucket (gs://...)."""

import os

import cv2
import numpy as np

from smfsr_jax.core import files
from smfsr_jax.core.images import is_image_name


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def list_images(directory) -> list[str]:
    """Names of the image files directly in `directory`, in Python sorted() order (the pairing order)."""
    directory = os.fspath(directory)
    if not files.is_dir(directory):
        raise FileNotFoundError(f"{directory}: no such directory")
    if files.is_remote(directory):
        return [name for name in files.entries(directory)[0] if is_image_name(name)]
    return sorted(name for name in os.listdir(directory)
                  if is_image_name(name) and os.path.isfile(os.path.join(directory, name)))


def read_rgb8(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, read as OSEDiff does (cv2 IMREAD_COLOR, BGR -> RGB): alpha dropped, grey
    replicated, 16-bit reduced to 8-bit. A file in a bucket is decoded from its bytes (imread reads local files
    only; imdecode applies the same EXIF orientation)."""
    path = os.fspath(path)
    if files.is_remote(path):
        try:
            image = cv2.imdecode(np.frombuffer(files.read_bytes(path), np.uint8), cv2.IMREAD_COLOR)
        except (OSError, cv2.error):  # gone since it was listed, or bytes no decoder accepts
            image = None
    else:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise UnreadableImageError(f"{path}: not a readable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_unit_float(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 x/255; float images must already lie in [0, 1]; anything else is an error."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"float images must lie in [0, 1], got [{images.min()}, {images.max()}]")
    return images.astype(np.float32)

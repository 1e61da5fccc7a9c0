"""Image files -> validated 8-bit RGB: the builders' intake check and the pipelines' decoder.

Builders call `load_rgb8` once per file. It rejects what cannot be trusted (corrupt or truncated
files, unsupported pixel formats, images too small) with `BadImage`, and converts what can be:
grayscale, palette, alpha (dropped), 16-bit PNG (rounded to 8 bits), CMYK JPEG, EXIF-rotated JPEG.
An 8-bit RGB PNG or JPEG is stored as read; anything converted is stored as a lossless PNG. The
pipelines then decode stored bytes with `decode_rgb8` (OpenCV, EXIF orientation ignored because it
was applied at build time). SR outputs are written whole by `save_image`.
"""

import contextlib
import io
import os

import cv2
import numpy as np
from PIL import Image, ImageOps

from smfsr_jax.core import files

MIN_SIDE = 16  # below this a crop or an x4 LR is meaningless; such files are skipped
_PASSTHROUGH_FORMATS = ("PNG", "JPEG")
EXIF_ORIENTATION = 0x0112


class BadImage(ValueError):
    """A file that cannot become an 8-bit RGB image; the message names the file and the problem."""


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: signature (8) + length (4) + type (4) + w (4) + h (4), then depth.
    return data[24] if len(data) > 24 else 8


def _sixteen_bit_png_to_rgb8(data: bytes, name: str) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None:
        raise BadImage(f"{name}: unreadable 16-bit PNG")
    pixels = np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)
    if pixels.ndim == 2 or pixels.shape[2] < 3:  # gray or gray+alpha
        gray = pixels if pixels.ndim == 2 else pixels[..., 0]
        return np.repeat(gray[..., None], 3, axis=-1)
    return cv2.cvtColor(np.ascontiguousarray(pixels[..., :3]), cv2.COLOR_BGR2RGB)


def _pil_to_rgb8(image: Image.Image, name: str) -> tuple[np.ndarray, str | None]:
    """RGB uint8 pixels and a note on the conversion (None when the file already was 8-bit RGB)."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image), None
    if mode in ("L", "1", "P", "LA", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        notes = {"L": "grayscale", "1": "bilevel", "P": "palette", "LA": "grayscale+alpha, alpha dropped",
                 "PA": "palette+alpha, alpha dropped", "RGBA": "alpha dropped", "RGBX": "padding byte dropped",
                 "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}
        return np.asarray(image.convert("RGB")), f"{notes[mode]} converted to RGB"
    if mode.startswith("I;16") or mode == "I":
        pixels = np.asarray(image).astype(np.float32)
        if pixels.max() > 65535 or pixels.min() < 0:
            raise BadImage(f"{name}: 32-bit integer pixels (mode {mode}) are not a photograph")
        gray = np.round(pixels / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1), f"16-bit grayscale ({mode}) converted to 8-bit RGB"
    raise BadImage(f"{name}: unsupported pixel format {mode!r}")


def load_rgb8(data: bytes, name: str) -> tuple[np.ndarray, bytes, str | None]:
    """Validate one encoded image: (pixels (H, W, 3) uint8, bytes to store, conversion note or None).

    Raises BadImage for corrupt, truncated, unsupported or too-small files.
    """
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes everything: truncation and corruption surface here
        fmt = image.format
        if fmt == "PNG" and _png_bit_depth(data) == 16:
            pixels, note = _sixteen_bit_png_to_rgb8(data, name), "16-bit PNG rounded to 8 bits"
        elif image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            pixels, note = _pil_to_rgb8(ImageOps.exif_transpose(image), name)
            note = "EXIF orientation applied" + (f"; {note}" if note else "")
        else:
            pixels, note = _pil_to_rgb8(image, name)
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, MemoryError, cv2.error,
            Image.DecompressionBombError) as e:
        if isinstance(e, BadImage):
            raise
        raise BadImage(f"{name}: unreadable or truncated image ({type(e).__name__}: {e})") from None
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise BadImage(f"{name}: decoded to shape {pixels.shape} {pixels.dtype}, expected (H, W, 3) uint8")
    if min(pixels.shape[:2]) < MIN_SIDE:
        raise BadImage(f"{name}: {pixels.shape[1]}x{pixels.shape[0]} is smaller than {MIN_SIDE} px on a side")
    if note is None and fmt in _PASSTHROUGH_FORMATS:
        return pixels, data, None
    if note is None:
        note = f"{fmt} re-encoded as PNG"
    return pixels, encode_png(pixels), note


def encode_png(pixels: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    if not ok:
        raise BadImage(f"PNG encoding failed for an array of shape {pixels.shape}")
    return buffer.tobytes()


def decode_rgb8(data: bytes, name: str = "record") -> np.ndarray:
    """Stored bytes -> (H, W, 3) uint8 RGB. Raises BadImage when OpenCV cannot decode them."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise BadImage(f"{name}: stored image bytes do not decode to an RGB image")
    return pixels


def image_format(path: str) -> str | None:
    """PIL's format name for `path`'s extension (None when this Pillow cannot write it)."""
    return Image.registered_extensions().get(os.path.splitext(path)[1].lower())


def save_image(image, path: str) -> None:
    """Write `image` to `path` in the format of its extension, whole: locally through a .partial name, in a bucket
    as one upload (all or nothing), so that an interrupted or failed write never leaves a truncated image under
    the final name."""
    if files.is_remote(path):
        encoded = io.BytesIO()
        Image.fromarray(image).save(encoded, format=image_format(path))
        files.write_bytes(path, encoded.getvalue())
        return
    partial = path + ".partial"
    try:
        Image.fromarray(image).save(partial, format=image_format(path))
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise

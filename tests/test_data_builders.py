"""Image intake and the TFDS builders, on temporary folders with bad files and on ../shared DRealSR."""

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from smfsr_jax.data import build, images, pipeline
from tests.conftest import shared_path


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def _rgb(height=40, width=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _bad_files() -> dict:
    """name -> bytes: good files, convertible files and unusable files."""
    rgb = _rgb()
    ok, sixteen = cv2.imencode(".png", (rgb.astype(np.uint16) * 257)[..., ::-1])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return {
        "good.png": _png(rgb),
        "good.jpg": _jpeg(Image.fromarray(rgb)),
        "gray.png": _png(rgb[..., 0]),
        "rgba.png": _png(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 200, np.uint8)], axis=-1)),
        "sixteen_bit.png": sixteen.tobytes(),
        "cmyk.jpg": _jpeg(Image.fromarray(rgb).convert("CMYK")),
        "rotated.jpg": _jpeg(Image.fromarray(rgb), exif=exif),
        "truncated.jpg": _jpeg(Image.fromarray(rgb))[:400],
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "empty.png": b"",
        "tiny.png": _png(_rgb(8, 8)),
    }


CONVERTED = {"gray.png", "rgba.png", "sixteen_bit.png", "cmyk.jpg", "rotated.jpg"}
SKIPPED = {"truncated.jpg", "corrupt.png", "empty.png", "tiny.png"}


def test_load_rgb8_converts_or_rejects_every_bad_kind():
    files = _bad_files()
    for name, data in files.items():
        if name in SKIPPED:
            with pytest.raises(images.BadImage, match=name):
                images.load_rgb8(data, name)
            continue
        pixels, stored, note = images.load_rgb8(data, name)
        expected_shape = (48, 40, 3) if name == "rotated.jpg" else (40, 48, 3)
        assert pixels.shape == expected_shape and pixels.dtype == np.uint8, name
        assert (note is not None) == (name in CONVERTED), name
        assert images.decode_rgb8(stored, name).shape == expected_shape
        if note is None:
            assert stored == data  # 8-bit RGB PNG/JPEG is stored as read
    assert np.array_equal(images.decode_rgb8(files["good.png"]), _rgb())  # RGB order, lossless
    sixteen = images.load_rgb8(files["sixteen_bit.png"], "s")[0]
    assert np.array_equal(sixteen, _rgb())  # x*257 rounds back to x
    gray = images.load_rgb8(files["gray.png"], "g")[0]
    assert np.array_equal(gray, np.repeat(_rgb()[..., :1], 3, axis=-1))


def _write(folder, files: dict):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _records(dataset, split, data_dir):
    source = pipeline.open_source(dataset, split, str(data_dir))
    return [source[i] for i in range(len(source))]


def test_lsdir_builder_skips_converts_and_reads_captions(tmp_path):
    manual = tmp_path / "manual"
    _write(manual / "0001000", _bad_files())
    _write(manual / "0002000", {"nested.png": _png(_rgb(seed=1))})
    (manual / "0001000" / "good.txt").write_text("a caption beside the image\n")
    (manual / "captions.jsonl").write_text(json.dumps({"file": "0002000/nested.png", "caption": "from jsonl"}) + "\n")
    builder = build.build("lsdir", str(tmp_path / "data"), str(manual))
    records = _records("lsdir", "train", tmp_path / "data")
    names = [r["file_name"].decode() for r in records]
    expected = sorted(f"0001000/{n}" for n in _bad_files() if n not in SKIPPED) + ["0002000/nested.png"]
    assert names == expected  # record order = relative-path order
    for record in records:
        pixels = images.decode_rgb8(record["hr"])
        assert pixels.shape == (record["height"], record["width"], 3)
    captions = {r["file_name"].decode(): r["caption"].decode() for r in records}
    assert captions["0001000/good.png"] == "a caption beside the image"
    assert captions["0002000/nested.png"] == "from jsonl" and captions["0001000/cmyk.jpg"] == ""
    intake = builder.info.metadata["intake"]["train"]
    assert set(intake["skipped"]) == {f"0001000/{n}" for n in SKIPPED}
    assert set(intake["converted"]) == {f"0001000/{n}" for n in CONVERTED}
    assert intake["records"] == len(expected)
    assert build.summary(builder)["splits"]["train"] == {"records": len(expected), "skipped": 4, "converted": 5}


def test_ffhq10k_takes_the_first_ten_thousand_in_index_order(tmp_path):
    manual = tmp_path / "ffhq"
    _write(manual / "09000", {"09999.png": _png(_rgb(seed=2))})
    _write(manual / "00000", {"00002.png": _png(_rgb(seed=3)), "00010.png": _png(_rgb(seed=4))})
    _write(manual / "10000", {"10000.png": _png(_rgb(seed=5))})
    build.build("ffhq10k", str(tmp_path / "data"), str(manual))
    names = [r["file_name"].decode() for r in _records("ffhq10k", "train", tmp_path / "data")]
    assert names == ["00000/00002.png", "00000/00010.png", "09000/09999.png"]


def test_paired_and_lq_only_builders(tmp_path):
    manual = tmp_path / "pairs"
    lr, hr = _rgb(16, 20, seed=1), _rgb(64, 80, seed=2)
    _write(manual / "test_LR", {"a.png": _png(lr), "b_LR4.png": _png(lr), "c.png": _png(lr),
                                "d.png": _png(lr), "broken.png": b"not an image"})
    _write(manual / "test_HR", {"a.png": _png(hr), "b_HR.png": _png(hr), "c.png": _png(_rgb(60, 80)),
                                "broken.png": _png(hr), "orphan.png": _png(hr)})
    (manual / "captions").mkdir()
    (manual / "captions" / "a.txt").write_text("an LR caption")
    builder = build.build("paired_sr/custom", str(tmp_path / "data"), str(manual))
    records = _records("paired_sr/custom", "test", tmp_path / "data")
    assert [r["file_name"].decode() for r in records] == ["a.png", "b_LR4.png"]
    assert records[0]["caption"] == b"an LR caption"
    assert images.decode_rgb8(records[1]["hr"]).shape == (64, 80, 3)
    skipped = builder.info.metadata["intake"]["test"]["skipped"]
    assert set(skipped) == {"test_LR/c.png", "test_LR/d.png", "test_LR/broken.png", "test_HR/orphan.png"}
    assert "exact x4" in skipped["test_LR/c.png"]

    build.build("lq_only/custom", str(tmp_path / "data"), str(manual))
    lq = _records("lq_only/custom", "test", tmp_path / "data")
    assert [r["file_name"].decode() for r in lq] == ["a.png", "b_LR4.png", "c.png", "d.png"]
    assert "hr" not in lq[0]


def test_bundled_builder_needs_no_download(tmp_path):
    builder = build.build("bundled", str(tmp_path))
    train = [r["file_name"].decode() for r in _records("bundled", "train", tmp_path)]
    holdout = [r["file_name"].decode() for r in _records("bundled", "holdout", tmp_path)]
    assert holdout == ["chelsea.png", "coffee.png"] and len(train) == 7 and not set(train) & set(holdout)
    assert build.summary(builder)["splits"]["train"]["skipped"] == 0


def test_paired_sr_over_shared_drealsr_yields_93_pairs(tmp_path):
    manual = shared_path("data", "drealsr")
    builder = build.build("paired_sr/drealsr", str(tmp_path), str(manual))
    assert builder.info.splits["test"].num_examples == 93
    source = pipeline.open_source("paired_sr/drealsr", "test", str(tmp_path))
    record = source[0]
    assert images.decode_rgb8(record["lr"]).shape == (128, 128, 3)
    assert images.decode_rgb8(record["hr"]).shape == (512, 512, 3)
    assert builder.info.metadata["intake"]["test"]["skipped"] == {}

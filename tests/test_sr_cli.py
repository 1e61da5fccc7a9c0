"""`python -m smfsr_jax.sr`: x4 outputs for odd sizes and converted formats, skipped corrupt files, per-seed folders,
captions (JSON file or .txt folder) with and without text encoders, single-file input and file output, the output
checked before the model loads, a failed write stopping the run, one-line errors and their exit statuses; the same
with a bundle, inputs and outputs in a bucket (the gs:// emulator)."""

import errno
import io
import json
import logging
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from smfsr_jax import sr
from smfsr_jax.convert.tensors import CheckpointError
from smfsr_jax.core import files
from smfsr_jax.core.errors import UserError
from smfsr_jax.sampling.runner import SRPipeline
from tests.conftest import REPO
from tests.test_sampling import _assert_same_up_to_rounding, lr_crop, make_bundle
from tests.text_fixtures import write_tiny_sd35_root

# Inputs are (height, width) 37x53 and 200x300: preprocessed to 512x728 and 800x1200, i.e. 64x91 and 100x150
# latents, tiled 2 and 8 ways with the default 64/24 tiles. Every run uses --batch_size 2, so each size compiles once.
SMALL, LARGE = (37, 53), (200, 300)


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lr")
    Image.fromarray(lr_crop("astronaut", *SMALL)).save(folder / "a_rgb.png")
    Image.fromarray(lr_crop("camera", *SMALL, 200, 200)[..., 0], mode="L").save(folder / "b_gray.png")
    gray16 = (lr_crop("camera", *SMALL, 300, 100)[..., 0].astype(np.uint16) * 257 + 100).astype(np.uint16)
    cv2.imwrite(str(folder / "c_gray16.png"), gray16)
    Image.fromarray(lr_crop("coffee", *LARGE, 100, 200)).save(folder / "d_rgb.jpg", quality=95)
    rgba = np.dstack([lr_crop("chelsea", *LARGE, 50, 100), np.full(LARGE, 128, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(folder / "e_rgba.png")
    (folder / "f_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    (folder / "notes.txt").write_text("not an image")
    return folder


EXPECTED = {"a_rgb": SMALL, "b_gray": SMALL, "c_gray16": SMALL, "d_rgb": LARGE, "e_rgba": LARGE}


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def test_cli_x4_outputs_converted_inputs_and_corrupt_file(student_bundle, input_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert sr.main(["--checkpoint", student_bundle, "--input", str(input_dir), "--output", str(out),
                    "--batch_size", "2", "--seeds", "7"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{stem}.png" for stem in EXPECTED)
    for stem, (height, width) in EXPECTED.items():
        assert read_png(out / f"{stem}.png").shape == (4 * height, 4 * width, 3)
    captured = capsys.readouterr()
    assert "wrote 5 images" in captured.out and "skipped 1" in captured.out
    assert "f_corrupt.png" in captured.err

    # Several seeds: one folder each. The first two files keep their indices and batch, so seed 7 repeats the run
    # above exactly; seed 8 differs.
    subset = tmp_path / "subset"
    subset.mkdir()
    for name in ("a_rgb.png", "b_gray.png"):
        (subset / name).write_bytes((input_dir / name).read_bytes())
    multi = tmp_path / "multi"
    assert sr.main(["--checkpoint", student_bundle, "--input", str(subset), "--output", str(multi),
                    "--batch_size", "2", "--seeds", "7,8"]) == 0
    assert sorted(p.name for p in multi.iterdir()) == ["seed7", "seed8"]
    for stem in ("a_rgb", "b_gray"):
        seven = read_png(multi / "seed7" / f"{stem}.png")
        np.testing.assert_array_equal(seven, read_png(out / f"{stem}.png"))
        assert np.mean(seven != read_png(multi / "seed8" / f"{stem}.png")) > 0.1

    # --skip_existing after an interruption: a missing output (and its stale .partial) is redone, the rest kept.
    before = read_png(multi / "seed8" / "b_gray.png")
    (multi / "seed8" / "b_gray.png").unlink()
    (multi / "seed8" / "b_gray.png.partial").write_bytes(b"truncated")
    kept = {p: p.stat().st_mtime_ns for p in (multi / "seed7" / "a_rgb.png", multi / "seed8" / "a_rgb.png",
                                               multi / "seed7" / "b_gray.png")}
    capsys.readouterr()
    assert sr.main(["--checkpoint", student_bundle, "--input", str(subset), "--output", str(multi),
                    "--batch_size", "2", "--seeds", "7,8", "--skip_existing"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 2 images" in summary and "1 image files already done" in summary  # b_gray for both seeds
    assert {p: p.stat().st_mtime_ns for p in kept} != kept  # seed7/b_gray rewritten with seed 8's
    assert all(p.stat().st_mtime_ns == kept[p] for p in kept if p.name == "a_rgb.png")
    _assert_same_up_to_rounding(read_png(multi / "seed8" / "b_gray.png"), before)
    assert not (multi / "seed8" / "b_gray.png.partial").exists()


def test_cli_and_library_run_the_same_batches(student_bundle, tmp_path):
    """The CLI and SRPipeline share the batch runner: the same images, seed, indices and batch size give the same
    outputs bit for bit, mixed sizes included (the runner groups them by size the same way for both)."""
    images = [lr_crop("astronaut", 32, 32), lr_crop("coffee", 24, 40), lr_crop("chelsea", 32, 32)]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    assert sr.main(["--checkpoint", student_bundle, "--input", str(folder), "--output", str(tmp_path / "out"),
                    "--batch_size", "2", "--seeds", "5"]) == 0
    library = SRPipeline.from_checkpoint(student_bundle, batch_size=2)(images, seed=5)
    for i, expected in enumerate(library):
        np.testing.assert_array_equal(read_png(tmp_path / "out" / f"{i}.png"), expected)


def test_a_second_run_reads_the_compiled_functions(student_bundle, tmp_path):
    """The persistent compilation cache is on by default, in the project's cache folder: a second run over new
    photos of the same size compiles nothing."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the tests' own cache off
    env["SMFSR_JAX_CACHE"] = str(tmp_path / "cache")
    summaries = []
    for run, name in enumerate(("astronaut", "coffee")):
        folder = tmp_path / f"in{run}"
        folder.mkdir()
        Image.fromarray(lr_crop(name, 32, 32)).save(folder / "photo.png")
        done = subprocess.run([sys.executable, "-m", "smfsr_jax.sr", "--checkpoint", student_bundle, "--input",
                               str(folder), "--output", str(tmp_path / f"out{run}")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        summaries.append(done.stdout)
    where = f"({tmp_path / 'cache' / 'jax_compilation'})"
    compiled = int(re.search(r"compiled (\d+) functions?, read 0 from the compilation cache", summaries[0])[1])
    assert compiled > 0 and where in summaries[0], summaries[0]
    assert f"compiled 0 functions, read {compiled} from the compilation cache {where}" in summaries[1], summaries[1]


def test_cli_single_file_and_unreadable_only(student_bundle, input_dir, tmp_path, capsys):
    out = tmp_path / "single"
    assert sr.main(["--checkpoint", student_bundle, "--input", str(input_dir / "a_rgb.png"), "--output", str(out),
                    "--batch_size", "2", "--seeds", "7"]) == 0
    assert [p.name for p in out.iterdir()] == ["a_rgb.png"]
    assert read_png(out / "a_rgb.png").shape == (4 * SMALL[0], 4 * SMALL[1], 3)

    # An --output with an image extension is the file itself, in its format; an existing file is replaced.
    result = tmp_path / "result.jpg"
    result.write_bytes(b"an older result")
    assert sr.main(["--checkpoint", student_bundle, "--input", str(input_dir / "a_rgb.png"), "--output", str(result),
                    "--batch_size", "2", "--seeds", "7"]) == 0
    with Image.open(result) as image:
        assert image.format == "JPEG" and image.size == (4 * SMALL[1], 4 * SMALL[0])
    assert not (tmp_path / "result.jpg.partial").exists()

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 10)
    assert sr.main(["--checkpoint", student_bundle, "--input", str(bad), "--output", str(tmp_path / "o")]) == 1
    capsys.readouterr()
    for bad_args in (["--input", str(tmp_path / "missing"), "--output", str(out)],
                     ["--input", str(bad), "--output", str(out), "--tile_overlap", "64"]):
        assert sr.main(["--checkpoint", student_bundle, *bad_args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_cli_write_failure_stops_after_the_summary(student_bundle, input_dir, tmp_path, capsys, monkeypatch):
    """A write that fails (here ENOSPC on the second image) stops the run: the summary so far, then one error line
    naming the file, status 1, and no .partial left. Directories and broken links in the input folder are named
    among the skipped; other files without an image extension are not."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a_rgb.png", "b_gray.png"):
        (inputs / name).write_bytes((input_dir / name).read_bytes())
    (inputs / "sub").mkdir()
    (inputs / "gone.png").symlink_to(tmp_path / "missing.png")
    (inputs / "linked").symlink_to(tmp_path)
    (inputs / "a_rgb.txt").write_text("a caption")
    saves = []
    real_save = Image.Image.save

    def save(image, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 2:
            with open(fp, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    assert sr.main(["--checkpoint", student_bundle, "--input", str(inputs), "--output", str(out),
                    "--batch_size", "2", "--seeds", "7"]) == 1
    assert [p.name for p in out.iterdir()] == ["a_rgb.png"]
    captured = capsys.readouterr()
    assert "wrote 1 images" in captured.out and "skipped 3" in captured.out
    for line in ("skipped sub: a directory", "skipped gone.png: a broken link",
                 "skipped linked: a link to a directory"):
        assert line in captured.err
    assert "a_rgb.txt" not in captured.err and "Traceback" not in captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"error: writing {out / 'b_gray.png'}: No space left on device"), last


def test_cli_list_inputs_names_directories_and_broken_links(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").mkdir()
    (tmp_path / "c").symlink_to(tmp_path / "nowhere")
    (tmp_path / "d.png").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "e.txt").write_text("a caption")
    files, others = sr.list_inputs(str(tmp_path))
    assert files == [str(tmp_path / "a.png")]
    assert others == {"b.jpg": "a directory", "c": "a broken link", "d.png": "a link to a directory"}


def test_cli_checks_the_output_before_the_model(input_dir, tmp_path, capsys, monkeypatch):
    """An output that cannot be created or written is one line and status 2, before the (missing) model is read;
    then a missing or bad checkpoint is one line too, with its traceback under --debug."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    no_model = ["--checkpoint", str(tmp_path / "no_model"), "--input", str(input_dir)]
    cases = [("/proc/smfsr_sr_test/out", "cannot create the output directory /proc/smfsr_sr_test/out "
                                         "(/proc/smfsr_sr_test): No such file or directory"),
             (str(a_file), f"the output directory {a_file} exists and is not a directory"),
             (str(a_file / "out"), f"cannot create the output directory {a_file / 'out'}: Not a directory")]
    for output, reason in cases:
        assert sr.main([*no_model, "--output", output]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {reason}\n", err

    def unwritable(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with monkeypatch.context() as m:
        m.setattr(files.tempfile, "NamedTemporaryFile", unwritable)
        assert sr.main([*no_model, "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: cannot write in the output directory {tmp_path / 'out'}: " \
                                      "Permission denied\n"
    assert list((tmp_path / "out").iterdir()) == []  # created, and no probe file left

    assert sr.main([*no_model, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not a model bundle" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UserError):
        sr.main([*no_model, "--output", str(tmp_path / "out"), "--debug"])

    def bad_bundle(*args, **kwargs):
        raise CheckpointError("transformer.safetensors: missing key x_embedder.proj.weight")

    monkeypatch.setattr(sr.SRModel, "from_checkpoint", bad_bundle)
    assert sr.main([*no_model, "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "error: transformer.safetensors: missing key x_embedder.proj.weight\n"
    with pytest.raises(CheckpointError):
        sr.main([*no_model, "--output", str(tmp_path / "out"), "--debug"])


def test_cli_file_output_needs_one_input_and_seed(input_dir, tmp_path, capsys):
    """An --output with an image extension names one file: refused for a folder input or several seeds."""
    for case, reason in [(("--input", str(input_dir)), "is a folder (one output per image)"),
                         (("--input", str(input_dir / "a_rgb.png"), "--seeds", "1,2"), "gives 2 seeds")]:
        with pytest.raises(SystemExit) as exit_info:
            sr.main(["--checkpoint", str(tmp_path / "no_model"), *case, "--output", str(tmp_path / "result.png")])
        assert exit_info.value.code == 2
        assert reason in capsys.readouterr().err
    assert not (tmp_path / "result.png").exists()


@pytest.fixture(scope="module")
def caption_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captioned")
    Image.fromarray(lr_crop("astronaut", *SMALL, 120, 200)).save(folder / "x.png")
    Image.fromarray(lr_crop("coffee", *SMALL, 250, 300)).save(folder / "y.png")
    return folder


def _run(bundle_dir, inputs, out, *extra):
    assert sr.main(["--checkpoint", bundle_dir, "--input", str(inputs), "--output", str(out), "--batch_size", "2",
                    *extra]) == 0
    return {name: read_png(out / f"{name}.png") for name in ("x", "y")}


def test_cli_captions_with_text_encoders(tmp_path_factory, caption_inputs, tmp_path):
    text_root = write_tiny_sd35_root(str(tmp_path_factory.mktemp("sd35_text")))
    bundle_dir = make_bundle(tmp_path / "captioned_bundle", seed=5, text_encoders_dir=text_root)
    captions_json = tmp_path / "captions.json"
    captions_json.write_text(json.dumps({"x.png": "a photo of a green tree"}))
    captions_dir = tmp_path / "captions"
    captions_dir.mkdir()
    (captions_dir / "x.txt").write_text("a photo of a green tree\n")

    plain = _run(bundle_dir, caption_inputs, tmp_path / "plain")
    from_json = _run(bundle_dir, caption_inputs, tmp_path / "json", "--captions", str(captions_json))
    from_txt = _run(bundle_dir, caption_inputs, tmp_path / "txt", "--captions", str(captions_dir))
    assert np.mean(from_json["x"] != plain["x"]) > 0.01  # the caption conditions x
    np.testing.assert_array_equal(from_json["y"], plain["y"])  # y has no caption: NULL embeddings
    for name in ("x", "y"):
        np.testing.assert_array_equal(from_txt[name], from_json[name])


def test_cli_caption_without_text_encoders_is_an_error(student_bundle, caption_inputs, tmp_path, capsys, caplog):
    """Asked-for captions cannot be honoured: one error line naming the bundle, before any image is processed. The
    library SRPipeline, for Python callers, warns once and uses the NULL embeddings instead."""
    captions_json = tmp_path / "captions.json"
    captions_json.write_text(json.dumps({"x.png": "a photo of a dog"}))
    for flag, value in (("--caption", "a photo of a dog"), ("--captions", str(captions_json))):
        out = tmp_path / flag.strip("-")
        assert sr.main(["--checkpoint", student_bundle, "--input", str(caption_inputs), "--output", str(out),
                        flag, value]) == 2
        err = capsys.readouterr().err
        assert f"{flag} needs text encoders" in err and student_bundle in err and len(err.strip().splitlines()) == 1
        assert not any(out.iterdir())

    pipeline = SRPipeline.from_checkpoint(student_bundle, batch_size=2)
    images = [read_png(caption_inputs / f"{name}.png") for name in ("x", "y")]
    with caplog.at_level(logging.WARNING):
        captioned = pipeline(images, caption="a photo of a dog")
    assert sum("text encoders" in r.getMessage() for r in caplog.records) == 1
    for with_caption, plain in zip(captioned, pipeline(images)):
        np.testing.assert_array_equal(with_caption, plain)


def test_cli_never_writes_where_it_reads(input_dir, tmp_path, capsys):
    """The output folder is compared with the input folder by real path: a symlink to it, a path through `..`, a
    single file's own folder and a seed folder are refused before anything loads, and so is an output file that is
    the input file; no input changes."""
    before = {p.name: p.read_bytes() for p in input_dir.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(input_dir)
    seed_folder = tmp_path / "out" / "seed1"
    seed_folder.mkdir(parents=True)
    cases = [("--input", str(input_dir), "--output", str(link)),
             ("--input", str(input_dir), "--output", str(input_dir / ".." / input_dir.name)),
             ("--input", str(input_dir / "a_rgb.png"), "--output", str(input_dir)),
             ("--input", str(link / "a_rgb.png"), "--output", str(input_dir)),
             ("--input", str(seed_folder), "--output", str(tmp_path / "out"), "--seeds", "1,2"),
             ("--input", str(link / "a_rgb.png"), "--output", str(input_dir / "a_rgb.png"))]
    for case in cases:
        with pytest.raises(SystemExit):
            sr.main(["--checkpoint", str(tmp_path / "no_model"), *case])
        assert "is the input" in capsys.readouterr().err, case
    assert {p.name: p.read_bytes() for p in input_dir.iterdir()} == before


def test_cli_bucket_model_inputs_and_outputs(student_bundle, input_dir, tmp_path, bucket_dir, capsys):
    """A gs:// bundle, input folder and output folder give the local run's output files byte for byte, with the same
    corrupt input skipped (and a bucket sub-folder named); --skip_existing sees the bucket's outputs; a gs:// input
    file to a gs:// output file; input and output URLs are compared before anything loads; a missing bucket is one
    error line."""
    local_inputs = tmp_path / "lr"
    local_inputs.mkdir()
    for name in ("a_rgb.png", "b_gray.png", "f_corrupt.png", "notes.txt"):
        (local_inputs / name).write_bytes((input_dir / name).read_bytes())
    inputs, bundle, out = f"{bucket_dir}/lr", f"{bucket_dir}/bundle", f"{bucket_dir}/sr"
    files.copy_tree(local_inputs, inputs)
    files.write_bytes(f"{inputs}/sub/c_gray16.png", (input_dir / "c_gray16.png").read_bytes())
    files.copy_tree(student_bundle, bundle)
    options = ["--batch_size", "2", "--seeds", "7"]
    assert sr.main(["--checkpoint", student_bundle, "--input", str(local_inputs), "--output", str(tmp_path / "sr"),
                    *options]) == 0
    capsys.readouterr()
    assert sr.main(["--checkpoint", bundle, "--input", inputs, "--output", out, *options]) == 0
    captured = capsys.readouterr()
    assert f"wrote 2 images to {out} (3 image files x 1 seeds); skipped 2" in captured.out
    assert "skipped f_corrupt.png: " in captured.err and "skipped sub: a directory" in captured.err
    assert files.listdir(out) == ["a_rgb.png", "b_gray.png"]
    for name in ("a_rgb.png", "b_gray.png"):
        assert files.read_bytes(f"{out}/{name}") == (tmp_path / "sr" / name).read_bytes(), name

    # Both outputs found in the bucket; status 1 as locally: nothing written and the corrupt input not done.
    assert sr.main(["--checkpoint", bundle, "--input", inputs, "--output", out, *options, "--skip_existing"]) == 1
    assert "wrote 0 images" in capsys.readouterr().out and files.listdir(out) == ["a_rgb.png", "b_gray.png"]

    result = f"{bucket_dir}/single/result.jpg"
    assert sr.main(["--checkpoint", bundle, "--input", f"{inputs}/a_rgb.png", "--output", result, *options]) == 0
    with Image.open(io.BytesIO(files.read_bytes(result))) as image:
        assert image.format == "JPEG" and image.size == (4 * SMALL[1], 4 * SMALL[0])
    assert files.listdir(f"{bucket_dir}/single") == ["result.jpg"]  # no .partial, no probe file left

    for case in [("--input", inputs, "--output", f"{inputs}/"),
                 ("--input", f"{inputs}/a_rgb.png", "--output", inputs),
                 ("--input", f"{inputs}/a_rgb.png", "--output", f"{inputs}/a_rgb.png")]:
        with pytest.raises(SystemExit):
            sr.main(["--checkpoint", str(tmp_path / "no_model"), *case])
        assert "is the input" in capsys.readouterr().err, case
    for case, reason in [(("--input", inputs, "--output", "gs://smfsr-no-such-bucket/out"),
                          "cannot write in the output location gs://smfsr-no-such-bucket/out: the bucket "
                          "smfsr-no-such-bucket does not exist"),
                         (("--input", f"{bucket_dir}/missing", "--output", out),
                          f"--input {bucket_dir}/missing: no such file or directory")]:
        assert sr.main(["--checkpoint", str(tmp_path / "no_model"), *case]) == 2
        assert capsys.readouterr().err == f"error: {reason}\n"

"""evaluate.py directory mode, the metric registry and the OSEDiff log format; directory mode on a bucket."""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from smfsr_jax.convert.converted_dir import save_converted
from smfsr_jax.convert.lpips import lin_shapes, params_from_state_dicts, trunk_shapes
from smfsr_jax.core import errors, files
from smfsr_jax.evaluation import psnr_ssim
from smfsr_jax.evaluation.directory import PairingError, evaluate_directory, image_size, pair_images
from smfsr_jax.evaluation.io import read_rgb8
from smfsr_jax.evaluation.metrics import REGISTRY, Metric, MetricSpec, MissingWeightsError, build_metrics
from smfsr_jax.evaluation.osediff_log import format_log, parse_log, read_log
from smfsr_jax.core.files import check_writable
from smfsr_jax.evaluation.results import check_results_path, write_results
from smfsr_jax.models.lpips import LPIPSConfig
from tests.conftest import REPO, shared_path
from tools.make_metric_goldens import random_state_dict

NAMES = ("b_10.png", "b_2.png", "a.png")  # sorted(): a.png, b_10.png, b_2.png


def _evaluate_py(*args):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _one_error_line(done, status: int) -> str:
    """The message of a command that failed with `status` and printed one `error:` line, no traceback."""
    assert done.returncode == status, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    return line


def _write_pairs(root, rng, names=NAMES, size=(24, 32)):
    sr_dir, hr_dir = root / "sr", root / "hr"
    sr_dir.mkdir()
    hr_dir.mkdir()
    for name in names:
        hr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        sr = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(hr_dir / name), hr[..., ::-1])
        cv2.imwrite(str(sr_dir / name), sr[..., ::-1])
    return sr_dir, hr_dir


def test_results_structure_and_files(tmp_path):
    rng = np.random.default_rng(0)
    sr_dir, hr_dir = _write_pairs(tmp_path, rng)
    # A differently sized pair and an RGBA SR image (alpha dropped).
    big_hr = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    cv2.imwrite(str(hr_dir / "c.png"), big_hr[..., ::-1])
    cv2.imwrite(str(sr_dir / "c.png"), np.concatenate([big_hr[..., ::-1], np.full((40, 36, 1), 7, np.uint8)], -1))
    (sr_dir / "notes.txt").write_text("not an image")

    metrics = build_metrics(["ssim", "psnr"])
    assert list(metrics) == ["psnr", "ssim"]  # registry (log) order
    results = evaluate_directory(str(sr_dir), str(hr_dir), metrics, batch_size=2, show_progress=False)
    names = ["a.png", "b_10.png", "b_2.png", "c.png"]
    assert list(results["per_image"]) == names
    assert results["count"] == 4 and results["skipped"] == {} and results["metrics"] == ["psnr", "ssim"]
    for name in names:
        sr, hr = read_rgb8(sr_dir / name)[None], read_rgb8(hr_dir / name)[None]
        expected = {"psnr": psnr_ssim.psnr(sr, hr)[0], "ssim": psnr_ssim.ssim(sr, hr)[0]}
        assert results["per_image"][name] == pytest.approx(expected, rel=1e-12)
    assert results["per_image"]["c.png"]["psnr"] == pytest.approx(80.0)
    assert results["mean"]["psnr"] == pytest.approx(np.mean([results["per_image"][n]["psnr"] for n in names]))

    paths = write_results(results, str(tmp_path / "out" / "scores.json"))
    assert [os.path.basename(p) for p in paths] == ["scores.json", "scores.csv", "scores.md", "scores.log"]
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == results
    with open(tmp_path / "out" / "scores.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "psnr", "ssim"]
    assert [r[0] for r in rows[1:]] == names
    assert float(rows[1][1]) == results["per_image"]["a.png"]["psnr"]
    markdown = (tmp_path / "out" / "scores.md").read_text()
    assert "| image | PSNR ↑ | SSIM ↑ |" in markdown
    assert f"| **mean** (4) | {results['mean']['psnr']:.4f} | {results['mean']['ssim']:.4f} |" in markdown
    log = read_log(tmp_path / "out" / "scores.log")
    assert list(log.images) == names
    assert log.images["a.png"].metrics == {"PSNR": round(results["per_image"]["a.png"]["psnr"], 6),
                                           "SSIM": round(results["per_image"]["a.png"]["ssim"], 6)}
    assert log.summaries[0].means == {"PSNR": round(results["mean"]["psnr"], 4),
                                      "SSIM": round(results["mean"]["ssim"], 4)}


def test_corrupt_image_is_skipped_counted_and_named(tmp_path):
    sr_dir, hr_dir = _write_pairs(tmp_path, np.random.default_rng(1))
    (sr_dir / "b_2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    results = evaluate_directory(str(sr_dir), str(hr_dir), build_metrics(["psnr"]), show_progress=False)
    assert results["count"] == 2 and list(results["per_image"]) == ["a.png", "b_10.png"]
    assert list(results["skipped"]) == ["b_2.png"] and "not a readable image" in results["skipped"]["b_2.png"]
    assert results["mean"]["psnr"] == pytest.approx(np.mean([v["psnr"] for v in results["per_image"].values()]))
    write_results(results, str(tmp_path / "r.json"))
    assert "Skipped sr/b_2.png" in (tmp_path / "r.log").read_text()
    assert "- b_2.png: " in (tmp_path / "r.md").read_text()


def test_mismatched_names_are_named(tmp_path):
    sr_dir, hr_dir = _write_pairs(tmp_path, np.random.default_rng(2))
    os.rename(sr_dir / "a.png", sr_dir / "a_sr.png")
    with pytest.raises(ValueError, match=r"only in .*sr: a_sr\.png; only in .*hr: a\.png"):
        evaluate_directory(str(sr_dir), str(hr_dir), build_metrics(["psnr"]), show_progress=False)
    with pytest.raises(ValueError, match="need --hr_dir"):
        evaluate_directory(str(sr_dir), None, build_metrics(["psnr"]), show_progress=False)


def test_no_reference_metric_needs_no_hr_dir(tmp_path):
    sr_dir, _ = _write_pairs(tmp_path, np.random.default_rng(3))
    spec = MetricSpec("mean_level", "MEAN", full_reference=False, lower_better=False, loader="unused")
    metric = Metric(spec, lambda sr: sr.reshape(len(sr), -1).mean(axis=1))
    results = evaluate_directory(str(sr_dir), None, {"mean_level": metric}, show_progress=False)
    assert results["hr_dir"] is None and results["count"] == 3
    assert results["per_image"]["a.png"]["mean_level"] == pytest.approx(read_rgb8(sr_dir / "a.png").mean())


def test_missing_weights_name_the_flag(tmp_path):
    with pytest.raises(MissingWeightsError, match="^metric lpips needs weights: pass --lpips_weights"):
        build_metrics(["psnr", "lpips"])
    with pytest.raises(MissingWeightsError, match=r"--musiq_weights.*DIR/musiq"):
        build_metrics(["musiq"], weights_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown metric.*psnrr"):
        build_metrics(["psnrr"])
    assert {s.weights_flag for s in REGISTRY.values() if s.needs_weights} == {
        "lpips_weights", "clipiqa_weights", "musiq_weights", "maniqa_weights"}
    # Every missing one at once, each with its flag; those that have weights are not named.
    (tmp_path / "musiq").mkdir()
    with pytest.raises(MissingWeightsError) as info:
        build_metrics(["maniqa", "psnr", "musiq", "lpips", "clipiqa"], weights_dir=str(tmp_path))
    message = str(info.value)
    assert message.startswith("metrics lpips, clipiqa, maniqa need weights: lpips: pass --lpips_weights")
    for name in ("lpips", "clipiqa", "maniqa"):
        assert f"--{name}_weights" in message and f"(no {tmp_path / name} either)" in message
    assert "musiq" not in message

    sr_dir, hr_dir = _write_pairs(tmp_path, np.random.default_rng(4))
    done = _evaluate_py(f"--sr_dir={sr_dir}", f"--hr_dir={hr_dir}", "--metrics=psnr,lpips,maniqa",
                        f"--out={tmp_path / 'r.json'}")
    line = _one_error_line(done, 2)
    assert line.startswith("error: metrics lpips, maniqa need weights: lpips: pass --lpips_weights")
    assert "maniqa: pass --maniqa_weights" in line
    assert not (tmp_path / "r.json").exists()
    # --debug: the traceback of the same error (absl's status for an uncaught exception).
    done = _evaluate_py(f"--sr_dir={sr_dir}", f"--hr_dir={hr_dir}", "--metrics=psnr,lpips",
                        f"--out={tmp_path / 'r.json'}", "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "MissingWeightsError" in done.stderr


def _resize_sr(sr_dir, name, size):
    image = read_rgb8(sr_dir / name)
    cv2.imwrite(str(sr_dir / name), cv2.resize(image, size)[..., ::-1])


def test_mismatched_sizes_stop_before_scoring_or_are_skipped(tmp_path):
    sr_dir, hr_dir = _write_pairs(tmp_path, np.random.default_rng(5), names=("a.png", "b.png", "c.png", "d.png"))
    _resize_sr(sr_dir, "b.png", (64, 48))
    _resize_sr(sr_dir, "d.png", (30, 24))
    (sr_dir / "c.png").write_bytes(b"not an image")  # no header: left to the reading, which skips it
    calls = []
    metrics = {"psnr": Metric(REGISTRY["psnr"], lambda sr, hr: calls.append(len(sr)) or psnr_ssim.psnr(sr, hr))}

    expected = (f"2 SR image(s) in {sr_dir} differ in size from their reference in {hr_dir}: "
                "b.png (SR 64x48, reference 32x24); d.png (SR 30x24, reference 32x24); "
                "full-reference metrics need equal sizes (--skip_mismatched scores the others)")
    with pytest.raises(PairingError) as info:
        evaluate_directory(str(sr_dir), str(hr_dir), metrics, show_progress=False)
    assert str(info.value) == expected and isinstance(info.value, errors.UserError)
    assert calls == []  # nothing was scored

    names, skipped = pair_images(str(sr_dir), str(hr_dir), need_reference=True, skip_mismatched=True)
    assert names == ["a.png", "c.png"]
    assert skipped == {"b.png": "SR 64x48, reference 32x24: sizes differ",
                       "d.png": "SR 30x24, reference 32x24: sizes differ"}
    assert pair_images(str(sr_dir), None, need_reference=False) == (["a.png", "b.png", "c.png", "d.png"], {})
    results = evaluate_directory(str(sr_dir), str(hr_dir), metrics, show_progress=False, names=names,
                                 skipped=skipped)
    assert results["count"] == 1 and list(results["per_image"]) == ["a.png"]
    assert list(results["skipped"]) == ["b.png", "c.png", "d.png"]
    write_results(results, str(tmp_path / "r.json"))
    assert "- d.png: SR 30x24, reference 32x24: sizes differ" in (tmp_path / "r.md").read_text()

    # The command line: stops with the list (status 2), or skips, counts and names them.
    out = tmp_path / "out" / "r.json"
    done = _evaluate_py(f"--sr_dir={sr_dir}", f"--hr_dir={hr_dir}", "--metrics=psnr", f"--out={out}")
    assert _one_error_line(done, 2) == f"error: {expected}"
    assert not out.exists()
    done = _evaluate_py(f"--sr_dir={sr_dir}", f"--hr_dir={hr_dir}", "--metrics=psnr", f"--out={out}",
                        "--skip_mismatched")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 images, 3 skipped (b.png, c.png, d.png) | PSNR: " in done.stdout
    assert list(json.loads(out.read_text())["skipped"]) == ["b.png", "c.png", "d.png"]


def test_header_sizes_follow_the_exif_orientation(tmp_path):
    """cv2 (read_rgb8) turns images by their EXIF orientation; the header sizes must say the same."""
    pixels = np.zeros((10, 20, 3), np.uint8)
    for ext in ("png", "jpg", "webp"):
        for orientation in (1, 6):
            path = tmp_path / f"o{orientation}.{ext}"
            exif = Image.Exif()
            exif[0x0112] = orientation
            Image.fromarray(pixels).save(path, exif=exif.tobytes())
            height, width = read_rgb8(path).shape[:2]
            assert image_size(str(path)) == (width, height) == ((10, 20) if orientation == 6 else (20, 10))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert image_size(str(tmp_path / "broken.png")) is None


def test_unwritable_output_fails_first(tmp_path):
    with pytest.raises(errors.UserError, match=r"^cannot create the output directory /proc/smfsr-x/out "
                                               r"\(/proc/smfsr-x\): No such file or directory$"):
        check_writable("/proc/smfsr-x/out")
    with pytest.raises(errors.UserError, match="^cannot create the output directory /sys/smfsr-x: Operation not "
                                               "permitted$"):
        check_results_path("/sys/smfsr-x/r.json")
    with pytest.raises(errors.UserError, match="^cannot write in the output directory /sys: Permission denied$"):
        check_writable("/sys")
    (tmp_path / "r.md").mkdir()
    with pytest.raises(errors.UserError, match=f"^{tmp_path / 'r.md'} is a directory; --out takes the path"):
        check_results_path(str(tmp_path / "r.json"))
    check_results_path(str(tmp_path / "new" / "r.json"))
    assert os.listdir(tmp_path / "new") == []  # created, and the probe file deleted

    sr_dir, hr_dir = _write_pairs(tmp_path, np.random.default_rng(6))
    done = _evaluate_py(f"--sr_dir={sr_dir}", f"--hr_dir={hr_dir}", "--metrics=psnr,lpips",
                        "--out=/sys/smfsr-x/r.json")  # reported before the missing LPIPS weights
    assert _one_error_line(done, 2) == "error: cannot create the output directory /sys/smfsr-x: Operation not permitted"


def test_a_failed_write_names_the_file_and_what_was_written(tmp_path):
    sr_dir, hr_dir = _write_pairs(tmp_path, np.random.default_rng(7))
    results = evaluate_directory(str(sr_dir), str(hr_dir), build_metrics(["psnr"]), show_progress=False)
    (tmp_path / "r.md").mkdir()  # appeared after the check
    with pytest.raises(errors.RunFailure) as info:
        write_results(results, str(tmp_path / "r.json"))
    assert str(info.value) == (f"{tmp_path / 'r.md'}: could not write it: Is a directory; written before it: "
                               f"{tmp_path / 'r.json'}, {tmp_path / 'r.csv'}")

    if not (os.path.exists("/dev/full") and os.access("/dev", os.W_OK)):
        pytest.skip("needs /dev/full and a writable /dev (the check writes a probe file there)")
    done = _evaluate_py(f"--sr_dir={sr_dir}", f"--hr_dir={hr_dir}", "--metrics=psnr", "--out=/dev/full")
    assert _one_error_line(done, 1) == ("error: /dev/full: could not write it: No space left on device; "
                                        "written before it: none")
    assert f"3 images, 0 skipped | PSNR: {results['mean']['psnr']:.4f}" in done.stdout  # the scores, printed first


def test_osediff_log_round_trip_and_tolerance():
    text = shared_path("data", "drealsr", "results_osediff", "metrics", "test_METRICS_241023-173607.log").read_text()
    log = parse_log(text)
    assert format_log(log) == text
    assert len(log.images) == 93
    first = log.images["Canon_10_x1.png"]
    assert first.path == "results_osediff/Canon_10_x1.png" and first.runtime == 1.13
    assert list(first.metrics) == ["PSNR", "SSIM", "LPIPS", "DISTS", "CLIPIQA", "NIQE", "MUSIQ", "MANIQA"]
    assert first.metrics["MANIQA"] == 0.561399
    (summary,) = log.summaries
    assert summary.directory == "results_osediff" and summary.fid == 135.296586
    assert summary.means["MUSIQ"] == 64.6537

    # Other metric sets, no runtime, no FID: parsed, and written back unchanged.
    other = ("26-01-02 03:04:05.678 - INFO: out/x.png | PSNR: 20.000000; FOO-2: 1.500000\n"
             "26-01-02 03:04:05.679 - INFO: \n===== Average Metrics for [out] =====\nPSNR: 20.0000; FOO-2: 1.5000\n")
    parsed = parse_log(other)
    assert parsed.images["x.png"].metrics == {"PSNR": 20.0, "FOO-2": 1.5} and parsed.images["x.png"].runtime is None
    assert parsed.summaries[0].means == {"PSNR": 20.0, "FOO-2": 1.5} and parsed.summaries[0].fid is None
    assert format_log(parsed) == other


def test_directory_mode_on_buckets(tmp_path, bucket_dir):
    """SR and HR folders, LPIPS weights (--weights_dir) and --out in a bucket: the local run's scores, the same
    unreadable image skipped, the results files uploaded whole; an --out in a missing bucket fails first."""
    sr_dir, hr_dir = _write_pairs(tmp_path, np.random.default_rng(8), size=(64, 96))  # large enough for LPIPS-Alex
    (sr_dir / "b_2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (sr_dir / "notes.txt").write_text("not an image")
    config = LPIPSConfig("alex")
    params = params_from_state_dicts(config, random_state_dict(trunk_shapes(config), 0),
                                     random_state_dict(lin_shapes(config), 0))
    save_converted(str(tmp_path / "weights" / "lpips"), dataclasses.asdict(config), params,
                   meta={"converter": "lpips"})
    for name in ("sr", "hr", "weights"):
        files.copy_tree(tmp_path / name, f"{bucket_dir}/{name}")
    metrics = build_metrics(["psnr", "ssim", "lpips"], weights_dir=str(tmp_path / "weights"))
    local = evaluate_directory(str(sr_dir), str(hr_dir), metrics, show_progress=False)
    write_results(local, str(tmp_path / "local.json"))

    out = f"{bucket_dir}/out/r.json"
    done = _evaluate_py(f"--sr_dir={bucket_dir}/sr", f"--hr_dir={bucket_dir}/hr", "--metrics=psnr,ssim,lpips",
                        f"--weights_dir={bucket_dir}/weights", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 images, 1 skipped (b_2.png)" in done.stdout
    remote = json.loads(files.read_text(out))
    assert remote["per_image"] == local["per_image"] and remote["mean"] == local["mean"]
    assert remote["skipped"] == {"b_2.png": f"{bucket_dir}/sr/b_2.png: not a readable image"}
    assert (remote["sr_dir"], remote["hr_dir"]) == (f"{bucket_dir}/sr", f"{bucket_dir}/hr")
    assert files.read_text(f"{bucket_dir}/out/r.csv") == (tmp_path / "local.csv").read_text()
    assert files.listdir(f"{bucket_dir}/out") == ["r.csv", "r.json", "r.log", "r.md"]  # no probe file left
    assert "Skipped sr/b_2.png" in files.read_text(f"{bucket_dir}/out/r.log")

    with pytest.raises(errors.UserError, match="^cannot write in the output location gs://smfsr-no-such-bucket: the "
                                               "bucket smfsr-no-such-bucket does not exist$"):
        check_results_path("gs://smfsr-no-such-bucket/r.json")
    with pytest.raises(FileNotFoundError, match=f"{bucket_dir}/missing: no such directory"):
        pair_images(f"{bucket_dir}/missing", None, need_reference=False)

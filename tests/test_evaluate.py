"""evaluate.py directory mode, the metric registry and the OSEDiff log format."""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from smfsr_jax.evaluation import psnr_ssim
from smfsr_jax.evaluation.directory import evaluate_directory
from smfsr_jax.evaluation.io import read_rgb8
from smfsr_jax.evaluation.metrics import REGISTRY, Metric, MetricSpec, MissingWeightsError, build_metrics
from smfsr_jax.evaluation.osediff_log import format_log, parse_log, read_log
from smfsr_jax.evaluation.results import write_results
from tests.conftest import REPO, shared_path

NAMES = ("b_10.png", "b_2.png", "a.png")  # sorted(): a.png, b_10.png, b_2.png


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
    with pytest.raises(MissingWeightsError, match="--lpips_weights"):
        build_metrics(["psnr", "lpips"])
    with pytest.raises(MissingWeightsError, match=r"--musiq_weights.*DIR/musiq"):
        build_metrics(["musiq"], weights_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown metric.*psnrr"):
        build_metrics(["psnrr"])
    assert {s.weights_flag for s in REGISTRY.values() if s.needs_weights} == {
        "lpips_weights", "clipiqa_weights", "musiq_weights", "maniqa_weights"}

    sr_dir, hr_dir = _write_pairs(tmp_path, np.random.default_rng(4))
    command = [sys.executable, str(REPO / "evaluate.py"), f"--sr_dir={sr_dir}", f"--hr_dir={hr_dir}",
               "--metrics=psnr,lpips", f"--out={tmp_path / 'r.json'}"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 1
    assert "metric lpips needs weights: pass --lpips_weights" in done.stderr
    assert not (tmp_path / "r.json").exists()


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

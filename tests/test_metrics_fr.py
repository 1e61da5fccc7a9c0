"""PSNR / SSIM: OSEDiff's DRealSR log reproduced per image through evaluate.py, pyiqa goldens, filtering."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from smfsr_jax.core.images import luma
from smfsr_jax.evaluation import psnr_ssim
from smfsr_jax.evaluation.osediff_log import read_log
from tests.conftest import REPO, shared_path
from tools.make_metric_goldens import random_image_pairs

GOLDENS = pathlib.Path(__file__).parent / "golden" / "lpips_psnr_ssim.json"
OSEDIFF_LOG = ("data", "drealsr", "results_osediff", "metrics", "test_METRICS_241023-173607.log")
# The protocol's acceptance bounds (docs/design.md#psnr-and-ssim); the log itself is rounded to 6 decimals.
MAX_PSNR_ERROR = 5e-5
MAX_SSIM_ERROR = 5e-6


def test_drealsr_log_reproduced_through_evaluate_py(tmp_path):
    """`python evaluate.py` on OSEDiff's 93 DRealSR outputs gives the logged PSNR/SSIM for every image."""
    log = read_log(shared_path(*OSEDIFF_LOG))
    sr_dir = shared_path("data", "drealsr", "results_osediff")
    hr_dir = shared_path("data", "drealsr", "test_HR")
    out = tmp_path / "drealsr.json"
    command = [sys.executable, str(REPO / "evaluate.py"), f"--sr_dir={sr_dir}", f"--hr_dir={hr_dir}",
               "--metrics=psnr,ssim", f"--out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    assert "PSNR: 27.9243; SSIM: 0.7835" in done.stdout

    results = json.loads(out.read_text())
    logged = log.images
    assert list(results["per_image"]) == sorted(logged) and len(logged) == 93
    psnr_error = max(abs(results["per_image"][n]["psnr"] - logged[n].metrics["PSNR"]) for n in logged)
    ssim_error = max(abs(results["per_image"][n]["ssim"] - logged[n].metrics["SSIM"]) for n in logged)
    print(f"max |dPSNR| = {psnr_error:.2e} dB, max |dSSIM| = {ssim_error:.2e} over {len(logged)} images")
    assert psnr_error <= MAX_PSNR_ERROR
    assert ssim_error <= MAX_SSIM_ERROR
    summary = log.summaries[0].means
    assert f"{results['mean']['psnr']:.4f}" == f"{summary['PSNR']:.4f}" == "27.9243"
    assert f"{results['mean']['ssim']:.4f}" == f"{summary['SSIM']:.4f}" == "0.7835"

    # Our OSEDiff-format log carries the same numbers (6 decimals) and means (4 decimals).
    ours = read_log(tmp_path / "drealsr.log")
    assert list(ours.images) == list(results["per_image"])
    for name, line in ours.images.items():
        assert line.metrics == {"PSNR": round(results["per_image"][name]["psnr"], 6),
                                "SSIM": round(results["per_image"][name]["ssim"], 6)}
    assert ours.summaries[0].means == {"PSNR": 27.9243, "SSIM": 0.7835}


def test_matches_pyiqa_goldens():
    """pyiqa psnr/ssim (test_y_channel, ycbcr) on random non-square pairs: unrelated, perturbed, identical."""
    golden = json.loads(GOLDENS.read_text())["psnr_ssim"]
    sr, hr = random_image_pairs(golden["seed"], *golden["image_size"])
    # pyiqa's PSNR runs in float32 (~1e-5 dB); its SSIM in float64.
    np.testing.assert_allclose(psnr_ssim.psnr(sr, hr), golden["psnr"], rtol=0, atol=5e-5)
    np.testing.assert_allclose(psnr_ssim.ssim(sr, hr), golden["ssim"], rtol=0, atol=1e-9)
    assert psnr_ssim.psnr(sr, hr)[2] == pytest.approx(80.0)
    # float [0, 1] input is the same as uint8.
    np.testing.assert_array_equal(psnr_ssim.ssim(sr / np.float32(255), hr / np.float32(255)),
                                  psnr_ssim.ssim(sr, hr))


def test_fft_filter_equals_direct_valid_correlation():
    rng = np.random.default_rng(0)
    images = rng.integers(16, 236, (2, 23, 31)).astype(np.float64)
    window = psnr_ssim.gaussian_window()
    direct = np.zeros((2, 13, 21))
    for i in range(11):
        for j in range(11):
            direct += window[i, j] * images[:, i:i + 13, j:j + 21]
    with jax.enable_x64(True):
        got = np.asarray(psnr_ssim._filter_valid(images, window))
    np.testing.assert_allclose(got, direct, rtol=0, atol=1e-10)


def test_gaussian_window_and_luma():
    window = psnr_ssim.gaussian_window()
    assert window.shape == (11, 11) and window.dtype == np.float64
    assert np.all(window.astype(np.float32) == window)  # passed through float32, as pyiqa
    assert abs(window.sum() - 1) < 1e-6
    rgb = np.array([[[[0, 0, 0], [255, 255, 255]]]], np.float32) / 255
    np.testing.assert_allclose(np.asarray(luma(rgb)) * 255, [[[16.0, 235.0]]], atol=1e-4)


def test_bad_inputs():
    image = np.zeros((1, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="one shape"):
        psnr_ssim.psnr(image, np.zeros((1, 16, 17, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 11 pixels"):
        psnr_ssim.ssim(image[:, :10], image[:, :10])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        psnr_ssim.psnr(image.astype(np.float32) + 2, image)

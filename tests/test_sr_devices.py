"""Devices and processes: `python -m smfsr_jax.sr` on 8 (fake CPU) devices and as 2 jax.distributed processes, and
`evaluate.py --checkpoint` as 2 processes, give a one-device, one-process run's outputs and results files.

The 8-device and 2-process runs are subprocesses (XLA_FLAGS must be set before JAX starts); both sr runs take
--batch_size 1, so calls of 8 (and 2) images pad the last batch of each image size."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from smfsr_jax import sr
from smfsr_jax.convert.converted_dir import save_converted
from smfsr_jax.convert.lpips import lin_shapes, params_from_state_dicts, trunk_shapes
from smfsr_jax.data import build
from smfsr_jax.evaluation import runner
from smfsr_jax.evaluation.metrics import build_metrics
from smfsr_jax.models.lpips import LPIPSConfig
from smfsr_jax.sampling.settings import SRSettings
from tests.conftest import REPO
from tests.processes import free_port
from tests.test_sampling import _assert_same_up_to_rounding, lr_crop
from tools.make_metric_goldens import random_state_dict

SEED = 3
# Six inputs: five 32x32 (one preprocessed size) and one 32x40, so each size pads its last call.
SIZES = {"a": (32, 32), "b": (32, 32), "c": (32, 32), "d": (32, 32), "e": (32, 32), "f": (32, 40)}
DATASET = "paired_sr/custom"
BENCHMARK_NAMES = ("astronaut", "camera", "chelsea", "coffee", "rocket")


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lr")
    for i, (stem, (height, width)) in enumerate(SIZES.items()):
        Image.fromarray(lr_crop("astronaut", height, width, 40 * i, 30 * i)).save(folder / f"{stem}.png")
    return folder


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory):
    """paired_sr/custom with 5 pairs: 128-pixel crops of scikit-image photographs and their 32-pixel LR."""
    manual = tmp_path_factory.mktemp("pairs")
    (manual / "test_LR").mkdir()
    (manual / "test_HR").mkdir()
    for name in BENCHMARK_NAMES:
        hr = lr_crop(name, 128, 128, 100, 100)
        lr = cv2.resize(hr, (32, 32), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(manual / "test_HR" / f"{name}.png"), hr[..., ::-1])
        cv2.imwrite(str(manual / "test_LR" / f"{name}.png"), lr[..., ::-1])
    data_dir = tmp_path_factory.mktemp("benchmark_tfds")
    build.build(DATASET, str(data_dir), str(manual))
    return str(data_dir)


def _start(args, devices: int):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(procs) -> list[str]:
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(out[-3000:] for out in outs)
    return outs


def _processes(args, count: int = 2, devices: int = 2) -> list[str]:
    """`args` run as `count` jax.distributed processes with `devices` CPU devices each; their outputs."""
    address = f"localhost:{free_port()}"
    return _finish([_start([*args, "--num_processes", str(count), "--process_id", str(i), "--coordinator_address",
                            address], devices) for i in range(count)])


def _read(folder) -> dict[str, np.ndarray]:
    return {path.stem: np.asarray(Image.open(path)) for path in sorted(folder.iterdir())}


def _assert_same_images(ours: dict, reference: dict):
    assert sorted(ours) == sorted(reference)
    for name in reference:
        assert ours[name].shape == reference[name].shape, name
        _assert_same_up_to_rounding(ours[name], reference[name])


def test_sr_on_eight_devices_and_two_processes_matches_one_device(student_bundle, input_dir, tmp_path):
    command = ["-m", "smfsr_jax.sr", "--checkpoint", student_bundle, "--input", str(input_dir), "--seeds", str(SEED),
               "--batch_size", "1"]
    assert sr.main([*command[2:], "--output", str(tmp_path / "one")]) == 0  # this process: one device
    reference = _read(tmp_path / "one")
    assert {k: v.shape[:2] for k, v in reference.items()} == {k: (4 * h, 4 * w) for k, (h, w) in SIZES.items()}

    eight = _start([*command, "--output", str(tmp_path / "eight")], devices=8)
    two = _processes([*command, "--output", str(tmp_path / "two")])  # also while the 8-device run compiles
    [out8] = _finish([eight])
    assert "wrote 6 images" in out8
    _assert_same_images(_read(tmp_path / "eight"), reference)
    # Process p took the files k with k % 2 == p (a, c, e and b, d, f); the union is the one-process output.
    assert "wrote 3 images" in two[0] and "process 0 of 2: 3 of the 6 image files" in two[0]
    assert "process 1 of 2: 3 of the 6 image files" in two[1]
    _assert_same_images(_read(tmp_path / "two"), reference)


def _without_timings(root, name) -> str:
    """The file root/name with root written as OUT and without timings."""
    path = root / name
    text = path.read_text().replace(str(root), "OUT")
    if path.suffix == ".json":
        results = json.loads(text)
        for key in ("runtime_s", "wall_s"):
            results.pop(key, None)
        return json.dumps(results, indent=2)
    if path.suffix == ".log":  # timestamps and per-image runtimes
        return re.sub(r"^\S+ \S+ - |(?: \| Runtime: \S+ sec)", "", text, flags=re.MULTILINE)
    return text


def test_checkpoint_mode_on_two_processes_matches_one_process(student_bundle, benchmark_dir, tmp_path):
    """Seeds 1 and 2 (Tables 1, 3 and 4, random LPIPS-Alex weights), 5 records split 3 + 2, --batch_size 2."""
    config = LPIPSConfig("alex")
    params = params_from_state_dicts(config, random_state_dict(trunk_shapes(config), 0),
                                     random_state_dict(lin_shapes(config), 0))
    lpips = str(tmp_path / "lpips")
    save_converted(lpips, dataclasses.asdict(config), params, meta={"converter": "lpips"})
    one, two = tmp_path / "one", tmp_path / "two"
    metrics = build_metrics(["psnr", "ssim"], {"lpips": lpips})
    run = runner.BenchmarkRun([runner.BenchmarkSet(DATASET, benchmark_dir)], [1, 2], metrics,
                              diversity_metric=runner.diversity_metric(metrics, [1, 2], {"lpips": lpips}),
                              settings=SRSettings(batch_size=2, process_size=128))
    runner.evaluate_model(runner.load_model(student_bundle), run, str(one), show_progress=False)

    outs = _processes([str(REPO / "evaluate.py"), f"--checkpoint={student_bundle}", f"--datasets={DATASET}",
                       f"--data_dir={benchmark_dir}", "--seeds=1,2", "--metrics=psnr,ssim", f"--lpips_weights={lpips}",
                       "--batch_size=2", "--process_size=128", f"--out={two}"])
    assert "table1" in outs[0] and "process 1: wrote the SR images of its share" in outs[1]
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file()) == files
    assert {"table1.json", "table3.json", "table4.json", f"{DATASET}/seed2_vs_seed1.json"} <= {str(f) for f in files}
    for name in files:
        if name.suffix == ".png":
            _assert_same_up_to_rounding(np.asarray(Image.open(two / name)), np.asarray(Image.open(one / name)))
        else:
            assert _without_timings(two, name) == _without_timings(one, name), name

"""evaluate.py checkpoint and watch modes on the tiny training runs (also in a bucket), the paper tables and the seed
list."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data

from smfsr_jax.convert.converted_dir import save_converted
from smfsr_jax.convert.lpips import lin_shapes, params_from_state_dicts, trunk_shapes
from smfsr_jax.core import errors, files
from smfsr_jax.data import build
from smfsr_jax.evaluation import runner, tables, watch
from smfsr_jax.evaluation.io import read_rgb8
from smfsr_jax.evaluation.metrics import MissingWeightsError, build_metrics
from smfsr_jax.models.lpips import LPIPSConfig
from smfsr_jax.sampling.settings import SRSettings
from smfsr_jax.sr import parse_seeds
from smfsr_jax.training import checkpoints, writers
from tests.conftest import REPO
from tests.test_sampling import make_bundle
from tools.make_metric_goldens import random_state_dict

DATASET = "paired_sr/custom"
LR_SIDE = 32
# process_size 128 keeps a 32-pixel LR at 128 pixels (one latent tile) instead of the protocol's 512.
SAMPLING = {"batch_size": 2, "process_size": 128}


@pytest.fixture(scope="module")
def benchmark_dir(tmp_path_factory):
    """paired_sr/custom with 3 pairs: 128-pixel crops of scikit-image photographs and their 32-pixel LR."""
    manual = tmp_path_factory.mktemp("pairs")
    (manual / "test_LR").mkdir()
    (manual / "test_HR").mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        hr = np.ascontiguousarray(getattr(skimage_data, name)()[:4 * LR_SIDE, :4 * LR_SIDE])
        lr = cv2.resize(hr, (LR_SIDE, LR_SIDE), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(manual / "test_HR" / f"{name}.png"), hr[..., ::-1])
        cv2.imwrite(str(manual / "test_LR" / f"{name}.png"), lr[..., ::-1])
    data_dir = tmp_path_factory.mktemp("benchmark_tfds")
    build.build(DATASET, str(data_dir), str(manual))
    return str(data_dir)


def _run(benchmark_dir, seeds, metrics=("psnr", "ssim"), **options) -> runner.BenchmarkRun:
    return runner.BenchmarkRun([runner.BenchmarkSet(DATASET, benchmark_dir)], seeds, build_metrics(metrics),
                                 settings=SRSettings(**{**SAMPLING, **options}))


def test_checkpoint_mode_on_bundle_and_workdir(student_run, benchmark_dir, tmp_path):
    run = _run(benchmark_dir, [1, 2])
    from_bundle = runner.evaluate_model(runner.load_model(str(student_run / "bundle")), run, str(tmp_path / "b"),
                                          show_progress=False)
    from_workdir = runner.evaluate_model(runner.load_model(str(student_run)), run, str(tmp_path / "w"),
                                           show_progress=False)
    assert sorted(os.listdir(tmp_path / "b")) == ["paired_sr", "table1.json", "table1.md", "table3.json", "table3.md"]
    dataset_dir = tmp_path / "b" / DATASET
    names = ["astronaut.png", "chelsea.png", "coffee.png"]
    for seed in (1, 2):
        assert sorted(os.listdir(dataset_dir / f"seed{seed}")) == names
        for name in names:
            assert read_rgb8(dataset_dir / f"seed{seed}" / name).shape == (4 * LR_SIDE, 4 * LR_SIDE, 3)
        results = json.loads((dataset_dir / f"seed{seed}.json").read_text())
        assert results["seed"] == seed and results["count"] == 3 and list(results["per_image"]) == names
        assert all((dataset_dir / f"seed{seed}{ext}").exists() for ext in (".csv", ".md", ".log"))
    assert not np.array_equal(read_rgb8(dataset_dir / "seed1" / "coffee.png"),
                              read_rgb8(dataset_dir / "seed2" / "coffee.png"))

    table1 = json.loads((tmp_path / "b" / "table1.json").read_text())
    assert table1 == from_bundle["table1"]
    assert table1["seed"] == 1 and table1["metrics"] == ["psnr", "ssim"]
    assert table1["setup"]["kind"] == "student" and table1["setup"]["sampling_steps"] == 1
    seed1 = json.loads((dataset_dir / "seed1.json").read_text())
    assert table1["datasets"] == {DATASET: {"count": 3, "mean": seed1["mean"]}}
    assert f"| {DATASET} | 3 | {seed1['mean']['psnr']:.4f} | {seed1['mean']['ssim']:.4f} |" in (
        tmp_path / "b" / "table1.md").read_text()

    table3 = json.loads((tmp_path / "b" / "table3.json").read_text())
    assert table3["seeds"] == [1, 2] and table3["ddof"] == 0
    seed2 = json.loads((dataset_dir / "seed2.json").read_text())
    for metric in ("psnr", "ssim"):
        row = table3["datasets"][DATASET][metric]
        per_seed = [seed1["mean"][metric], seed2["mean"][metric]]
        assert row["per_seed"] == per_seed and per_seed[0] != per_seed[1]
        assert row["mean"] == pytest.approx(np.mean(per_seed)) and row["std"] == pytest.approx(np.std(per_seed))
        assert row["std"] > 0
    psnr = table3["datasets"][DATASET]["psnr"]
    assert f"{psnr['mean']:.4f} ± {psnr['std']:.4f}" in (tmp_path / "b" / "table3.md").read_text()

    # The workdir's last checkpoint is the network its bundle exported (EMA weights at the same step).
    assert from_workdir["table1"]["setup"]["step"] == from_bundle["table1"]["setup"]["step"] == 4
    assert from_workdir["table3"]["datasets"] == from_bundle["table3"]["datasets"]


def test_table4_from_the_command_line(student_run, benchmark_dir, tmp_path):
    """Workdir at --step, a seed range, --max_images, and Table 4 with (random) LPIPS-Alex weights."""
    config = LPIPSConfig("alex")
    params = params_from_state_dicts(config, random_state_dict(trunk_shapes(config), 0),
                                     random_state_dict(lin_shapes(config), 0))
    save_converted(str(tmp_path / "lpips"), dataclasses.asdict(config), params, meta={"converter": "lpips"})
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "evaluate.py"), f"--checkpoint={student_run}", "--step=4",
               f"--datasets={DATASET}", f"--data_dir={benchmark_dir}", "--seeds=1..2", "--metrics=psnr",
               "--max_images=2", f"--lpips_weights={tmp_path / 'lpips'}", "--batch_size=2", "--process_size=128",
               f"--out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(out / DATASET / "seed1")) == ["astronaut.png", "chelsea.png"]
    table4 = json.loads((out / "table4.json").read_text())
    distances = json.loads((out / DATASET / "seed2_vs_seed1.json").read_text())
    assert table4["reference_seed"] == 1 and table4["seeds"] == [2] and table4["setup"]["step"] == 4
    row = table4["datasets"][DATASET]
    assert row["per_seed"] == [distances["mean"]["lpips"]] and row["mean"] == row["per_seed"][0] > 0
    assert distances["count"] == 2 and distances["hr_dir"] == str(out / DATASET / "seed1")
    assert f"| {DATASET} | {row['mean']:.4f} | {row['mean']:.4f} |" in (out / "table4.md").read_text()
    assert "Table 4" in done.stdout


def test_table4_without_lpips_weights_fails_before_sampling(student_run, benchmark_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match=r"Table 4 .*needs LPIPS weights: .*--lpips_weights.*--notable4"):
        runner.diversity_metric(build_metrics(["psnr"]), [1, 2])
    assert runner.diversity_metric(build_metrics(["psnr"]), [2, 3]) is None  # no seed 1: no Table 4

    command = [sys.executable, str(REPO / "evaluate.py"), f"--checkpoint={student_run / 'bundle'}",
               f"--datasets={DATASET}", f"--data_dir={benchmark_dir}", "--seeds=1,2", "--metrics=psnr",
               f"--out={tmp_path / 'out'}"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "error: Table 4 (LPIPS between the outputs of seeds 2..7 and seed 1) needs LPIPS weights")
    assert "pass --lpips_weights" in done.stderr
    assert os.listdir(tmp_path / "out") == []  # only the check that it can be written

    # An output directory that cannot be made: said before anything is loaded, the weights included.
    command[-1] = "--out=/sys/smfsr-x"
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == "error: cannot create the output directory /sys/smfsr-x: Operation not " \
                                           "permitted"


def test_a_failed_write_names_the_results_kept(student_run, benchmark_dir, tmp_path):
    out = tmp_path / "out"
    (out / DATASET).mkdir(parents=True)
    (out / DATASET / "seed2").write_text("a file where seed 2's SR images go")
    with pytest.raises(errors.RunFailure) as info:
        runner.evaluate_model(runner.load_model(str(student_run / "bundle")), _run(benchmark_dir, [1, 2]), str(out),
                              show_progress=False)
    assert str(info.value) == (f"{out / DATASET / 'seed2'}: could not write it: File exists; complete results in "
                               f"{out}: {DATASET}/seed1")
    assert json.loads((out / DATASET / "seed1.json").read_text())["count"] == 3


def test_watch_evaluates_each_checkpoint_once(teacher_run, benchmark_dir, tmp_path):
    workdir = tmp_path / "teacher"
    shutil.copytree(teacher_run, workdir)
    run = _run(benchmark_dir, [1], steps=1)

    def no_sleep(seconds):
        raise AssertionError("the run has its bundle and every step is evaluated: the watcher must stop")

    assert watch.watch(str(workdir), run, once=True, show_progress=False) == [60]
    assert json.loads((workdir / "eval" / "state.json").read_text()) == {"evaluated": [60]}
    (record,) = writers.read_jsonl(workdir / "eval" / "metrics.jsonl")
    table1 = json.loads((workdir / "eval" / "60" / "table1.json").read_text())
    assert record == {"step": 60, f"{DATASET}/psnr": table1["datasets"][DATASET]["mean"]["psnr"],
                      f"{DATASET}/ssim": table1["datasets"][DATASET]["mean"]["ssim"]}
    assert table1["setup"]["kind"] == "teacher" and table1["setup"]["step"] == 60
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "eval"))

    # A restarted watcher finds nothing new, and stops at once: the run is finished (bundle/ written).
    assert watch.watch(str(workdir), run, once=True, show_progress=False) == []
    assert watch.watch(str(workdir), run, poll_seconds=0, sleep=no_sleep, show_progress=False) == []
    assert len(writers.read_jsonl(workdir / "eval" / "metrics.jsonl")) == 1


def test_checkpoint_mode_with_a_bucket_bundle_and_output(benchmark_dir, tmp_path, bucket_dir):
    """A gs:// bundle and --out: the local run's SR images (byte for byte), scores and tables, each file uploaded
    whole."""
    local_bundle = make_bundle(tmp_path / "bundle")
    files.copy_tree(local_bundle, f"{bucket_dir}/bundle")
    run = _run(benchmark_dir, [1, 2])
    local, remote = tmp_path / "out", f"{bucket_dir}/out"
    runner.evaluate_model(runner.load_model(local_bundle), run, str(local), show_progress=False)
    built = runner.evaluate_model(runner.load_model(f"{bucket_dir}/bundle"), run, remote, show_progress=False)
    names = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert [path[len(remote) + 1:] for path in files.walk_files(remote)] == names
    for name in names:
        ours, reference = files.read_bytes(f"{remote}/{name}"), (local / name).read_bytes()
        if name.endswith((".png", ".csv")):
            assert ours == reference, name
        elif name.endswith(".json"):
            ours, reference = json.loads(ours), json.loads(reference)
            for key in ("per_image", "mean", "count", "datasets"):
                assert ours.get(key) == reference.get(key), (name, key)
    assert json.loads(files.read_text(f"{remote}/table3.json")) == json.loads(json.dumps(built["table3"]))


def test_watch_on_a_bucket_workdir(teacher_run, benchmark_dir, bucket_dir):
    """The teacher run copied into a bucket: its step is evaluated once into WORKDIR/eval there (results, state,
    metrics.jsonl and TensorBoard events)."""
    workdir = f"{bucket_dir}/teacher"
    files.copy_tree(teacher_run, workdir)
    # A local step is complete once renamed into place; in a bucket orbax marks it with this file.
    files.write_bytes(f"{workdir}/checkpoints/60/{checkpoints.COMMIT_FILE}", b"")
    run = _run(benchmark_dir, [1], steps=1)
    assert watch.watch(workdir, run, once=True, show_progress=False) == [60]
    assert json.loads(files.read_text(f"{workdir}/eval/state.json")) == {"evaluated": [60]}
    (record,) = writers.read_jsonl(f"{workdir}/eval/metrics.jsonl")
    table1 = json.loads(files.read_text(f"{workdir}/eval/60/table1.json"))
    assert record == {"step": 60, f"{DATASET}/psnr": table1["datasets"][DATASET]["mean"]["psnr"],
                      f"{DATASET}/ssim": table1["datasets"][DATASET]["mean"]["ssim"]}
    assert any(name.startswith("events.out.tfevents") for name in files.listdir(f"{workdir}/eval"))
    assert watch.watch(workdir, run, once=True, show_progress=False) == []


def test_watch_stops_after_its_time_on_an_unfinished_run(teacher_run, benchmark_dir, tmp_path):
    workdir = tmp_path / "teacher"
    shutil.copytree(teacher_run, workdir, ignore=shutil.ignore_patterns("bundle", "checkpoints"))
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        time.sleep(seconds)

    assert watch.watch(str(workdir), _run(benchmark_dir, [1]), poll_seconds=5, stop_after_seconds=0.5,
                          sleep=sleep) == []
    assert len(waits) == 1 and 0 < waits[0] <= 0.5  # waits out the rest of its time, not a whole poll


def test_benchmark_sets_are_checked_before_sampling(benchmark_dir):
    with pytest.raises(FileNotFoundError, match=r"paired_sr/realsr is not built in .*smfsr_jax\.data\.build"):
        runner.BenchmarkSet("paired_sr/realsr", benchmark_dir)
    for name in ("bundled", "paired_sr"):
        with pytest.raises(ValueError, match="not a benchmark set; expected paired_sr/<config> or lq_only/<config>"):
            runner.BenchmarkSet(name, benchmark_dir)
    assert runner.BenchmarkSet(DATASET, benchmark_dir, max_images=2).count == 2


def test_seed_lists_and_ranges():
    assert parse_seeds("1") == [1]
    assert parse_seeds("1..5,9") == [1, 2, 3, 4, 5, 9]
    assert parse_seeds(" 3, 1 ") == [3, 1]
    for bad in ("", "1,1", "1..3,2", "a", "5..1", "1..2..3"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    assert tables.diversity_seeds(range(1, 21)) == [2, 3, 4, 5, 6, 7]
    assert tables.diversity_seeds([1, 3, 9]) == [3] and tables.diversity_seeds([2, 3]) == []


def test_table_columns_follow_the_paper():
    setup = {"checkpoint": "x"}
    results = {"lq_only/custom": {"count": 2, "mean": {"musiq": 60.0}},
               "paired_sr/custom": {"count": 3, "mean": {"psnr": 25.0, "musiq": 61.0, "lpips": 0.25}}}
    table = tables.table1(results, 1, ["psnr", "lpips", "musiq"], setup)
    assert table["metrics"] == ["musiq", "psnr", "lpips"]
    text = tables.markdown(table)
    assert "| dataset | images | MUSIQ ↑ | PSNR ↑ | LPIPS ↓ |" in text
    assert "| lq_only/custom | 2 | 60.0000 | – | – |" in text
    assert "| paired_sr/custom | 3 | 61.0000 | 25.0000 | 0.2500 |" in text
    by_seed = {"paired_sr/custom": {1: {"mean": {"psnr": 25.0, "lpips": 0.2}},
                                    2: {"mean": {"psnr": 26.0, "lpips": 0.3}}}}
    table = tables.table3(by_seed, [1, 2], ["lpips", "psnr"], setup)
    assert table["metrics"] == ["psnr", "lpips"]
    assert table["datasets"]["paired_sr/custom"]["psnr"] == {"mean": 25.5, "std": 0.5, "per_seed": [25.0, 26.0]}
    assert "| paired_sr/custom | 25.5000 ± 0.5000 | 0.2500 ± 0.0500 |" in tables.markdown(table)


def test_tables_show_the_paper_numbers():
    """Tables 1 and 3 carry the paper's number and ours − paper where the paper reports one, else the marker."""
    setup = {"checkpoint": "x"}
    results = {"paired_sr/drealsr": {"count": 93, "mean": {"psnr": 26.10, "musiq": 66.00}},
               "lq_only/reallq250": {"count": 250, "mean": {"musiq": 72.00}},
               "paired_sr/custom": {"count": 3, "mean": {"psnr": 25.0, "musiq": 61.0}}}
    table = tables.table1(results, 1, ["psnr", "musiq"], setup)
    assert table["datasets"]["paired_sr/drealsr"] == {"count": 93, "mean": {"psnr": 26.10, "musiq": 66.00}}
    assert table["paper"]["paired_sr/drealsr"] == {"musiq": 65.93, "psnr": 26.35}
    assert table["difference"]["paired_sr/drealsr"] == {"musiq": pytest.approx(0.07), "psnr": pytest.approx(-0.25)}
    # RealLQ250 has no ground truth: the paper reports MUSIQ there, and no PSNR.
    assert table["paper"]["lq_only/reallq250"] == {"musiq": 72.21, "psnr": None}
    assert table["difference"]["lq_only/reallq250"] == {"musiq": pytest.approx(-0.21), "psnr": None}
    absent = {"musiq": None, "psnr": None}
    assert table["paper"]["paired_sr/custom"] == table["difference"]["paired_sr/custom"] == absent
    assert json.loads(json.dumps(table)) == table  # the JSON record keeps them (None as null)
    text = tables.markdown(table)
    assert ("| paired_sr/drealsr | 93 | 66.0000 | 26.1000 |\n| paper |  | 65.9300 | 26.3500 |\n"
            "| ours − paper |  | +0.0700 | -0.2500 |") in text
    assert ("| lq_only/reallq250 | 250 | 72.0000 | – |\n| paper |  | 72.2100 | – |\n"
            "| ours − paper |  | -0.2100 | – |") in text
    assert ("| paired_sr/custom | 3 | 61.0000 | 25.0000 |\n| paper |  | – | – |\n"
            "| ours − paper |  | – | – |") in text

    by_seed = {"paired_sr/drealsr": {1: {"mean": {"psnr": 26.39, "ssim": 0.70}},
                                     2: {"mean": {"psnr": 26.41, "ssim": 0.71}}}}
    table = tables.table3(by_seed, [1, 2], ["psnr", "ssim"], setup)
    assert table["paper"]["paired_sr/drealsr"] == {"psnr": {"mean": 26.3852, "std": 0.0198}, "ssim": None}
    assert table["difference"]["paired_sr/drealsr"] == {"psnr": pytest.approx(0.0148), "ssim": None}
    assert ("| paired_sr/drealsr | 26.4000 ± 0.0100 | 0.7050 ± 0.0050 |\n| paper | 26.3852 ± 0.0198 | – |\n"
            "| ours − paper | +0.0148 | – |") in tables.markdown(table)
    # Table 4 has no paper numbers to compare with (docs/reproduce.md).
    assert "paper" not in tables.table4({"paired_sr/drealsr": {2: 0.13}}, [2], setup)

"""The three scripts and the plot script as a user runs them, on generated data."""
import csv
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

COMMON = ["--epochs", "2", "--batch_size", "100", "--eval_batch_size", "64", "--no_download"]


def run(script, *args, check=True):
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(fake_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    data = ["--data_dir", fake_data]
    run("train_teacher.py", "--out_dir", str(root / "teacher"), "--pretrained", "none",
        "--img_size", "32", "--lr", "0.02", *COMMON, *data)
    run("train_student.py", "--out_dir", str(root / "baseline"), *COMMON, *data)
    run("distill_student.py", "--out_dir", str(root / "kd"), "--teacher_ckpt",
        str(root / "teacher" / "best.pt"), "--alpha", "0.3", "--T", "2", *COMMON, *data)
    return root


BASE_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                "epoch_time_s", "train_img_per_s"]


@pytest.mark.parametrize("name,extra", [("teacher", []), ("baseline", []),
                                        ("kd", ["train_ce", "train_kd"])])
def test_run_folder_is_complete(runs, name, extra):
    folder = runs / name
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert set(BASE_COLUMNS + extra) <= set(rows[0])
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["test_top1"]) <= float(r["test_top5"]) <= 100 for r in rows)
    config = json.load(open(folder / "config.json"))
    assert config["epochs"] == 2 and config["seed"] == 0 and config["torch"] == str(torch.__version__)
    assert config["device_name"] == "cpu"
    summary = json.load(open(folder / "summary.json"))
    assert summary["epochs"] == 2
    assert summary["last_test_top1"] == pytest.approx(float(rows[-1]["test_top1"]), abs=1e-3)
    assert summary["best_test_top1"] == pytest.approx(max(float(r["test_top1"]) for r in rows),
                                                      abs=1e-3)
    for ckpt_name in ("last.pt", "best.pt"):
        ckpt = torch.load(folder / ckpt_name, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best", "config",
                "rng"} <= set(ckpt)
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 2


def test_kd_config_records_the_loss_settings(runs):
    config = json.load(open(runs / "kd" / "config.json"))
    assert config["alpha"] == 0.3 and config["T"] == 2.0 and config["arch"] == "mobilenet_v3_small"
    rows = list(csv.DictReader(open(runs / "kd" / "log.csv")))
    for r in rows:
        combined = 0.3 * float(r["train_ce"]) + 0.7 * float(r["train_kd"])
        assert float(r["train_loss"]) == pytest.approx(combined, rel=1e-3)


def test_plot_script_draws_the_runs(runs, tmp_path):
    folders = [str(runs / n) for n in ("teacher", "baseline", "kd")]
    result = run("plots/plot_runs.py", *folders, "--out", str(tmp_path))
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) >= 3
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    for name in ("teacher", "baseline", "kd"):
        assert name in result.stdout


def assert_one_line_error(result, *phrases):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_existing_run_is_never_overwritten(runs, fake_data):
    before = {p.name: p.read_bytes() for p in (runs / "baseline").iterdir()}
    result = run("train_student.py", "--out_dir", str(runs / "baseline"), "--data_dir", fake_data,
                 *COMMON, check=False)
    assert_one_line_error(result, "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in (runs / "baseline").iterdir()} == before


@pytest.mark.parametrize("args,phrase", [
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--T", "0"], "--T must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--batch_size", "100000"], "larger than the 300 training images"),
    (["--teacher_ckpt", "missing.pt"], "does not exist"),
    (["--resume"], "no last.pt"),
])
def test_bad_input_is_one_clear_line(runs, fake_data, tmp_path, args, phrase):
    teacher = ["--teacher_ckpt", str(runs / "teacher" / "best.pt")]
    result = run("distill_student.py", "--out_dir", str(tmp_path / "new"), "--data_dir", fake_data,
                 *COMMON, *teacher, *args, check=False)
    assert_one_line_error(result, phrase)


def test_student_checkpoint_is_refused_as_teacher(runs, fake_data, tmp_path):
    result = run("distill_student.py", "--out_dir", str(tmp_path / "new"), "--data_dir", fake_data,
                 "--teacher_ckpt", str(runs / "baseline" / "best.pt"), *COMMON, check=False)
    assert_one_line_error(result, "mobilenet_v3_small checkpoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it(fake_data, tmp_path):
    result = run("train_student.py", "--out_dir", str(tmp_path / "new"), "--data_dir", fake_data,
                 "--device", "cuda", *COMMON, check=False)
    assert_one_line_error(result, "CUDA is not available")

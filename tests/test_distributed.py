"""The three scripts under torchrun with two CPU processes (gloo) on generated data."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from kd.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.slow  # torchrun with two processes

COMMON = ["--epochs", "2", "--batch_size", "50", "--eval_batch_size", "32", "--no-download"]


def torchrun(script, *args, nproc=2, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(REPO / script), *args]
    # if a rank ever aborts again (seen once, never reproduced), print every thread's stack
    debug = {"PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **debug})
    if check:
        errors = [line for line in result.stderr.splitlines()
                  if any(w in line for w in ("rror", "rank", "terminate", "what()", "bort"))]
        assert result.returncode == 0, "\n".join(errors[-40:]) + result.stderr[-1500:]
    return result


@pytest.fixture(scope="module")
def ddp_runs(fake_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = ["--data_dir", fake_data]
    torchrun("train_teacher.py", "--out_dir", str(root / "teacher"), "--pretrained", "none",
             "--img_size", "32", "--lr", "0.02", *COMMON, *data)
    torchrun("train_student.py", "--out_dir", str(root / "baseline"), *COMMON, *data)
    torchrun("distill_student.py", "--out_dir", str(root / "kd"), "--teacher_ckpt",
             str(root / "teacher" / "best.pt"), *COMMON, *data)
    return root


@pytest.mark.parametrize("name", ["teacher", "baseline", "kd"])
def test_ddp_run_logs_once_and_matches_a_single_process_evaluation(ddp_runs, fake_data, name):
    folder = ddp_runs / name
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    config = json.load(open(folder / "config.json"))
    assert config["world_size"] == 2 and config["per_rank_batch_size"] == 25
    ckpt = torch.load(folder / "last.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    metrics = evaluate_checkpoint(str(folder / "last.pt"), fake_data, torch.device("cpu"),
                                  batch_size=100, download=False)
    for key in ("test_top1", "test_top5", "test_super_top1"):
        assert metrics[key] == pytest.approx(float(rows[-1][key]), abs=1e-3), key
    assert metrics["test_loss"] == pytest.approx(float(rows[-1]["test_loss"]), rel=1e-4)
    assert metrics["test_ece"] == pytest.approx(float(rows[-1]["test_ece"]), abs=1e-3)


def test_resume_with_another_process_count(ddp_runs, fake_data, tmp_path):
    folder = tmp_path / "kd"
    folder.mkdir()
    for f in ("last.pt", "log.csv", "config.json"):
        (folder / f).write_bytes((ddp_runs / "kd" / f).read_bytes())
    cmd = [sys.executable, str(REPO / "distill_student.py"), "--out_dir", str(folder),
           "--data_dir", fake_data, "--teacher_ckpt", str(ddp_runs / "teacher" / "best.pt"),
           "--resume", *COMMON]
    cmd[cmd.index("--epochs") + 1] = "3"
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert json.load(open(folder / "config.json"))["world_size"] == 1  # where it runs now


def test_a_complete_run_says_so_once(ddp_runs, fake_data):
    result = torchrun("train_student.py", "--out_dir", str(ddp_runs / "baseline"), "--data_dir",
                      fake_data, "--resume", *COMMON)
    assert result.stdout.count("the run is already complete at epoch 2") == 1


def test_global_batch_must_divide_over_processes(fake_data, tmp_path):
    result = torchrun("train_student.py", "--out_dir", str(tmp_path / "x"), "--data_dir", fake_data,
                      "--batch_size", "51", "--epochs", "1", "--no-download", check=False)
    assert result.returncode != 0
    assert result.stderr.count("error: --batch_size 51 (the global batch) does not divide") == 1

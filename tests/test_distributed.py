"""The scripts under torchrun with two CPU processes (gloo) on generated data: distill_student.py
trains (train_teacher.py and train_student.py run the same kd.train.fit without a teacher;
train_student.py's refusal of a batch the processes cannot share is tested here)."""
import csv
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import REPO, cache_flags
from kd.cache import load_cache, open_cache
from kd.evaluate import evaluate_checkpoint
from kd.models import load_teacher
from kd.synthetic import write_fake_cifar100

pytestmark = pytest.mark.slow  # torchrun with two processes

COMMON = ["--epochs", "1", "--batch_size", "50", "--eval_batch_size", "32", "--no-download"]


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
def ddp_data(tmp_path_factory) -> str:
    """100 training and 50 test images: two steps of two processes per epoch."""
    root = tmp_path_factory.mktemp("ddp_data")
    write_fake_cifar100(str(root), n_train=100, n_test=50, seed=3)
    return str(root)


@pytest.fixture(scope="module")
def ddp_runs(ddp_data, teacher, tmp_path_factory):
    """A kd run of two processes, its teacher the session's."""
    root = tmp_path_factory.mktemp("ddp")
    torchrun("distill_student.py", "--out_dir", str(root / "kd"), "--teacher_ckpt", teacher,
             *COMMON, "--data_dir", ddp_data)
    return root


@pytest.fixture(scope="module")
def teacher(runs_root) -> str:
    return str(runs_root / "teacher" / "best.pt")


def test_ddp_run_logs_once_and_matches_a_single_process_evaluation(ddp_runs, ddp_data):
    folder = ddp_runs / "kd"
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1"]
    config = json.load(open(folder / "config.json"))
    assert config["world_size"] == 2 and config["per_rank_batch_size"] == 25
    ckpt = torch.load(folder / "last.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    flags = SimpleNamespace(data_dir=ddp_data, download=False, amp=True, amp_dtype="bf16",
                            batch_size=100)
    metrics = evaluate_checkpoint(str(folder / "last.pt"), flags, torch.device("cpu"))
    for key in ("test_top1", "test_top5", "test_super_top1"):
        assert metrics[key] == pytest.approx(float(rows[-1][key]), abs=1e-3), key
    assert metrics["test_loss"] == pytest.approx(float(rows[-1]["test_loss"]), rel=1e-4)
    assert metrics["test_ece"] == pytest.approx(float(rows[-1]["test_ece"]), abs=1e-3)


def test_resume_with_another_process_count(ddp_runs, ddp_data, teacher, tmp_path):
    folder = tmp_path / "kd"
    folder.mkdir()
    for f in ("last.pt", "log.csv", "config.json"):
        (folder / f).write_bytes((ddp_runs / "kd" / f).read_bytes())
    cmd = [sys.executable, str(REPO / "distill_student.py"), "--out_dir", str(folder),
           "--data_dir", ddp_data, "--teacher_ckpt", teacher,
           "--resume", *COMMON]
    cmd[cmd.index("--epochs") + 1] = "2"
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.load(open(folder / "config.json"))["world_size"] == 1  # where it runs now


def test_a_complete_run_says_so_once(ddp_runs, ddp_data, teacher, tmp_path):
    """On a copy: the fixture's run stays as the other tests read it, whatever their order."""
    shutil.copytree(ddp_runs / "kd", tmp_path / "kd")
    before = {f.name: f.read_bytes() for f in (tmp_path / "kd").iterdir()}
    result = torchrun("distill_student.py", "--out_dir", str(tmp_path / "kd"), "--data_dir",
                      ddp_data, "--teacher_ckpt", teacher, "--resume", *COMMON)
    assert result.stdout.count("the run is already complete at epoch 1") == 1
    assert {f.name: f.read_bytes() for f in (tmp_path / "kd").iterdir()} == before


def test_the_processes_share_the_cache_build(teacher, tmp_path):
    """Two processes build shards of 2 and 1 images; the file equals a one-process build."""
    data = str(tmp_path / "data")
    write_fake_cifar100(data, n_train=3, n_test=10, seed=6)
    torchrun("kd/cache.py", "--teacher_ckpt", teacher, "--out", str(tmp_path / "shared.pt"),
             "--data_dir", data, "--no-download", "--device", "cpu")
    open_cache(str(tmp_path / "single.pt"), load_teacher(teacher), cache_flags(teacher, data),
               torch.device("cpu"))
    shared, single = (load_cache(str(tmp_path / "shared.pt")),
                      load_cache(str(tmp_path / "single.pt")))
    assert shared.header == single.header and shared.logits.shape == (3, 162, 100)
    a, b = shared.logits.float(), single.logits.float()  # fp16: a few ulps of the largest logit
    assert (a - b).abs().max() <= 2 ** -9 * b.abs().max()


def test_global_batch_must_divide_over_processes(fake_data, tmp_path):
    result = torchrun("train_student.py", "--out_dir", str(tmp_path / "x"), "--data_dir", fake_data,
                      "--batch_size", "51", "--epochs", "1", "--no-download", check=False)
    assert result.returncode != 0
    assert result.stderr.count("error: --batch_size 51 (the global batch) does not divide") == 1

"""The scripts under torchrun with two CPU processes (gloo) on generated data: distill_student.py
trains (train_teacher.py and train_student.py run the same kd.train.fit without a teacher; a
global batch the processes cannot share is refused before they join: tests/test_errors.py)."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from helpers import REPO, cache_flags, run_in_process
from kd.cache import load_cache, open_cache
from kd.evaluate import evaluate_checkpoint
from kd.models import load_teacher
from kd.synthetic import write_fake_cifar100

pytestmark = pytest.mark.slow  # torchrun with two processes

COMMON = ["--epochs", "1", "--batch_size", "50", "--eval_batch_size", "32", "--no-download"]


def torchrun(script, *args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(REPO / script), *args]
    # if a rank ever aborts again (seen once, never reproduced), print every thread's stack
    debug = {"PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **debug})
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


def feature_flags(method, out_dir, data, teacher, *extra):
    """distill_student.py's flags for a short feature-method run on the ddp data."""
    return ["--out_dir", str(out_dir), "--teacher_ckpt", teacher, "--method", method,
            "--data_dir", data, "--eval_batch_size", "50", "--lr", "0.002", "--no-download",
            *extra]


def saved_state(folder):
    ckpt = torch.load(folder / "last.pt", weights_only=True)
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()},
            **{f"connector.{k}": v for k, v in ckpt["connector"].items()}}


CRD = ["--nce_k", "16", "--epochs", "2", "--batch_size", "50"]


def uninterrupted_run(method, flags, data, teacher, tmp_path_factory):
    """A run of two processes that other tests compare with (a module fixture's)."""
    folder = tmp_path_factory.mktemp(method) / "run"
    torchrun("distill_student.py", *feature_flags(method, folder, data, teacher, *flags))
    return folder


@pytest.fixture(scope="module")
def crd_ddp_run(ddp_data, teacher, tmp_path_factory):
    """An uninterrupted CRD run of two processes, 2 epochs of 2 steps."""
    return uninterrupted_run("crd", CRD, ddp_data, teacher, tmp_path_factory)


ONE_STEP = ["--epochs", "1", "--batch_size", "100"]


@pytest.mark.parametrize("method,extra,state", [
    ("crd", CRD, {"connector.memory_s", "connector.memory_t", "connector.z"}),
    ("reviewkd", ONE_STEP, set()),  # 28 M parameters: one step
    # init stages, their gradients averaged by kd.train.initialize: AB's trains the student's
    # features (which have a DDP wrapper) and a connector its main stage never reads; FT's the
    # paraphraser, then the loss reads the connector in part (the paraphraser frozen):
    # static_graph, and the wrapper made after the stage (kd.distributed.wrap_ddp). FT's
    # connector has 150 M parameters: 1 step a stage
    ("ab", ["--init_epochs", "1", *ONE_STEP], set()),
    ("ft", ["--init_epochs", "1", *ONE_STEP], set())])
def test_feature_method_stays_in_sync_across_ranks(method, extra, state, crd_ddp_run, ddp_data,
                                                   teacher, tmp_path):
    """kd.train.fit's check_in_sync after each epoch (and init epoch) compares the ranks'
    student and connector, parameters and state (CRD's memory bank and Z) alike, and fails the
    run if they differ. CRD's run is the SIGKILL test's reference."""
    folder = crd_ddp_run if method == "crd" else tmp_path / method
    if method != "crd":
        torchrun("distill_student.py", *feature_flags(method, folder, ddp_data, teacher, *extra))
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert len(rows) == int(extra[extra.index("--epochs") + 1])
    if "--init_epochs" in extra:
        init_rows = list(csv.DictReader(open(folder / "init_log.csv")))
        assert len(init_rows) == int(extra[extra.index("--init_epochs") + 1])
    assert json.load(open(folder / "config.json"))["world_size"] == 2
    assert state <= saved_state(folder).keys()


FITNET = ["--epochs", "2", "--batch_size", "50", "--hint_weight", "0.01"]


@pytest.fixture(scope="module")
def fitnet_ddp_run(ddp_data, teacher, tmp_path_factory):
    """An uninterrupted FitNet run of two processes, 2 epochs of 2 steps."""
    return uninterrupted_run("fitnet", FITNET, ddp_data, teacher, tmp_path_factory)


def test_two_process_fitnet_agrees_with_one_process(fitnet_ddp_run, ddp_data, teacher, tmp_path,
                                                    monkeypatch):
    """Same global batch of 50, 4 steps: the ranks stay in sync (check_in_sync), and the run
    agrees with one process, not bitwise: each rank's BatchNorm normalises its 25 images by
    their own statistics (no SyncBatchNorm on CPU), where one process takes the 50's. Measured
    after 4 steps: weights 1.2e-4 apart at most, the connector's 2.2e-6, the epochs' mean CE
    1.2e-4 relative (after 2 steps 6e-5 and 1e-6, against 1.2e-6 between one-process runs at 1
    and 2 threads, which is what summation order alone gives)."""
    monkeypatch.chdir(REPO)
    single = run_in_process("distill_student.py",
                            feature_flags("fitnet", tmp_path / "one", ddp_data, teacher, *FITNET),
                            monkeypatch)
    assert single.returncode == 0, single.stderr[-2000:]
    two, one = saved_state(fitnet_ddp_run), saved_state(tmp_path / "one")
    for key in one:
        if one[key].is_floating_point() and "running_" not in key:
            limit = 1e-4 if key.startswith("connector.") else 1e-3
            assert (two[key] - one[key]).abs().max() <= limit, key
    logged = [list(csv.DictReader(open(folder / "log.csv")))
              for folder in (fitnet_ddp_run, tmp_path / "one")]
    for row_two, row_one in zip(*logged):
        for column in ("train_ce", "train_hint"):
            assert float(row_two[column]) == pytest.approx(float(row_one[column]), rel=1e-3)


def test_killed_on_two_processes_resumes_exactly(crd_ddp_run, ddp_data, teacher, tmp_path):
    """torchrun and its two ranks SIGKILLed (a lost node) once epoch 1 is saved; the resumed
    two-process run ends bitwise equal to the uninterrupted one: weights, connector and its
    state (CRD's memory bank, Z, the step of the next negatives) and log. CRD's is the connector
    with the most to restore; FitNet's, VID's and CC's resume in one process
    (tests/test_resume.py) through the same code (ReviewKD's, 28 M parameters, in no test)."""
    folder = tmp_path / "run"
    flags = feature_flags("crd", folder, ddp_data, teacher, *CRD)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "distill_student.py"), *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while proc.poll() is None and not (folder / "last.pt").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] < 2
    torchrun("distill_student.py", *flags, "--resume")
    ours, theirs = saved_state(folder), saved_state(crd_ddp_run)
    assert ours.keys() == theirs.keys() and "connector._extra_state" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), \
        [k for k in ours if not torch.equal(ours[k], theirs[k])]
    timing = {"epoch_time_s", "train_img_per_s"}
    rows = [[{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(open(f))]
            for f in (folder / "log.csv", crd_ddp_run / "log.csv")]
    assert rows[0] == rows[1]

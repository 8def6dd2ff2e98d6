"""The three scripts and the plot script as a user runs them, on generated data."""
import csv
import importlib
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import REPO, TINY_RUN, assert_one_line_error, run_in_process
from kd.checkpoint import file_sha256
from kd.evaluate import evaluate_checkpoint
from kd.methods import METHODS
from kd.models import build_student
from kd.metrics import fine_to_coarse, split_metrics
from kd.synthetic import write_fake_cifar100

pytestmark = pytest.mark.slow  # the fixture trains runs; a few tests start processes

COMMON = TINY_RUN


def run(script, *args, check=True):
    """Run a script of the repo (or `-m module`) as `python script args` from the repo root
    would, in this process (seconds of imports less; the entry point as a process:
    run_process, tests/test_resume.py, tests/test_distributed.py)."""
    target = importlib.import_module(args[0]).main if script == "-m" else script
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        result = run_in_process(target, list(args[1:] if script == "-m" else args), mp)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_process(script, *args):
    """Run a script of the repo as a user would, a process started from the repo root."""
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(fake_data, runs_root):
    root = runs_root  # holds the teacher already
    data = ["--data_dir", fake_data]
    run("train_student.py", "--out_dir", str(root / "baseline"), *COMMON, *data)
    run("distill_student.py", "--out_dir", str(root / "kd"), "--teacher_ckpt",
        str(root / "teacher" / "best.pt"), "--alpha", "0.3", "--T", "2", "--val_size", "100",
        *COMMON, *data)
    return root


BASE_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                "test_ece", "test_super_top1", "test_err_in_super", "epoch_time_s",
                "train_img_per_s"]
KD_COLUMNS = ["train_ce", "train_kd", "test_agree", "test_kl_t_s", "val_top1", "val_ece",
              "val_agree"]


@pytest.mark.parametrize("name,extra", [("teacher", []), ("baseline", []), ("kd", KD_COLUMNS)])
def test_run_folder_is_complete(runs, name, extra):
    folder = runs / name
    rows = list(csv.DictReader(open(folder / "log.csv")))
    assert set(BASE_COLUMNS + extra) <= set(rows[0])
    header = open(folder / "log.csv").readline().strip().split(",")
    assert header[:4] == ["epoch", "lr", "train_loss", "train_top1"]
    assert header[-2:] == ["epoch_time_s", "train_img_per_s"]
    assert header[header.index("test_loss"):header.index("test_loss") + 6] == [
        "test_loss", "test_top1", "test_top5", "test_ece", "test_super_top1", "test_err_in_super"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["test_top1"]) <= float(r["test_top5"]) <= 100 for r in rows)
    config = json.load(open(folder / "config.json"))
    assert (config["epochs"] == 2 and config["seed"] == 0
            and config["torch"] == str(torch.__version__))
    assert config["device_name"] == "cpu"
    summary = json.load(open(folder / "summary.json"))
    assert summary["epochs"] == 2
    assert summary["last_test_top1"] == pytest.approx(float(rows[-1]["test_top1"]), abs=1e-3)
    assert summary["best_test_top1"] == pytest.approx(max(float(r["test_top1"]) for r in rows),
                                                      abs=1e-3)
    for ckpt_name in ("last.pt", "best.pt"):
        ckpt = torch.load(folder / ckpt_name, map_location="cpu", weights_only=True)
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best", "last",
                "config"} <= set(ckpt)
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 2
    logits = torch.load(folder / "logits_last.pt", weights_only=True)
    assert logits["epoch"] == 2 and logits["test"]["logits"].shape == (100, 100)
    assert (folder / "logits_best.pt").exists()


@pytest.mark.parametrize("name", ["teacher", "baseline", "kd"])
def test_saved_logits_reproduce_the_logged_metrics(runs, name):
    """Every split of every logits file gives, recomputed, the very numbers of its epoch's row."""
    rows = {r["epoch"]: r for r in csv.DictReader(open(runs / name / "log.csv"))}
    for file in ("logits_best.pt", "logits_last.pt"):
        blob = torch.load(runs / name / file, weights_only=True)
        row = rows[str(blob["epoch"])]
        splits = [k for k in blob if k != "epoch"]
        assert splits == (["test", "val"] if name == "kd" else ["test"])
        for split in splits:
            saved = blob[split]
            assert saved["logits"].dtype == torch.float32
            mapping = fine_to_coarse(saved["labels"], saved["coarse_labels"])
            metrics = split_metrics(saved["logits"], saved["labels"], saved["coarse_labels"],
                                    mapping, saved.get("teacher_logits"))
            for metric in ("top1", "loss", "ece", "top5", "super_top1", "agree"):
                if f"{split}_{metric}" in row:
                    assert (f"{metrics[metric]:.6g}"
                            == row[f"{split}_{metric}"]), (file, split, metric)


def test_validation_split_picks_the_best_checkpoint(runs):
    summary = json.load(open(runs / "kd" / "summary.json"))
    rows = list(csv.DictReader(open(runs / "kd" / "log.csv")))
    best_row = max(rows, key=lambda r: float(r["val_top1"]))
    assert summary["selected_by"] == "val_top1"
    assert summary["best_epoch"] == int(best_row["epoch"])
    assert summary["best"]["val_top1"] == pytest.approx(float(best_row["val_top1"]), abs=1e-3)
    assert summary["best"]["test_top1"] == pytest.approx(float(best_row["test_top1"]), abs=1e-3)
    logits = torch.load(runs / "kd" / "logits_best.pt", weights_only=True)
    assert logits["val"]["logits"].shape == (100, 100) and "teacher_logits" in logits["test"]


def test_evaluate_any_checkpoint_matches_the_log(runs, fake_data, tmp_path):
    """With no --data_dir, on the run's own data (REPO, the working folder, has no ./data)."""
    out = tmp_path / "m.json"
    run("-m", "kd.evaluate", str(runs / "baseline" / "last.pt"), "--no-download", "--json",
        str(out))
    metrics = json.load(open(out))
    assert metrics["precision"] == "float32" and metrics["device"] == "cpu"
    assert metrics["data_dir"] == fake_data
    last = list(csv.DictReader(open(runs / "baseline" / "log.csv")))[-1]
    for key in ("test_top1", "test_top5", "test_ece", "test_super_top1"):
        assert metrics[key] == pytest.approx(float(last[key]), abs=1e-2), key
    assert metrics["test_loss"] == pytest.approx(float(last["test_loss"]), rel=1e-3)


def test_kd_config_records_the_loss_settings(runs):  # and the log the terms of kd_loss
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


def test_existing_run_is_never_overwritten(runs, fake_data):
    before = {p.name: p.read_bytes() for p in (runs / "baseline").iterdir()}
    result = run("train_student.py", "--out_dir", str(runs / "baseline"), "--data_dir", fake_data,
                 *COMMON, check=False)
    assert_one_line_error(result, "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in (runs / "baseline").iterdir()} == before


def test_overwrite_never_deletes_the_teacher(runs, fake_data, monkeypatch, capsys):
    before = folder_bytes(runs / "teacher")
    result = run_in_process("distill_student.py", [
        "--out_dir", runs / "teacher", "--teacher_ckpt", runs / "teacher" / "best.pt",
        "--overwrite", "--data_dir", fake_data, *COMMON], monkeypatch, capsys)
    assert_one_line_error(result, "--overwrite would delete", "best.pt")
    assert folder_bytes(runs / "teacher") == before


@pytest.mark.parametrize("args,phrase", [
    (["--alpha", "1.5"], "--alpha: must be in [0, 1]"),
    (["--T", "0"], "--T: must be > 0"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--lr", "-1"], "--lr: must be > 0"),
    (["--batch_size", "100000"], "larger than the 300 training images"),
    (["--teacher_ckpt", "missing.pt"], "--teacher_ckpt missing.pt does not exist (train_"),
    (["--resume"], "no last.pt"),
    (["--method", "crd", "--teacher_cache", "cache.pt"],
     "reads more of the teacher than the logit cache"),
    (["--method", "crd", "--nce_k", "298"], "--nce_k 298: more negatives than the 297"),
    (["--method", "fitnet", "--hint_stage", "5"], "--hint_stage: invalid choice: 5"),
    (["--method", "fitnet", "--logit_std"], "--logit_std is read by --method kd, dkd, ctkd, not by "
                                            "fitnet"),
    (["--method", "dist", "--alpha", "0.3"], "--alpha is read by --method kd, not by dist"),
    (["--method", "fitnet", "--hint_weight", "inf"], "--hint_weight: must be a finite number"),
])
def test_bad_input_is_one_clear_line(runs, fake_data, tmp_path, args, phrase, in_process):
    """In-process (run_process tests cover the real entry point), to keep the suite fast."""
    teacher = ["--teacher_ckpt", str(runs / "teacher" / "best.pt")]
    result = in_process("distill_student.py", ["--out_dir", str(tmp_path / "new"), "--data_dir",
                                               fake_data, *COMMON, *teacher, *args])
    assert_one_line_error(result, phrase)
    assert not (tmp_path / "new").exists()  # nothing written


def test_student_checkpoint_is_refused_as_teacher(runs, fake_data, tmp_path):
    result = run("distill_student.py", "--out_dir", str(tmp_path / "new"), "--data_dir", fake_data,
                 "--teacher_ckpt", str(runs / "baseline" / "best.pt"), *COMMON, check=False)
    assert_one_line_error(result, "not a resnet50 checkpoint", "mobilenet_v3_small")


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it(fake_data, tmp_path):
    result = run("train_student.py", "--out_dir", str(tmp_path / "new"), "--data_dir", fake_data,
                 "--device", "cuda", *COMMON, check=False)
    assert_one_line_error(result, "CUDA is not available")


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_overwrite_checks_everything_before_deleting(runs, fake_data):
    before = folder_bytes(runs / "kd")
    result = run("distill_student.py", "--out_dir", str(runs / "kd"), "--data_dir", fake_data,
                 "--teacher_ckpt", "missing.pt", "--overwrite", *COMMON, check=False)
    assert_one_line_error(result, "does not exist")
    assert folder_bytes(runs / "kd") == before


def test_resuming_a_kd_run_with_the_baseline_script_is_refused(runs, fake_data):
    before = folder_bytes(runs / "kd")
    result = run("train_student.py", "--out_dir", str(runs / "kd"), "--data_dir", fake_data,
                 "--resume", *COMMON, check=False)
    assert_one_line_error(result, "holds a run made by distill_student.py, not train_student.py")
    assert folder_bytes(runs / "kd") == before


def test_argparse_mistakes_are_one_line(tmp_path):
    result = run_process("train_student.py", "--out_dir", str(tmp_path / "x"), "--epochz", "3")
    assert_one_line_error(result, "unrecognized arguments: --epochz")
    assert result.returncode == 2


@pytest.fixture(scope="module")
def cached_and_online(runs, tmp_path_factory):
    """Two KD runs of one seed on a small dataset, the teacher online and from a cache."""
    root = tmp_path_factory.mktemp("cache_runs")
    data = str(root / "data")
    write_fake_cifar100(data, n_train=20, n_test=20, seed=5)
    common = ["--data_dir", data, "--teacher_ckpt", str(runs / "teacher" / "best.pt"), "--epochs",
              "2", "--batch_size", "10", "--eval_batch_size", "20", "--lr", "0.01", "--no-download"]
    run("distill_student.py", "--out_dir", str(root / "online"), *common)
    built = run("distill_student.py", "--out_dir", str(root / "cached"), "--teacher_cache",
                str(root / "cache.pt"), *common)
    return root, common, built


def test_kd_from_the_cache_matches_online_kd(cached_and_online):
    root, _, built = cached_and_online
    assert "teacher cache written to" in built.stdout and "GB of torch.float16" in built.stdout
    online, cached = (list(csv.DictReader(open(root / n / "log.csv")))
                      for n in ("online", "cached"))
    assert len(online) == len(cached) == 2
    for a, b in zip(online, cached):  # the teacher's logits differ only by fp16 storage
        for column in ("train_loss", "train_ce", "train_kd", "test_loss", "test_kl_t_s"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-3), column
        assert a["test_top1"] == b["test_top1"] and a["test_agree"] == b["test_agree"]
    for name, source in (("online", "online"), ("cached", "cache")):
        config = json.load(open(root / name / "config.json"))
        summary = json.load(open(root / name / "summary.json"))
        assert config["teacher_logits"] == summary["teacher_logits"] == source
    sha = file_sha256(str(root / "cache.pt"))
    assert json.load(open(root / "cached" / "summary.json"))["teacher_cache_sha256"] == sha


def test_resume_refuses_a_switch_between_online_and_cache(cached_and_online, monkeypatch,
                                                         capsys):
    root, common, _ = cached_and_online
    more = [*common, "--epochs", "3"]  # the last --epochs wins
    result = run_in_process("distill_student.py", ["--out_dir", root / "online", "--resume",
                            "--teacher_cache", root / "cache.pt", *more], monkeypatch, capsys)
    assert_one_line_error(result, "teacher_logits online -> cache")
    result = run_in_process("distill_student.py", ["--out_dir", root / "cached", "--resume",
                                                   *more], monkeypatch, capsys)
    assert_one_line_error(result, "teacher_logits cache -> online")


@pytest.mark.parametrize("method,flags,terms", [
    ("dkd", ["--dkd_warmup", "2"], ["train_ce", "train_tckd", "train_nckd"]),
    ("dist", [], ["train_ce", "train_inter", "train_intra"]),
    ("kd", ["--logit_std", "--alpha", "0.1", "--T", "2"], ["train_ce", "train_kd"]),
    ("wttm", ["--wttm_gamma", "0.5"], ["train_ce", "train_wttm"]),
    ("ctkd", ["--ctkd_loss", "dkd"], ["train_ce", "train_tckd", "train_nckd", "train_temperature"]),
    ("dkd", ["--optimizer", "dot"], ["train_ce", "train_tckd", "train_nckd"]),
])
def test_every_method_runs_from_the_cache(cached_and_online, method, flags, terms, monkeypatch,
                                          capsys):
    root, common, _ = cached_and_online
    folder = root / "_".join([method, *flags]).replace("-", "")
    result = run_in_process("distill_student.py", ["--out_dir", folder, "--teacher_cache",
                            root / "cache.pt", "--method", method, *flags, *common, "--epochs",
                            "1"], monkeypatch, capsys)
    assert result.returncode == 0, result.stderr
    header = open(folder / "log.csv").readline().strip().split(",")
    assert header[2:4 + len(terms)] == ["train_loss", "train_top1", *terms]
    config = json.load(open(folder / "config.json"))
    assert config["method"] == method and config["teacher_logits"] == "cache"


# Each feature method and a term of its own in log.csv
FEATURE_TERMS = {"fitnet": "hint", "crd": "crd", "reviewkd": "review", "at": "at", "pkt": "pkt",
                 "rkd": "distance", "sp": "sp", "nst": "nst", "cc": "cc", "vid": "vid",
                 "ofd": "ofd", "kdsvd": "kdsvd", "ab": "ce", "ft": "ft", "fsp": "ce",
                 "itrd": "correlation", "sdd": "sdd", "mlkd": "instance", "ctkd": "temperature"}
# What a step needs on 100 images: CRD fewer negatives; the init stages: tests/test_two_stage.py
EXTRA = {"crd": ["--nce_k", "64"], "ab": ["--init_epochs", "0"], "ft": ["--init_epochs", "0"],
         "fsp": ["--init_epochs", "0"]}


def test_every_feature_method_is_tested():
    assert set(FEATURE_TERMS) == {name for name, m in METHODS.items() if m.connector}


@pytest.mark.parametrize("method,term", [
    pytest.param(method, term, marks=[pytest.mark.slow] * (method in ("reviewkd", "ft")))
    for method, term in FEATURE_TERMS.items()])  # slow: connectors of 28 M and 150 M parameters
def test_feature_methods_train_a_plain_student(runs, fake_data, tmp_path, method, term,
                                               in_process):
    """One epoch of each feature method: its term logged, its connector in last.pt only beside
    the student, which best.pt holds as a plain MobileNetV3-Small that kd.evaluate reads."""
    folder = tmp_path / method
    result = in_process("distill_student.py", [
        "--out_dir", folder, "--teacher_ckpt", runs / "teacher" / "best.pt", "--method", method,
        *EXTRA.get(method, []),
        "--data_dir", fake_data, *COMMON, "--epochs", "1", "--val_size", "200"])  # one step
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(folder / "log.csv")))
    # FT compares the last stage's factors, 1 x 1 at this 32 px teacher: always equal
    assert float(rows[0][f"train_{term}"]) >= 0 if method == "ft" else \
        float(rows[0][f"train_{term}"]) > 0
    assert float(rows[0]["train_ce"]) > 0
    last = torch.load(folder / "last.pt", weights_only=True)
    assert "connector" in last and set(last["model"]) == set(build_student().state_dict())
    assert "connector" not in torch.load(folder / "best.pt", weights_only=True)  # resume only
    state = {"data_dir": fake_data, "download": False, "amp": True, "amp_dtype": "bf16",
             "batch_size": 100}
    metrics = evaluate_checkpoint(str(folder / "best.pt"), SimpleNamespace(**state),
                                  torch.device("cpu"))
    assert metrics["test_top1"] == pytest.approx(float(rows[0]["test_top1"]), abs=1e-3)


def test_resuming_crd_on_other_data_is_one_line(runs, fake_data, tmp_path, in_process):
    """CRD's memory bank has a row per training image: other data cannot continue it."""
    folder, other = tmp_path / "crd", tmp_path / "other_data"
    write_fake_cifar100(str(other), n_train=400, n_test=100, seed=1)
    common = ["--out_dir", folder, "--teacher_ckpt", runs / "teacher" / "best.pt", "--method",
              "crd", "--nce_k", "64", *COMMON, "--epochs", "1"]
    assert in_process("distill_student.py", [*common, "--data_dir", fake_data]).returncode == 0
    before = folder_bytes(folder)
    result = in_process("distill_student.py", [*common, "--data_dir", other, "--resume",
                                               "--epochs", "2"])
    assert_one_line_error(result, "--resume: last.pt's connector does not fit this run")
    assert folder_bytes(folder) == before


def test_a_complete_run_resumed_changes_nothing(runs, fake_data, in_process, tmp_path):
    """On a copy of the fixture's run: its summary.json (total time included) and every other
    file stay as the run wrote them; a summary lost after the last last.pt is written again."""
    folder = tmp_path / "baseline"
    shutil.copytree(runs / "baseline", folder)
    before = folder_bytes(folder)
    argv = ["--out_dir", folder, "--data_dir", fake_data, *COMMON, "--resume"]
    result = in_process("train_student.py", argv)
    assert result.returncode == 0 and "already complete at epoch 2" in result.stdout
    assert folder_bytes(folder) == before
    (folder / "summary.json").unlink()
    assert in_process("train_student.py", argv).returncode == 0
    summary = json.loads((folder / "summary.json").read_text())
    last = torch.load(folder / "last.pt", weights_only=True)
    assert summary["total_time_s"] == last["elapsed_s"]  # as last.pt saved it: nothing ran

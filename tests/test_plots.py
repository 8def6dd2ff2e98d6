"""plots/plot_runs.py on tiny hand-written run folders in the minimal format of older runs (no
logits, no calibration columns), run in-process; one slow smoke test runs the script like a user
would. tests/test_report.py covers the report on runs in the current format."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import results_rows
from plots.plot_runs import main

REPO = Path(__file__).parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNGS = ["test_top1.png", "train_top1.png", "train_ce.png", "train_objective.png", "lr.png",
        "comparison.png"]
BASE_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5",
                "epoch_time_s", "train_img_per_s"]
KD_COLUMNS = ["epoch", "lr", "train_loss", "train_top1", "train_ce", "train_kd", "test_loss",
              "test_top1", "test_top5", "epoch_time_s", "train_img_per_s"]


def write_run(folder: Path, top1: list[float], arch: str, kd: bool = False,
              finished: bool = True, planned_epochs: int | None = None) -> Path:
    """A run folder with one log row per value in top1; summary.json only if finished."""
    folder.mkdir(parents=True)
    columns = KD_COLUMNS if kd else BASE_COLUMNS
    lines = [",".join(columns)]
    for i, acc in enumerate(top1):
        row = {"epoch": i + 1, "lr": 0.1 * math.cos(i / len(top1)), "train_loss": 4.0 / (i + 1),
               "train_top1": acc + 5, "train_ce": 3.0 / (i + 1), "train_kd": 1.0 / (i + 1),
               "test_loss": 3.5 / (i + 1), "test_top1": acc, "test_top5": acc + 20,
               "epoch_time_s": 30.0, "train_img_per_s": 5000.0}
        lines.append(",".join(str(row[c]) for c in columns))
    (folder / "log.csv").write_text("\n".join(lines) + "\n")
    (folder / "config.json").write_text(json.dumps(
        {"arch": arch, "epochs": planned_epochs or len(top1), "lr": 0.1}))
    if finished:
        best = max(range(len(top1)), key=lambda i: top1[i])
        (folder / "summary.json").write_text(json.dumps({
            "best_test_top1": top1[best], "best_test_top5": top1[best] + 20,
            "best_epoch": best + 1, "last_test_top1": top1[-1], "last_test_top5": top1[-1] + 20,
            "epochs": len(top1), "total_time_s": 600.0}))
    return folder


def plot(capsys, *args: str | Path) -> subprocess.CompletedProcess:
    """main() in this process, with the exit code and output the script would have."""
    try:
        main(list(map(str, args)))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


table_rows = results_rows  # the results tables, merged


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [write_run(tmp_path / "runs" / "teacher_r50", [10.0, 35.5, 52.25, 61.5, 60.0],
                      "resnet50"),
            write_run(tmp_path / "runs" / "kd_mnv3", [8.0, 30.0, 41.125, 40.0, 44.75],
                      "mobilenet_v3_small", kd=True),
            write_run(tmp_path / "runs" / "student_partial", [5.0, 22.5, 19.0],
                      "mobilenet_v3_small", finished=False, planned_epochs=5)]


def test_plots_and_table(runs: list[Path], tmp_path: Path, capsys):
    out = tmp_path / "figs"
    result = plot(capsys, *runs, "--out", out)
    assert result.returncode == 0, result.stderr
    for name in PNGS:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
    assert not (out / "reliability.png").exists()  # no run has logits_best.pt
    assert (out / "results.md").read_text() == result.stdout
    rows = table_rows(result.stdout)
    assert set(rows) == {"teacher_r50", "kd_mnv3", "student_partial"}
    assert rows["teacher_r50"]["best top-1"] == "61.50"
    assert rows["teacher_r50"]["best epoch"] == "4"
    assert rows["teacher_r50"]["last top-1"] == "60.00"
    assert rows["teacher_r50"]["arch"] == "resnet50"
    assert rows["teacher_r50"]["train time (min)"] == "2.5"  # 5 epochs of 30 s, not total_time_s
    assert rows["kd_mnv3"]["best top-1"] == "44.75"
    assert rows["kd_mnv3"]["best top-5"] == "64.75"
    # The unfinished run is computed from log.csv: best is epoch 2, last is epoch 3.
    partial = rows["student_partial"]
    assert (partial["best top-1"], partial["best epoch"], partial["best top-5"]) == \
        ("22.50", "2", "42.50")
    assert (partial["last top-1"], partial["last top-5"]) == ("19.00", "39.00")
    assert partial["epochs"] == "3/5"
    assert partial["train time (min)"] == "1.5"
    assert partial["status"] == "unfinished"
    assert rows["teacher_r50"]["status"] == rows["kd_mnv3"]["status"] == "done"
    assert rows["teacher_r50"]["best by"] == "test"  # no selected_by, no val_top1 column
    assert rows["kd_mnv3"]["best ECE %"] == "–"  # not logged by older runs
    assert rows["kd_mnv3"]["params (M)"] == "–"  # no stem or img_size in config: unknown model
    assert result.stderr.splitlines() == [
        f"warning: left out of the reliability diagrams{dk}: {name} (no logits_best.pt)"
        for name, dk in [("teacher_r50", " and dark knowledge"), ("kd_mnv3", ""),
                         ("student_partial", "")]]  # in the order of the arguments


def test_defaults_find_runs_and_write_to_plots(runs: list[Path], tmp_path: Path, capsys,
                                               monkeypatch):
    (tmp_path / "runs" / "not_a_run").mkdir()  # no config.json or log.csv: skipped, not an error
    for parent in "ab":  # found below runs/, told apart by their parent folder
        write_run(tmp_path / "runs" / "sweep" / parent / "kd", [1.0, 2.0], "mobilenet_v3_small")
    (tmp_path / "plots").mkdir()
    monkeypatch.chdir(tmp_path)
    result = plot(capsys)
    assert result.returncode == 0, result.stderr
    assert set(table_rows(result.stdout)) == {"teacher_r50", "kd_mnv3", "student_partial",
                                              "sweep/a/kd", "sweep/b/kd"}
    for name in PNGS:
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_script_runs_from_another_folder(runs: list[Path], tmp_path: Path):
    """The script as a user runs it, not from the repo root: kd/ and plots/ are installed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, str(REPO / "plots" / "plot_runs.py"), str(runs[0]),
                             "--out", "figs", "--no-cost"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "figs" / "results.md").read_text() == result.stdout
    assert "| teacher_r50 |" in result.stdout


def assert_user_error(result: subprocess.CompletedProcess, mentions: str) -> list[str]:
    """Exit 2, nothing on stdout, one error line last on stderr; returns the warnings above it."""
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    *warnings, error = result.stderr.strip().splitlines()
    assert error.startswith("error: ") and mentions in error, result.stderr
    assert all(line.startswith("warning: ") for line in warnings), result.stderr
    return warnings


def test_folder_without_run(runs: list[Path], tmp_path: Path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert_user_error(plot(capsys, runs[0], empty, "--out", tmp_path / "figs"), "empty_run")


def test_no_runs_found(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert assert_user_error(plot(capsys), "no runs found") == []


@pytest.mark.parametrize("content", ["", "epoch,lr\n", ",".join(BASE_COLUMNS) + "\n",
                                     ",".join(BASE_COLUMNS) + "\n1,0.1,x,1,1,1,1,1,1\n"],
                         ids=["empty file", "missing columns", "no rows", "non-numeric"])
def test_only_run_has_bad_log_csv(tmp_path: Path, content: str, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "log.csv").write_text(content)
    warnings = assert_user_error(plot(capsys, folder, "--out", tmp_path / "figs"),
                                 "no run can be reported")
    assert len(warnings) == 1 and "left out of the report: broken (" in warnings[0] and \
        "log.csv" in warnings[0]

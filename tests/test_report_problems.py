"""How the report of plots/plot_runs.py reports broken runs: non-finite logits, runs cut off or
in progress, unusable logs, logits and JSON files, bad arguments, blown-up runs and tables at
chance: each named in one warning line, nothing dropped silently, never a traceback."""
import json
from pathlib import Path

import pytest
import torch

from helpers import (N_TEST, STUDENT, TEACHER, fake_logits, metric_rows, report,
                     report_with_problems, results_rows, run_error, set_log_column, write_run)
from plots import calibration
from plots.plot_runs import main

pytestmark = pytest.mark.usefixtures("unrendered")  # conftest: figures built, not rendered


NOT_FINITE = {"some rows NaN": (slice(0, 5), float("nan")),
              "some rows inf": (slice(10, 11), float("inf")),
              "all rows NaN": (slice(None), float("nan"))}


@pytest.mark.parametrize("rows, value", NOT_FINITE.values(), ids=NOT_FINITE.keys())
def test_non_finite_logits(experiment: Path, tmp_path: Path, capsys, monkeypatch, rendered,
                           rows: slice, value: float):
    for run in ("teacher", "kd/seed1"):
        path = experiment / run / "logits_best.pt"
        blob = torch.load(path, weights_only=True)
        blob["test"]["logits"][rows, 3] = value
        torch.save(blob, path)
    panels = []
    monkeypatch.setattr(calibration, "draw_reliability",
                        lambda ax, hist_ax, bins, title: panels.append(title.split("\n")[0]))
    text, skipped = report_with_problems([experiment, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    n = len(range(N_TEST)[rows])
    assert skipped == [  # in the order of the folders
        "left out of the reliability diagrams: baseline (no logits_best.pt)",
        f"left out of the reliability diagrams: kd/seed1 (logits_best.pt has non-finite logits "
        f"in {n} of {N_TEST} rows)",
        f"left out of the reliability diagrams and dark knowledge: teacher (logits_best.pt has "
        f"non-finite logits in {n} of {N_TEST} rows)"]
    assert panels == ["kd/seed0"]
    assert "## Dark knowledge" not in text
    assert not (tmp_path / "out" / "dark_knowledge.png").exists()
    assert set(results_rows(text)) == {"teacher", "baseline", "kd/seed{0,1}"}


@pytest.mark.parametrize("files, reason", [
    ({}, "no log.csv"),
    ({"log.csv": "epoch,lr,train_loss,test_top1,test_top5,epoch_time_s\n"},
     "log.csv has no complete epoch row yet"),
], ids=["config only", "header only"])
def test_run_not_past_epoch_1_is_named(experiment: Path, tmp_path: Path, capsys, files: dict,
                                       reason: str):
    folder = experiment / "starting"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(STUDENT))
    for name, content in files.items():
        (folder / name).write_text(content)
    text, skipped = report_with_problems([experiment, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    assert f"left out of the report: starting ({reason})" in skipped
    assert "starting" not in results_rows(text)


def test_run_in_progress_is_tabulated(tmp_path: Path, capsys):
    folder = write_run(tmp_path / "runs" / "running", {**STUDENT, "epochs": 10}, [10.0, 30.0])
    (folder / "summary.json").unlink()
    (folder / "config.json").write_text(json.dumps({**STUDENT, "epochs": 10}))
    text, skipped = report_with_problems([tmp_path / "runs", "--out", tmp_path / "out",
                                          "--no-cost"], capsys)
    row = results_rows(text)["running"]
    assert (row["status"], row["epochs"], row["best top-1"], row["train time (min)"]) == \
        ("unfinished", "2/10", "30.00", "1.0")
    assert skipped == [] and (tmp_path / "out" / "reliability.png").exists()


def cut_last_line(text: str) -> str:
    return text[:text.rindex(",") + 1]  # the last field gone: fewer fields, no newline


def cut_number(text: str) -> str:
    return text[:text.rindex(".") + 2]  # the last number cut after its first decimal


@pytest.mark.parametrize("cut", [cut_last_line, cut_number])
def test_cut_off_last_row_is_dropped(tmp_path: Path, capsys, cut):
    folder = write_run(tmp_path / "runs" / "run", STUDENT, [10.0, 30.0, 25.0])
    (folder / "summary.json").unlink()
    (folder / "log.csv").write_text(cut((folder / "log.csv").read_text()))
    text, skipped = report_with_problems([folder, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    row = results_rows(text)["run"]
    assert (row["epochs"], row["last top-1"], row["best top-1"]) == ("2/3", "30.00", "30.00")
    assert skipped == ["log.csv rows left out: run (1 cut off or not numeric)"]


BAD_LOGS = {"empty": ("", "log.csv is empty"),
            "header cut off": ("epoch,lr,tra", "log.csv is empty"),
            "header only": ("epoch,lr,train_loss,test_top1,test_top5,epoch_time_s\n",
                            "log.csv has no complete epoch row yet"),
            "missing columns": ("epoch,lr\n1,0.1\n", "log.csv lacks the columns train_loss"),
            "non-numeric": ("epoch,lr,train_loss,test_top1,test_top5,epoch_time_s\n"
                            "1,0.1,x,10,30,30\n", "log.csv has no complete epoch row yet"),
            "not UTF-8": (b"\xff\xfe\x00", "cannot read log.csv")}


@pytest.mark.parametrize("content, reason", BAD_LOGS.values(), ids=BAD_LOGS.keys())
def test_unusable_log_skips_the_run(experiment: Path, tmp_path: Path, capsys, content, reason):
    path = experiment / "baseline" / "log.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    text, skipped = report_with_problems([experiment, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    assert len(skipped) == 1 and skipped[0].startswith(f"left out of the report: baseline "
                                                       f"({reason}")
    assert list(results_rows(text)) == ["teacher", "kd/seed{0,1}"]


def test_non_numeric_row_in_the_middle_is_dropped(tmp_path: Path, capsys):
    folder = write_run(tmp_path / "run", STUDENT, [10.0, 30.0, 25.0], logits_seed=None)
    lines = (folder / "log.csv").read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("30.0", "x", 1)
    (folder / "log.csv").write_text("".join(lines))
    text, skipped = report_with_problems([folder, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    assert results_rows(text)["run"]["last top-1"] == "25.00"
    assert "log.csv rows left out: run (1 cut off or not numeric)" in skipped


def test_unusable_logits_are_named(experiment: Path, tmp_path: Path, capsys):
    (experiment / "kd" / "seed1" / "logits_best.pt").write_bytes(b"not a torch file")
    blob = fake_logits(0, False, False)
    blob["test"]["labels"] = blob["test"]["labels"][:10]
    torch.save(blob, experiment / "baseline" / "logits_best.pt")
    text, skipped = report_with_problems([experiment, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    assert skipped[0].startswith("left out of the reliability diagrams: baseline (logits_best.pt: "
                                 "the test logits must be [N, classes]")
    assert skipped[1].startswith("left out of the reliability diagrams: kd/seed1 (cannot read "
                                 "logits_best.pt with torch.load (")
    assert len(skipped) == 2 and set(results_rows(text)) == {"teacher", "baseline", "kd/seed{0,1}"}
    assert (tmp_path / "out" / "reliability.png").exists()


def test_teacher_logits_missing_classes(tmp_path: Path, capsys):
    folder = write_run(tmp_path / "teacher", TEACHER, [50.0])
    blob = fake_logits(0, True, False)
    blob["test"] = {k: v[:50] for k, v in blob["test"].items()}  # classes 50-99 never appear
    torch.save(blob, folder / "logits_best.pt")
    text, skipped = report_with_problems([folder, "--out", tmp_path / "o", "--no-cost"], capsys)
    assert skipped == ["left out of the dark knowledge: teacher (the test labels in "
                       "logits_best.pt miss some classes, so their superclasses are unknown)"]
    assert "## Dark knowledge" not in text and "![reliability.png]" in text


def test_best_epoch_missing_from_log(tmp_path: Path, capsys):
    folder = write_run(tmp_path / "run", STUDENT, [10.0, 20.0, 15.0], logits_seed=None)
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "best_epoch": 7}))
    text, skipped = report_with_problems([folder, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    row = results_rows(text)["run"]
    assert (row["best epoch"], row["best top-1"], row["status"]) == ("2", "20.00", "done")
    assert "best epoch taken from log.csv: run (summary.json's best epoch 7 is not in " \
           "log.csv)" in skipped


@pytest.mark.parametrize("name", ["summary.json", "config.json"])
@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff"], ids=["bad", "list", "binary"])
def test_unreadable_json(tmp_path: Path, capsys, name: str, content: str):
    folder = write_run(tmp_path / "run", STUDENT, [10.0, 20.0, 15.0], logits_seed=None)
    (folder / name).write_bytes(content.encode("latin-1"))
    text, skipped = report_with_problems([folder, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    row = results_rows(text)["run"]
    assert row["last top-1"] == "15.00"
    assert row["status" if name == "summary.json" else "arch"] == \
        ("unfinished" if name == "summary.json" else "?")
    assert skipped[0].startswith(f"{name} not used")


def test_no_run_can_be_reported(tmp_path: Path, capsys):
    for name in ("a", "b"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.json").write_text(json.dumps(STUDENT))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.splitlines() == [
        "warning: left out of the report: a (no log.csv)",
        "warning: left out of the report: b (no log.csv)",
        "error: no run can be reported (see the warnings above)"]


@pytest.mark.parametrize("argv, mentions", [
    (["missing_folder"], "missing_folder is not a folder"),
    (["."], "is not a run folder and holds none"),
    (["--latency_runs", "0"], "--latency_runs"),
])
def test_bad_arguments(tmp_path: Path, capsys, monkeypatch, argv: list, mentions: str):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert mentions in run_error(argv + ["--out", tmp_path / "out"], capsys)


def test_summary_older_than_the_log_is_not_used(tmp_path: Path, capsys):
    """A finished run resumed with more --epochs: the old summary.json beside a longer log."""
    folder = write_run(tmp_path / "runs" / "student", STUDENT, [10.0, 20.0], logits_seed=None)
    with open(folder / "log.csv", "a") as f:
        f.write(",".join(map(str, metric_rows([10.0, 20.0, 30.0], False, None)[2].values())) + "\n")
    text = report(tmp_path / "runs", "--out", tmp_path / "out", "--no-cost")
    row = results_rows(text)["student"]
    assert (row["status"], row["epochs"], row["last top-1"]) == ("unfinished", "3/2", "30.00")
    assert "summary.json is of epoch 2, log.csv goes on to epoch 3" in capsys.readouterr().err


def test_blown_up_runs_and_a_table_at_chance_are_named(tmp_path: Path, capsys, rendered):
    runs = tmp_path / "runs"
    write_run(runs / "blown", STUDENT, [10.0, 1.0, 1.0])
    set_log_column(runs / "blown", "test_loss", [4.0, 3.3e13, float("inf")])
    write_run(runs / "recovered", {**STUDENT, "lr": 0.3}, [10.0, 12.0, 14.0])
    set_log_column(runs / "recovered", "test_loss", [4.0, 50.0, 4.1])  # 50 > 10 ln 100 = 46
    text, _ = report_with_problems([runs, "--out", tmp_path / "out", "--no-cost"], capsys)
    rows = results_rows(text)
    assert rows["blown"]["status"] == "blown up"
    assert rows["recovered"]["status"] == "done (blew up at epoch 2, recovered)"
    assert "Every run here is at chance" not in text  # 14 % is learning, on 300 images

    chance = tmp_path / "chance"
    for seed in (0, 1):  # 1.0 and 2.0 %: within 3 standard errors of 1 % on 300 test images
        write_run(chance / f"s{seed}", {**STUDENT, "seed": seed}, [1.0, 1.0 + seed],
                  logits_seed=seed)
    text, _ = report_with_problems([chance, "--out", tmp_path / "out2", "--no-cost"], capsys)
    assert "**Every run here is at chance**" in text

"""The results report of plots/plot_runs.py on hand-written run folders in the current format:
seed groups, reliability bins, dark knowledge, model cost, and how it reports broken runs."""
import csv
import json
from pathlib import Path

import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import (CLASS_TO_COARSE, CLASSES, KD, N_TEST, STUDENT, TEACHER, fake_logits,
                     metric_rows, report, results_rows, write_run)
from kd.metrics import expected_calibration_error
from kd.models import build_model
from plots import calibration, cost
from plots.calibration import reliability_bins
from plots.dark_knowledge import superclass_mass
from plots.groups import group_label
from plots.plot_runs import main
from plots.rundata import find_run_folders, run_labels

@pytest.fixture(autouse=True)
def unrendered(request, monkeypatch):
    """Most tests here read results.md and the warnings: their figures are built (every plotting
    call runs) and saved as empty files, not rendered (about a second a report). The tests that
    read the PNGs, and those of non-finite and blown-up values, ask for `rendered`."""
    if "rendered" not in request.fixturenames:
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                            lambda fig, path, **kwargs: Path(path).write_bytes(b""))


@pytest.fixture
def rendered():
    """The figures rendered as the report renders them (see `unrendered`)."""


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """A teacher, a baseline picked on val, and a KD experiment with seeds 0 and 1 (which also
    differ in how they ran: the teacher's path, --overwrite, the environment, the GPUs)."""
    root = tmp_path / "exp"
    write_run(root / "teacher", TEACHER, [50.0, 60.0, 58.0])
    write_run(root / "baseline", STUDENT, [10.0, 30.0, 25.0], val_top1=[12.0, 20.0, 28.0],
              logits_seed=None)
    write_run(root / "kd" / "seed0", KD, [20.0, 41.0, 40.0], logits_seed=1)
    write_run(root / "kd" / "seed1", {**KD, "seed": 1, "teacher_ckpt": "copy/best.pt",
                                       "overwrite": True, "world_size": 2,
                                       "per_rank_batch_size": 64}, [22.0, 43.0, 44.0],
              logits_seed=2)
    return root


def left_out(text: str) -> list[str]:
    """The items of results.md's list of what was left out."""
    if "\nLeft out:\n" not in text:
        return []
    items = text.split("\nLeft out:\n\n")[1].split("\n\n")[0]
    return [line.removeprefix("- ") for line in items.splitlines()]


first_table = results_rows  # the results tables, merged


def test_results_table_groups_seeds(experiment: Path, tmp_path: Path, capsys):
    text = report(experiment, "--out", tmp_path / "out", "--no-cost")
    captured = capsys.readouterr()
    assert captured.out == text
    rows = first_table(text)
    assert list(rows) == ["teacher", "baseline", "kd/seed{0,1}"]
    kd = rows["kd/seed{0,1}"]
    assert (kd["role"], kd["n"], kd["seeds"], kd["best epoch"]) == ("KD student", "2", "0,1", "2,3")
    assert kd["best top-1"] == "42.50 ± 2.12"  # 41 and 44, sample std
    assert kd["last top-1"] == "42.00 ± 2.83"  # 40 and 44
    assert kd["last top-5"] == "62.00 ± 2.83"
    assert kd["last NLL"] == "2.900 ± 0.141"  # 5 - top1 / 20
    assert kd["last ECE %"] == "5.80 ± 0.28"  # 10 - top1 / 10
    assert kd["last super top-1"] == "52.00 ± 2.83"
    assert kd["last agree"] == "62.00 ± 2.83"
    assert kd["best by"] == "test" and kd["method"] == "kd" and rows["baseline"]["method"] == "ce"
    baseline = rows["baseline"]  # picked on val: epoch 3, although test top-1 peaks at epoch 2
    assert (baseline["best by"], baseline["best epoch"], baseline["best top-1"]) == \
        ("val", "3", "25.00")
    assert (baseline["n"], baseline["last agree"], baseline["status"]) == ("1", "–", "done")
    assert rows["teacher"]["best top-1"] == "60.00" and rows["teacher"]["last top-1"] == "58.00"
    assert rows["teacher"]["train time (min)"] == "1.5"  # 3 epochs of 30 s, not total_time_s
    assert "params (M)" not in text and "## Model cost" not in text
    assert left_out(text) == ["left out of the reliability diagrams: baseline (no logits_best.pt)"]
    assert captured.err.splitlines() == [f"warning: {line}" for line in left_out(text)]


def test_figures_are_valid_pngs(experiment: Path, tmp_path: Path, rendered):
    out = tmp_path / "out"
    text = report(experiment, "--out", out, "--no-cost")
    names = ["test_top1.png", "train_top1.png", "train_ce.png", "train_objective.png", "lr.png",
             "comparison.png", "reliability.png", "dark_knowledge.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    for name in names:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 600 and image.std() > 0.05, name
        assert f"![{name}]({name})" in text


def reference_mass(logits: np.ndarray, labels: np.ndarray, T: float) -> list[float]:
    """true, same, other, same per class, other per class: image by image, class by class."""
    z = logits.astype(np.float64) / T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    coarse = CLASS_TO_COARSE.numpy()
    sums = np.zeros(5)
    for i, y in enumerate(labels):
        same = [j for j in range(CLASSES) if coarse[j] == coarse[y] and j != y]
        other = [j for j in range(CLASSES) if coarse[j] != coarse[y]]
        assert (len(same), len(other)) == (4, 95)
        s, o = p[i, same].sum(), p[i, other].sum()
        sums += [p[i, y], s, o, s / 4, o / 95]
    return list(sums / len(labels))


def test_dark_knowledge_against_reference(experiment: Path, tmp_path: Path):
    text = report(experiment, "--out", tmp_path / "out", "--no-cost")
    blob = torch.load(experiment / "teacher" / "logits_best.pt", weights_only=True)["test"]
    logits, labels = blob["logits"].float(), blob["labels"]
    section = text[text.index("## Dark knowledge"):]
    for T in (1.0, 3.0):  # 3: the T of the KD runs
        ref = reference_mass(logits.numpy(), labels.numpy(), T)
        got = superclass_mass(logits, labels, CLASS_TO_COARSE, T)
        keys = ["true", "same", "other", "same_per_class", "other_per_class"]
        assert [got[k] for k in keys] == pytest.approx(ref, rel=1e-5)
        assert got["ratio"] == pytest.approx(ref[3] / ref[4], rel=1e-5)
        assert ref[3] > 2 * ref[4]  # the fake teacher does favour the true superclass
        cells = ["teacher", f"{T:g}", *(f"{100 * r:.3g}" for r in ref), f"{ref[3] / ref[4]:.1f}"]
        assert "| " + " | ".join(cells) + " |" in section


def test_dark_knowledge_default_temperature(tmp_path: Path):
    write_run(tmp_path / "runs" / "teacher", TEACHER, [50.0])
    text = report(tmp_path / "runs", "--out", tmp_path / "out", "--no-cost")
    section = text[text.index("## Dark knowledge"):]
    assert "| teacher | 1 |" in section and "| teacher | 4 |" in section  # no KD run: T = 4


def test_reliability_bins_by_hand():
    probs = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.38, 0.62], [0.55, 0.45]])
    labels = torch.tensor([1, 0, 1, 0])
    bins = reliability_bins(probs.log(), labels)
    filled = {i: (bins["count"][i].item(), bins["accuracy"][i].item(),
                  bins["confidence"][i].item()) for i in range(15) if bins["count"][i] > 0}
    assert filled == {13: pytest.approx((2, 0.5, 0.9)), 9: pytest.approx((1, 1.0, 0.62)),
                      8: pytest.approx((1, 1.0, 0.55))}  # 0.9 in (13/15, 14/15], ...
    assert bins["ece"] == pytest.approx((2 * 0.4 + 0.38 + 0.45) / 4)
    assert bins["accuracy"][0].isnan()


def set_log_column(folder: Path, column: str, values: list[float]) -> None:
    """Rewrite one column of log.csv, formatted as kd/logger.py formats floats."""
    with open(folder / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, value in zip(rows, values):
        row[column] = f"{value:.6g}"
    with open(folder / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_reliability_ece_equals_logged_ece(tmp_path: Path, monkeypatch):
    """The ECE in the panel title and results.md's logged test_ece agree on the same logits."""
    folder = write_run(tmp_path / "runs" / "student", STUDENT, [10.0, 30.0, 25.0], logits_seed=3)
    saved = torch.load(folder / "logits_best.pt", weights_only=True)["test"]
    assert saved["logits"].dtype == torch.float32
    ece = 100 * expected_calibration_error(saved["logits"], saved["labels"]).item()
    assert 1 < ece < 99
    set_log_column(folder, "test_ece", [ece + 5, ece, ece + 7])  # epoch 2 is the best
    titles = []
    draw = calibration.draw_reliability
    monkeypatch.setattr(calibration, "draw_reliability",
                        lambda ax, hist_ax, bins, title: titles.append(title) or
                        draw(ax, hist_ax, bins, title))
    rows = first_table(report(tmp_path / "runs", "--out", tmp_path / "out", "--no-cost"))
    assert rows["student"]["best epoch"] == "2"
    assert rows["student"]["best ECE %"] == f"{ece:.2f}"
    assert titles == [f"student\nstudent, ECE {ece:.2f}%"]


def test_labels_tell_same_named_runs_apart(tmp_path: Path):
    write_run(tmp_path / "sweep" / "a" / "kd", KD, [10.0])
    write_run(tmp_path / "sweep" / "b" / "kd", {**KD, "lr": 0.2}, [11.0])
    folders = find_run_folders([tmp_path / "sweep"])
    assert run_labels(folders) == ["a/kd", "b/kd"]
    assert run_labels([tmp_path / "sweep" / "a" / "kd"]) == ["kd"]
    twice = [tmp_path / "sweep", tmp_path / "sweep" / "b" / ".." / "a" / "kd"]
    assert run_labels(find_run_folders(twice)) == ["a/kd", "b/kd"]  # named twice, listed once
    assert group_label(["kd_s1", "kd_s10"]) == "kd_s1{,0}"


@pytest.mark.parametrize("change, finished, settings", [
    ({"lr": 0.2}, True, ("lr=0.1", "lr=0.2")), ({"T": 4.0}, True, ("T=3", "T=4")),
    ({"teacher_sha256": "cd34"}, True, ("teacher_sha256=ab12", "teacher_sha256=cd34")),
    ({}, False, ("–", "–")),
    ({"method": "dkd", "logit_std": True}, True, ("–", "–"))],  # a method's own: not compared
    ids=["lr", "T", "teacher", "unfinished", "method"])
def test_runs_that_differ_in_more_than_seed_are_not_grouped(tmp_path: Path, change: dict,
                                                            finished: bool, settings: tuple):
    write_run(tmp_path / "runs" / "kd0", KD, [10.0])
    kd1 = write_run(tmp_path / "runs" / "kd1", {**KD, "seed": 1, **change}, [11.0])
    if not finished:
        (kd1 / "summary.json").unlink()
    rows = first_table(report(tmp_path / "runs", "--out", tmp_path / "out", "--no-cost"))
    assert set(rows) == {"kd0", "kd1"} and rows["kd1"]["n"] == "1"
    assert rows["kd1"]["method"] == ("dkd+logit_std" if "method" in change else "kd")
    assert (rows["kd0"]["settings"], rows["kd1"]["settings"]) == settings  # the flags that differ


def test_cost_of_student(tmp_path: Path):
    config = {"arch": "mobilenet_v3_small", "stem": "cifar"}
    result = cost.measure(config, repeats=2)
    model, macs = build_model(config, "config").eval(), []

    def count(module, inputs, output):  # reference: MACs of every conv and linear layer
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs.append(output.numel() * k)
        elif isinstance(module, nn.Linear):
            macs.append(module.in_features * module.out_features)
    for m in model.modules():
        m.register_forward_hook(count)
    model(torch.zeros(1, 3, 32, 32))
    assert result["macs"] == sum(macs)
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["latency_ms"] > 0  # its size depends on the machine and its load


def test_cost_is_cached(tmp_path: Path, monkeypatch):
    calls = []
    monkeypatch.setattr(cost, "measure", lambda config, repeats: calls.append(repeats) or
                        {"params": 2_000_000, "macs": 30_000_000, "latency_ms": 1.5})
    configs = [KD, STUDENT, TEACHER]  # the two students are one model
    first = cost.model_costs(configs, tmp_path / "cache.json", repeats=5)
    assert list(first) == ["mobilenet_v3_small/cifar-stem@32px", "resnet50@32px"]
    assert calls == [5, 5]
    assert cost.model_costs(configs, tmp_path / "cache.json", repeats=5) == first
    assert calls == [5, 5]  # nothing measured again
    cost.model_costs([STUDENT], tmp_path / "cache.json", repeats=7)
    assert calls == [5, 5, 7]  # another number of timed passes is measured again


def test_report_with_cost(tmp_path: Path, monkeypatch):
    write_run(tmp_path / "runs" / "student", STUDENT, [10.0, 12.0], logits_seed=None)
    write_run(tmp_path / "runs" / "old", {"arch": "mobilenet_v3_small"}, [5.0], logits_seed=None)
    out = tmp_path / "out"
    text = report(tmp_path / "runs", "--out", out, "--latency_runs", "2")
    rows = first_table(text)
    assert (rows["student"]["params (M)"], rows["student"]["MACs (M)"]) == ("1.62", "17.6")
    assert rows["old"]["params (M)"] == "–"  # no stem recorded: the model is unknown
    assert "## Model cost" in text and cost.cpu_name() in text
    assert "| mobilenet_v3_small/cifar-stem@32px | 1.62 | 17.6 |" in text
    assert "mobilenet_v3_small/cifar-stem@32px" in json.loads((out / "cost_cache.json").read_text())


def run_error(argv: list, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, argv)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


def report_with_problems(argv: list, capsys) -> tuple[str, list[str]]:
    """results.md of a report that had to leave things out, and those things; each is also one
    warning line on stderr."""
    text = report(*argv)
    captured = capsys.readouterr()
    assert captured.out == text and "Traceback" not in captured.err
    assert captured.err.splitlines() == [f"warning: {line}" for line in left_out(text)]
    return text, left_out(text)


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
    assert set(first_table(text)) == {"teacher", "baseline", "kd/seed{0,1}"}


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
    assert "starting" not in first_table(text)


def test_run_in_progress_is_tabulated(tmp_path: Path, capsys):
    folder = write_run(tmp_path / "runs" / "running", {**STUDENT, "epochs": 10}, [10.0, 30.0])
    (folder / "summary.json").unlink()
    (folder / "config.json").write_text(json.dumps({**STUDENT, "epochs": 10}))
    text, skipped = report_with_problems([tmp_path / "runs", "--out", tmp_path / "out",
                                          "--no-cost"], capsys)
    row = first_table(text)["running"]
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
    row = first_table(text)["run"]
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
    assert list(first_table(text)) == ["teacher", "kd/seed{0,1}"]


def test_non_numeric_row_in_the_middle_is_dropped(tmp_path: Path, capsys):
    folder = write_run(tmp_path / "run", STUDENT, [10.0, 30.0, 25.0], logits_seed=None)
    lines = (folder / "log.csv").read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace("30.0", "x", 1)
    (folder / "log.csv").write_text("".join(lines))
    text, skipped = report_with_problems([folder, "--out", tmp_path / "out", "--no-cost"],
                                         capsys)
    assert first_table(text)["run"]["last top-1"] == "25.00"
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
    assert len(skipped) == 2 and set(first_table(text)) == {"teacher", "baseline", "kd/seed{0,1}"}
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
    row = first_table(text)["run"]
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
    row = first_table(text)["run"]
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
    row = first_table(text)["student"]
    assert (row["status"], row["epochs"], row["last top-1"]) == ("unfinished", "3/2", "30.00")
    assert "summary.json is of epoch 2, log.csv goes on to epoch 3" in capsys.readouterr().err


def test_blown_up_runs_and_a_table_at_chance_are_named(tmp_path: Path, capsys, rendered):
    runs = tmp_path / "runs"
    write_run(runs / "blown", STUDENT, [10.0, 1.0, 1.0])
    set_log_column(runs / "blown", "test_loss", [4.0, 3.3e13, float("inf")])
    write_run(runs / "recovered", {**STUDENT, "lr": 0.3}, [10.0, 12.0, 14.0])
    set_log_column(runs / "recovered", "test_loss", [4.0, 50.0, 4.1])  # 50 > 10 ln 100 = 46
    text, _ = report_with_problems([runs, "--out", tmp_path / "out", "--no-cost"], capsys)
    rows = first_table(text)
    assert rows["blown"]["status"] == "blown up"
    assert rows["recovered"]["status"] == "done (blew up at epoch 2, recovered)"
    assert "Every run here is at chance" not in text  # 14 % is learning, on 300 images

    chance = tmp_path / "chance"
    for seed in (0, 1):  # 1.0 and 2.0 %: within 3 standard errors of 1 % on 300 test images
        write_run(chance / f"s{seed}", {**STUDENT, "seed": seed}, [1.0, 1.0 + seed],
                  logits_seed=seed)
    text, _ = report_with_problems([chance, "--out", tmp_path / "out2", "--no-cost"], capsys)
    assert "**Every run here is at chance**" in text

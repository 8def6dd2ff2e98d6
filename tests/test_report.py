"""The results report of plots/plot_runs.py on hand-written run folders in the current format:
seed groups, reliability bins, dark knowledge, model cost. How it reports broken runs:
test_report_problems.py."""
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import (CLASS_TO_COARSE, CLASSES, KD, STUDENT, TEACHER, left_out, report,
                     results_rows, set_log_column, write_run)
from kd.metrics import expected_calibration_error
from kd.models import build_model
from plots import calibration, cost
from plots.calibration import reliability_bins
from plots.dark_knowledge import superclass_mass
from plots.groups import group_label
from plots.rundata import find_run_folders, run_labels

pytestmark = pytest.mark.usefixtures("unrendered")  # conftest: figures built, not rendered


def test_results_table_groups_seeds(experiment: Path, tmp_path: Path, capsys):
    text = report(experiment, "--out", tmp_path / "out", "--no-cost")
    captured = capsys.readouterr()
    assert captured.out == text
    rows = results_rows(text)
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
    rows = results_rows(report(tmp_path / "runs", "--out", tmp_path / "out", "--no-cost"))
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
    rows = results_rows(report(tmp_path / "runs", "--out", tmp_path / "out", "--no-cost"))
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
    rows = results_rows(text)
    assert (rows["student"]["params (M)"], rows["student"]["MACs (M)"]) == ("1.62", "17.6")
    assert rows["old"]["params (M)"] == "–"  # no stem recorded: the model is unknown
    assert "## Model cost" in text and cost.cpu_name() in text
    assert "| mobilenet_v3_small/cifar-stem@32px | 1.62 | 17.6 |" in text
    assert "mobilenet_v3_small/cifar-stem@32px" in json.loads((out / "cost_cache.json").read_text())

"""The study section of the report (plots/study.py): selection on validation data, the paired
confidence interval by hand, and what it names (ties, missing baseline, few seeds, the teacher)."""
import json
import math
from pathlib import Path

import pytest

from plots.rundata import load_runs
from plots.study import gain, paired_interval, read_study, study_section, t_quantile
from helpers import STUDENT, fake_logits, report, write_run


def test_t_quantiles_and_the_paired_interval_by_hand():
    for df, table in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)]:
        assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)
    # d = 3, 2.5, 3: mean 17/6, sd = sqrt(1/12), half width = t(0.975, 2) * sd / sqrt(3)
    mean, low, high = paired_interval([3.0, 2.5, 3.0])
    half = 4.302653 * math.sqrt(1 / 12) / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((17 / 6, 17 / 6 - half, 17 / 6 + half), abs=1e-5)
    assert math.isnan(paired_interval([1.0])[1])


def write_study(root: Path) -> Path:
    """A study folder by hand: CE and two kd points over seeds 0-2. T=4 has the best validation
    top-1 and T=2 the best test top-1, so selecting on test would pick the other point."""
    (root / "study.json").parent.mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({"commands": ["python study.py"]}))
    kd = {**STUDENT, "method": "kd", "alpha": 0.5, "teacher_ckpt": "t.pt", "teacher_sha256": "ab"}
    for seed, ce_test, t4_test in [(0, 60.0, 63.0), (1, 61.0, 63.5), (2, 62.0, 65.0)]:
        write_run(root / "ce" / f"seed{seed}", {**STUDENT, "seed": seed}, [50.0, ce_test],
                  val_top1=[50.0, 55.0], logits_seed=None)
        write_run(root / "kd-T4" / f"seed{seed}", {**kd, "T": 4.0, "seed": seed},
                  [50.0, t4_test], val_top1=[50.0, 70.0 + seed], logits_seed=None)
        write_run(root / "kd-T2" / f"seed{seed}", {**kd, "T": 2.0, "seed": seed},
                  [50.0, 80.0], val_top1=[50.0, 60.0], logits_seed=None)
    return root


def test_study_report_selects_on_validation_and_pairs_by_seed(tmp_path):
    root = write_study(tmp_path / "runs" / "study")
    write_run(root / "kd-T8" / "seed0", {**STUDENT, "method": "kd", "T": 8.0, "teacher_ckpt": "t",
                                         "teacher_sha256": "ab", "alpha": 0.5}, [1.0],
              val_top1=[99.0], logits_seed=None)
    (root / "kd-T8" / "seed0" / "summary.json").unlink()  # unfinished: never selected
    text = report(tmp_path / "runs", "--out", tmp_path / "out", "--no-cost")
    section = text.split("## Study: ")[1]
    assert "- not finished yet, left out: kd-T8/seed0\n" in section
    table = [[c.strip() for c in line.strip("|").split("|")]
             for line in section.split("| method |")[1].split("\n\n")[0].splitlines()[2:]]
    half = 4.302653 * math.sqrt(1 / 12) / math.sqrt(3)
    assert table[0][:5] == ["ce", "–", "3", "55.00 ± 0.00", "61.00 ± 1.00"]
    assert table[1][:5] == ["kd", "T=4 (of 2)", "3", "71.00 ± 1.00", "63.83 ± 1.04"]
    assert table[1][5] == f"+{17 / 6:.2f} [+{17 / 6 - half:.2f}, +{17 / 6 + half:.2f}] (n=3)"
    assert table[1][6] == "helps: the interval is above 0"
    assert table[1][7:] == ["3.62 ± 0.10", "83.83 ± 1.04"]  # ECE 10 - top1/10, agree top1 + 20
    assert "| T=4 (selected) | 3 | 71.00 ± 1.00 |" in section
    assert "| T=2 | 3 | 60.00 ± 0.00 |" in section
    for name in ("study_heatmap_kd.png", "study_curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000 and f"]({name})" in section


def test_study_needs_one_baseline(tmp_path):
    root = write_study(tmp_path / "study")
    write_run(root / "ce-other" / "seed0", {**STUDENT, "lr": 0.5}, [1.0, 2.0], val_top1=[1.0, 2.0],
              logits_seed=None)
    runs_study = read_study("study", load_runs([root])[0])
    assert runs_study.baseline is None and "2 finished CE baselines (one is needed)" in \
        runs_study.notes[0]
    assert runs_study.selected["kd"].setting == {"T": 4.0}


def test_ties_and_runs_of_one_seed_twice_are_named(tmp_path):
    root = write_study(tmp_path / "study")
    kd = json.loads((root / "kd-T4" / "seed0" / "config.json").read_text())
    write_run(root / "kd-T4-copy" / "seed0", kd, [50.0, 63.0], val_top1=[50.0, 70.0],
              logits_seed=None)  # the same run as kd-T4/seed0, in another folder
    for seed in range(3):
        write_run(root / "kd-T3" / f"seed{seed}", {**kd, "T": 3.0, "seed": seed}, [50.0, 99.0],
                  val_top1=[50.0, 70.0 + seed], logits_seed=None)  # ties with T=4
    result = read_study("study", load_runs([root])[0])
    assert "kd T=4: more than one run of a seed; left out: kd-T4/seed0" in result.notes
    assert "kd: T=3 and T=4 tie on validation top-1; the first in grid order, T=3, is shown as " \
           "selected" in result.notes
    assert result.selected["kd"].label == "T=3" and len(result.methods["kd"][2].runs) == 3


def test_a_gain_over_fewer_seeds_than_the_columns_is_named(tmp_path):
    root = write_study(tmp_path / "study")
    for name in ("kd-T2", "kd-T4"):
        (root / name / "seed2" / "summary.json").unlink()  # seed 2 of the grid not finished
    result = read_study("study", load_runs([root])[0])
    assert "kd: its selected point has seeds [0, 1], the baseline [0, 1, 2]: the gain pairs the " \
           "2 they share, the other columns average each point's own" in result.notes
    half = 12.7062 * 0.25  # d = 3, 2.5: sd = sqrt(0.125), se = sd / sqrt(2) = 0.25
    assert gain(result.selected["kd"], result.baseline) == \
        pytest.approx((2.75, 2.75 - half, 2.75 + half, 2), abs=1e-3)


def test_the_study_names_its_teacher_accuracy(tmp_path):
    root = write_study(tmp_path / "study")
    kd = json.loads((root / "kd-T4" / "seed0" / "config.json").read_text())
    write_run(root / "kd-T6" / "seed0", {**kd, "T": 6.0}, [50.0, 63.0], val_top1=[50.0, 1.0],
              logits_seed=3)
    test = fake_logits(3, structured=False, kd=True)["test"]
    expected = 100 * (test["teacher_logits"].argmax(1) == test["labels"]).float().mean().item()
    result = read_study("study", load_runs([root])[0])
    assert result.teachers == {"ab": pytest.approx(expected)}
    section = study_section(result, tmp_path, "s_")
    assert f"The teacher: test top-1 {expected:.2f} % (from the distilled runs'" in section

"""What several test modules share: paths, short-run flags, running a script in-process, the
one-line error check, hand-written run folders as kd/train.py writes them, and small training
pieces. Fixtures live in conftest.py."""
import contextlib
import csv
import io
import json
import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import kd.errors
import study
from kd.data import DeviceLoader, Split, load_split
from kd.optim import make_optimization
from plots.plot_runs import main as plot_runs_main

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# A short run of any script on fake_data (the pipeline tests, the teacher below, the study)
TINY_RUN = ["--epochs", "2", "--batch_size", "100", "--eval_batch_size", "64", "--no-download"]
# The runs of a study in the tests (test_study*.py): one epoch each
STUDY_RUN = ["--epochs", "1", "--batch_size", "100", "--eval_batch_size", "100", "--no-download"]


def planned(argv: list[str]) -> list:
    """The study.Job list study.py plans from argv."""
    args, rest = study.build_parser().parse_known_args(argv)
    return study.plan(args, study.flag_values(rest))


class RunsCode:
    """A pickle payload: unpickling it runs `touch marker` (for the refusal tests)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_in_process(script, argv: list[str], monkeypatch, capsys=None) -> SimpleNamespace:
    """Run a script's main() (a path under the repo, or the function) through
    kd.errors.run_script in this process, as `python script argv` would, without seconds of
    imports; returns its exit code, stdout and stderr (read from capsys, or captured here when
    there is none, as in a module-scoped fixture)."""
    main = runpy.run_path(str(REPO / script))["main"] if isinstance(script, str) else script
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, argv)])
    monkeypatch.setattr(kd.errors.signal, "signal", lambda *a: None)  # keep pytest's Ctrl-C
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as capture:
        if capsys is None:
            capture.enter_context(contextlib.redirect_stdout(out))
            capture.enter_context(contextlib.redirect_stderr(err))
        try:
            kd.errors.run_script(main)
            code = 0
        except SystemExit as e:
            code = e.code
    if capsys is not None:
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_one_line_error(result, *phrases) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ")
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def cache_flags(teacher_ckpt, data_dir: str) -> SimpleNamespace:
    """The flags kd.cache.open_cache reads, for a teacher checkpoint and a data folder (CPU:
    float32 whatever --amp says)."""
    return SimpleNamespace(teacher_ckpt=str(teacher_ckpt), data_dir=str(data_dir), download=False,
                           amp=True, amp_dtype="bf16")


def optimization(model, steps_per_epoch, warmup_epochs=0.0):
    args = SimpleNamespace(lr=0.05, momentum=0.9, weight_decay=5e-4, warmup_epochs=warmup_epochs,
                           epochs=1, amp=True, amp_dtype="bf16")  # amp: ignored on CPU
    return make_optimization(args, model, steps_per_epoch, CPU)


def train_loader(fake_data, batch_size=50, n_images=300):
    split = load_split(fake_data, train=True)
    split = Split(split.images[:n_images], split.labels[:n_images],
                  split.coarse_labels[:n_images], split.classes)
    return DeviceLoader(split, batch_size, CPU, train=True, seed=0)


N_TEST, CLASSES = 300, 100
CLASS_TO_COARSE = torch.randperm(CLASSES, generator=torch.Generator().manual_seed(0)) // 5
ENVIRONMENT = {"torch": "2.14", "torchvision": "0.29", "device_name": "cpu"}


def metric_rows(top1: list[float], kd: bool, val_top1: list[float] | None) -> list[dict]:
    """log.csv rows whose other metrics follow from test top-1, so expected values are easy."""
    rows = []
    for i, acc in enumerate(top1):
        row = {"epoch": i + 1, "lr": 0.1 / (i + 1), "train_loss": 4.0 - i, "train_top1": acc + 5}
        if kd:
            row.update(train_ce=3.0 - i, train_kd=1.0)
        row.update(test_loss=5 - acc / 20, test_top1=acc, test_top5=acc + 20,
                   test_ece=10 - acc / 10, test_super_top1=acc + 10, test_err_in_super=30.0)
        if kd:
            row.update(test_agree=acc + 20, test_kl_t_s=1.0)
        if val_top1:
            row.update(val_loss=1.0, val_top1=val_top1[i])
        rows.append({**row, "epoch_time_s": 30.0, "train_img_per_s": 1000.0})
    return rows


def fake_logits(seed: int, structured: bool, kd: bool) -> dict:
    """logits_best.pt content; structured logits favour the true class and its superclass."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_TEST) % CLASSES
    logits = torch.randn(N_TEST, CLASSES, generator=g) * 2
    if structured:
        same = CLASS_TO_COARSE[None, :] == CLASS_TO_COARSE[labels][:, None]
        logits += 3 * same + 4 * nn.functional.one_hot(labels, CLASSES)
    test = {"logits": logits, "labels": labels, "coarse_labels": CLASS_TO_COARSE[labels]}
    if kd:
        test["teacher_logits"] = torch.randn(N_TEST, CLASSES, generator=g)
    return {"epoch": 2, "test": test}


def write_run(folder: Path, config: dict, top1: list[float], val_top1: list[float] | None = None,
              logits_seed: int | None = 0) -> Path:
    """A finished run folder as kd/train.py writes it; logits_best.pt unless logits_seed is None."""
    folder.mkdir(parents=True)
    kd = "teacher_ckpt" in config
    rows = metric_rows(top1, kd, val_top1)
    (folder / "log.csv").write_text(
        "\n".join([",".join(rows[0])] + [",".join(map(str, r.values())) for r in rows]) + "\n")
    config = {**config, **ENVIRONMENT, "out_dir": str(folder), "epochs": len(top1),
              "command": f"script.py --out_dir {folder}", "git_commit": folder.name}
    (folder / "config.json").write_text(json.dumps(config))
    select = "val_top1" if val_top1 else "test_top1"
    pick = lambda r: {k: v for k, v in r.items() if k == "epoch" or k[:4] in ("val_", "test")}
    best = pick(max(rows, key=lambda r: r[select]))  # max keeps the first of equal values
    (folder / "summary.json").write_text(json.dumps({
        "selected_by": select, "best_epoch": best["epoch"], "best_test_top1": best["test_top1"],
        "best_test_top5": best["test_top5"], "last_test_top1": top1[-1],
        "last_test_top5": top1[-1] + 20, "epochs": len(top1), "total_time_s": 999.0,
        "best": best, "last": pick(rows[-1])}))
    if logits_seed is not None:
        blob = fake_logits(logits_seed, config["arch"] == "resnet50", kd)
        torch.save(blob, folder / "logits_best.pt")
        torch.save(blob, folder / "logits_last.pt")
    return folder


TEACHER = {"arch": "resnet50", "img_size": 32, "seed": 0, "lr": 0.05}
STUDENT = {"arch": "mobilenet_v3_small", "stem": "cifar", "seed": 0, "lr": 0.1}
KD = {**STUDENT, "alpha": 0.5, "T": 3.0, "teacher_ckpt": "exp/teacher/best.pt",
      "teacher_sha256": "ab12"}


def report(*argv: str | Path) -> str:
    plot_runs_main([*map(str, argv)])
    return Path(argv[argv.index("--out") + 1], "results.md").read_text()


def results_rows(text: str) -> dict[str, dict[str, str]]:
    """The report's results tables (accuracy, then calibration and cost), their rows merged and
    keyed by run."""
    tables = [t for t in text[text.index("\n|"):].strip().split("\n\n")[:2] if t.startswith("|")]
    merged: dict[str, dict[str, str]] = {}
    for table in tables:
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
        for row in rows[2:]:
            merged.setdefault(row[0], {}).update(zip(rows[0], row))
    return merged


def left_out(text: str) -> list[str]:
    """The items of results.md's list of what was left out."""
    if "\nLeft out:\n" not in text:
        return []
    items = text.split("\nLeft out:\n\n")[1].split("\n\n")[0]
    return [line.removeprefix("- ") for line in items.splitlines()]


def run_error(argv: list, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        plot_runs_main([*map(str, argv)])
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

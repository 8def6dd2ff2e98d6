"""Run folders: finding them, naming them, and reading config.json, log.csv, summary.json and the
test logits in logits_best.pt. Anything unreadable raises InputError."""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

TEACHER_ARCH = "resnet50"
REQUIRED_COLUMNS = ["epoch", "lr", "train_loss", "test_top1", "test_top5", "epoch_time_s"]
SUMMARY_KEYS = ["best_test_top1", "best_test_top5", "best_epoch", "last_test_top1",
                "last_test_top5", "epochs", "total_time_s"]


class InputError(Exception):
    """Bad input the user can fix; main() prints it as one line and exits with code 2."""


@dataclass
class Run:
    label: str  # the folder's path relative to the common root of all runs
    folder: Path
    config: dict
    log: pd.DataFrame
    summary: dict | None  # None while the run is unfinished
    logits: dict | None  # test split of logits_best.pt (float32); None if the file is missing

    @property
    def arch(self) -> str:
        return str(self.config.get("arch", "?"))

    @property
    def is_teacher(self) -> bool:
        return self.arch == TEACHER_ARCH

    @property
    def is_kd(self) -> bool:
        return "teacher_ckpt" in self.config or "train_kd" in self.log.columns

    @property
    def role(self) -> str:
        return "teacher" if self.is_teacher else "KD student" if self.is_kd else "student"


def find_run_folders(paths: list[Path]) -> list[Path]:
    """Each path that is a run folder (holds log.csv), else every run folder below it; once each."""
    found: dict[Path, Path] = {}
    for path in paths:
        if not path.is_dir():
            raise InputError(f"{path} is not a folder")
        runs = [path] if (path / "log.csv").is_file() else \
            sorted(p.parent for p in path.rglob("log.csv") if p.is_file())
        if not runs:
            raise InputError(f"{path} is not a run folder and holds none (no log.csv below it)")
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def run_labels(folders: list[Path]) -> list[str]:
    """Each folder's path relative to the deepest folder above all of them, so that runs/a/kd and
    runs/b/kd are told apart as a/kd and b/kd."""
    resolved = [f.resolve() for f in folders]
    root = Path(os.path.commonpath([f.parent for f in resolved]))
    return [f.relative_to(root).as_posix() for f in resolved]


def read_json(path: Path) -> dict | None:
    """The JSON object in path, or None if the file does not exist."""
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path} does not hold a JSON object")
    return obj


def read_log(path: Path) -> pd.DataFrame:
    """log.csv as a numeric DataFrame with at least one row and the REQUIRED_COLUMNS."""
    try:
        log = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in log.columns]
    if missing:
        raise InputError(f"{path} lacks the columns {', '.join(missing)}")
    if log.empty:
        raise InputError(f"{path} has no epochs yet")
    try:
        return log.apply(pd.to_numeric)
    except ValueError as e:
        raise InputError(f"{path} has a non-numeric value: {e}") from None


def read_test_logits(path: Path) -> dict | None:
    """{'logits' [N, C] float32, 'labels' [N], 'coarse_labels' [N]} of the test split; None if
    the file does not exist."""
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling fails in many ways; all mean the same to the user
        reason = (str(e).strip().splitlines() or [""])[0]
        raise InputError(f"cannot read {path} with torch.load ({type(e).__name__}: "
                         f"{reason[:150]})") from None
    test = blob.get("test") if isinstance(blob, dict) else None
    if not isinstance(test, dict) or not all(
            isinstance(test.get(k), torch.Tensor) for k in ("logits", "labels", "coarse_labels")):
        raise InputError(f"{path} has no test logits, labels and coarse_labels")
    logits, labels = test["logits"].float(), test["labels"].long()
    rows = logits.shape[:1]
    if logits.ndim != 2 or labels.shape != rows or test["coarse_labels"].shape != rows:
        raise InputError(f"{path}: the test logits must be [N, classes], with N labels and "
                         f"N coarse labels")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise InputError(f"{path}: no test images, or labels outside 0..{logits.shape[1] - 1}")
    return {"logits": logits, "labels": labels, "coarse_labels": test["coarse_labels"].long()}


def load_run(folder: Path, label: str) -> Run:
    summary = read_json(folder / "summary.json")
    missing = [k for k in SUMMARY_KEYS if summary is not None and k not in summary]
    if missing:
        raise InputError(f"{folder / 'summary.json'} lacks the keys {', '.join(missing)}")
    return Run(label=label, folder=folder, config=read_json(folder / "config.json") or {},
               log=read_log(folder / "log.csv"), summary=summary,
               logits=read_test_logits(folder / "logits_best.pt"))


def load_runs(paths: list[Path]) -> list[Run]:
    """The runs in or below paths: teachers first, then baseline students, then KD students."""
    folders = find_run_folders(paths)
    runs = [load_run(f, label) for f, label in zip(folders, run_labels(folders))]
    return sorted(runs, key=lambda r: (not r.is_teacher, r.is_kd, r.label))

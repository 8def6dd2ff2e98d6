"""Run folders: finding them, naming them, and reading config.json, log.csv, summary.json, the
test logits in logits_best.pt and kd.export's export/validation.json.

A problem with one run never stops the report: the run is read as far as it can be, and each
part left out is named in a line 'what: run (why)'. Only bad arguments raise UserError.
"""
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from kd.checkpoint import file_sha256
from kd.errors import UserError
from kd.methods import DEFAULT as DEFAULT_METHOD
from kd.models import TEACHER_ARCH
from kd.rundir import EXPORT_FILE, is_distilled, settings

REQUIRED_COLUMNS = ["epoch", "lr", "train_loss", "test_top1", "test_top5", "epoch_time_s"]
RUN_MARKERS = ("config.json", "log.csv")  # config.json from a run's start, log.csv after epoch 1


@dataclass
class Run:
    label: str  # the folder's path relative to the common root of all runs
    folder: Path
    config: dict
    log: pd.DataFrame  # at least one row
    summary: dict | None  # None while the run is unfinished; has integer epochs and best_epoch
    logits: dict | None  # test split of logits_best.pt, all finite; None if missing or unusable
    export: dict | None = None  # kd.export's validation.json, of the checkpoint the run holds

    @property
    def arch(self) -> str:
        return str(self.config.get("arch", "?"))

    @property
    def is_teacher(self) -> bool:
        return self.arch == TEACHER_ARCH

    @property
    def is_kd(self) -> bool:
        return is_distilled(self.config, self.log.columns)

    @property
    def role(self) -> str:
        return "teacher" if self.is_teacher else "KD student" if self.is_kd else "student"

    @property
    def method(self) -> str:
        """What the run minimised: 'ce', or distill_student.py's --method (the default for runs from
        before it), '+logit_std' when it was on."""
        if not self.is_kd:
            return "ce"
        run = settings(self.config)  # an unreadable config.json reads as {}
        return str(run.get("method", DEFAULT_METHOD)) + "+logit_std" * bool(run.get("logit_std"))


def is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_MARKERS)


def find_run_folders(paths: list[Path]) -> list[Path]:
    """Each path that is a run folder (holds config.json or log.csv), else every run folder below
    it; once each."""
    found: dict[Path, Path] = {}
    for path in paths:
        if not path.is_dir():
            raise UserError(f"{path} is not a folder")
        runs = [path] if is_run_folder(path) else sorted(
            {p.parent for name in RUN_MARKERS for p in path.rglob(name) if p.is_file()})
        if not runs:
            raise UserError(f"{path} is not a run folder and holds none (no config.json or "
                            f"log.csv below it)")
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def run_labels(folders: list[Path]) -> list[str]:
    """Each folder's path relative to the deepest folder above all of them, so that runs/a/kd and
    runs/b/kd are told apart as a/kd and b/kd."""
    resolved = [f.resolve() for f in folders]
    root = Path(os.path.commonpath([f.parent for f in resolved]))
    return [f.relative_to(root).as_posix() for f in resolved]


def read_json(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object in path, None), (None, why it is unusable), or (None, None) if missing."""
    if not path.exists():
        return None, None
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"cannot read {path.name}: {e}"
    return (obj, None) if isinstance(obj, dict) else (None, f"{path.name} holds no JSON object")


def read_log(path: Path) -> tuple[pd.DataFrame | None, str | None]:
    """log.csv's complete rows as numbers (at least one, with the REQUIRED_COLUMNS) and why some
    rows were dropped, or None and why there are none.

    The training scripts end every row with a newline, so a last line without one was cut off
    mid-write; it is dropped, as is any row with a missing or non-numeric value ('nan' and 'inf'
    are numbers: a diverged run logs them).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, "no log.csv"
    except (OSError, UnicodeDecodeError) as e:
        return None, f"cannot read log.csv: {e}"
    try:
        cells = pd.read_csv(io.StringIO(text[:text.rfind("\n") + 1]), dtype=str,
                            keep_default_na=False)
    except pd.errors.EmptyDataError:
        return None, "log.csv is empty"
    except pd.errors.ParserError as e:
        return None, f"cannot read log.csv: {e}"
    missing = [c for c in REQUIRED_COLUMNS if c not in cells.columns]
    if missing:
        return None, f"log.csv lacks the columns {', '.join(missing)}"
    log = cells.apply(pd.to_numeric, errors="coerce")
    complete = (log.notna() | cells.isin(["nan", "NaN"])).all(axis=1) & log["epoch"].notna()
    log = log[complete].reset_index(drop=True)
    dropped = len(cells) - len(log) + (not text.endswith("\n"))
    if log.empty:
        return None, "log.csv has no complete epoch row yet"
    return log, f"{dropped} cut off or not numeric" if dropped else None


def read_test_logits(path: Path) -> tuple[dict | None, str | None]:
    """({'logits' [N, C] float32, 'labels' [N], 'coarse_labels' [N], and for a distilled run
    'teacher_logits' [N, C] when saved and finite} of the test split, None), or (None, why the
    file cannot be used)."""
    if not path.exists():
        return None, "no logits_best.pt"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling fails in many ways; all mean the same to the user
        reason = (str(e).strip().splitlines() or [""])[0]
        return None, f"cannot read logits_best.pt with torch.load ({type(e).__name__}: " \
                     f"{reason[:150]})"
    test = blob.get("test") if isinstance(blob, dict) else None
    if not isinstance(test, dict) or not all(
            isinstance(test.get(k), torch.Tensor) for k in ("logits", "labels", "coarse_labels")):
        return None, "logits_best.pt has no test logits, labels and coarse_labels"
    logits, labels = test["logits"].float(), test["labels"].long()
    rows = logits.shape[:1]
    if logits.ndim != 2 or labels.shape != rows or test["coarse_labels"].shape != rows:
        return None, "logits_best.pt: the test logits must be [N, classes], with N labels and " \
                     "N coarse labels"
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= logits.shape[1]:
        return None, f"logits_best.pt: no test images, or labels outside 0..{logits.shape[1] - 1}"
    bad_rows = (~logits.isfinite()).any(dim=1).sum().item()
    if bad_rows:
        return None, f"logits_best.pt has non-finite logits in {bad_rows} of {len(labels)} rows"
    found = {"logits": logits, "labels": labels, "coarse_labels": test["coarse_labels"].long()}
    teacher = test.get("teacher_logits")
    if isinstance(teacher, torch.Tensor) and teacher.shape == logits.shape and \
            teacher.isfinite().all():
        found["teacher_logits"] = teacher.float()
    return found, None


def is_export_record(record: dict) -> bool:
    """Whether record has every field of kd.export's validation.json the report shows."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    forms = record.get("forms")
    return isinstance(forms, list) and bool(forms) and isinstance(record.get("latency"), dict) \
        and all(isinstance(form, dict) and isinstance(form.get("form"), str)
                and all(number(form.get(k))
                        for k in ("test_top1", "top1_agreement", "max_abs_logit_diff"))
                and isinstance(form.get("latency_ms"), dict) and bool(form["latency_ms"])
                and all(isinstance(t, dict) and number(t.get("median")) and number(t.get("p90"))
                        for t in form["latency_ms"].values())
                for form in forms)


def read_export(folder: Path) -> tuple[dict | None, str | None]:
    """(kd.export's validation.json, None) when the run folder has one of the checkpoint it
    still holds; (None, why) when it cannot be used; (None, None) when there is none."""
    record, why = read_json(folder / EXPORT_FILE)
    if record is None:
        return None, why
    if not is_export_record(record):
        return None, f"{EXPORT_FILE} lacks what kd.export writes (forms with top-1, agreement, " \
                     f"logit difference and latencies; the latency method)"
    checkpoint = folder / str(record.get("checkpoint"))
    if not checkpoint.is_file() or file_sha256(str(checkpoint)) != record.get("checkpoint_sha256"):
        return None, f"{EXPORT_FILE} is of another {checkpoint.name} than the one the folder " \
                     f"holds now: run python -m kd.export again with --overwrite"
    return record, None


def load_run(folder: Path, label: str) -> tuple[Run | None, list[str]]:
    """The run as far as it can be read (None without a usable log.csv), and what was skipped."""
    skipped = []
    skip = lambda what, why: skipped.append(f"{what}: {label} ({' '.join(why.split())})")
    log, why = read_log(folder / "log.csv")
    if log is None:
        skip("left out of the report", why)
        return None, skipped
    if why:
        skip("log.csv rows left out", why)
    config, why = read_json(folder / "config.json")
    if why:
        skip("config.json not used", why)
    summary, why = read_json(folder / "summary.json")
    if summary is not None and not all(isinstance(summary.get(k), int)
                                       for k in ("epochs", "best_epoch")):
        summary, why = None, "summary.json lacks the integers epochs and best_epoch"
    elif (summary is not None
          and summary["epochs"] != log["epoch"].iloc[-1]):  # e.g. --resume --epochs
        summary, why = None, f"summary.json is of epoch {summary['epochs']}, log.csv goes on to " \
                             f"epoch {int(log['epoch'].iloc[-1])}"
    if why:
        skip("summary.json not used, the row is marked unfinished", why)
    elif summary is not None and summary["best_epoch"] not in log["epoch"].values:
        skip("best epoch taken from log.csv",
             f"summary.json's best epoch {summary['best_epoch']} is not in log.csv")
    logits, why = read_test_logits(folder / "logits_best.pt")
    export, export_why = read_export(folder)
    run = Run(label=label, folder=folder, config=config or {}, log=log, summary=summary,
              logits=logits, export=export)
    if why:
        skip("left out of the reliability diagrams" +
             (" and dark knowledge" if run.is_teacher else ""), why)
    if export_why:
        skip("left out of the deployed forms", export_why)
    return run, skipped


def load_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """The runs in or below paths (teachers first, then baseline students, then KD students) and
    what was skipped, one line per item."""
    folders = find_run_folders(paths)
    runs, skipped = [], []
    for folder, label in zip(folders, run_labels(folders)):
        run, run_skipped = load_run(folder, label)
        if run is not None:
            runs.append(run)
        skipped += run_skipped
    return sorted(runs, key=lambda r: (not r.is_teacher, r.is_kd, r.label)), skipped

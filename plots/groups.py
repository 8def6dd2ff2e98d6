"""Each run's results at its best and its last epoch, and runs grouped over seeds."""
import json
import os
from dataclasses import dataclass

import pandas as pd

from plots.rundata import InputError, Run

METRICS = ["top1", "top5", "loss", "ece", "super_top1", "agree"]  # test_<metric> in the logs
# Config keys that record where or how a run executed rather than what it computed (the first
# five are kd/rundir.py's ENVIRONMENT_KEYS). Runs whose configs differ only in these and in the
# seed are seeds of one experiment.
NOT_EXPERIMENT_KEYS = {"command", "torch", "torchvision", "device_name", "git_commit", "seed",
                       "out_dir", "resume", "overwrite", "data_dir", "download", "device",
                       "compile", "eval_batch_size", "teacher_ckpt"}


@dataclass
class Group:
    label: str
    runs: list[Run]  # one run, or the seeds of one experiment in seed order


def selected_by(run: Run) -> str:
    """The log column that picked the best epoch (runs from before --val_size: test_top1)."""
    if run.summary is not None and "selected_by" in run.summary:
        return run.summary["selected_by"]
    return "val_top1" if "val_top1" in run.log.columns else "test_top1"


def best_and_last(run: Run) -> tuple[dict, dict]:
    """All logged metrics at the best and at the last epoch: summary.json's 'best' and 'last'
    when present, else those rows of log.csv (best: the first epoch with the top selected_by)."""
    summary = run.summary or {}
    if isinstance(summary.get("best"), dict) and isinstance(summary.get("last"), dict):
        return summary["best"], summary["last"]
    if "best_epoch" in summary:
        rows = run.log[run.log["epoch"] == summary["best_epoch"]]
        if rows.empty:
            raise InputError(f"{run.folder / 'log.csv'} has no row for the best epoch "
                             f"{summary['best_epoch']} of summary.json")
        best = rows.iloc[0]
    else:
        best = run.log.loc[run.log[selected_by(run)].idxmax()]
    return best.to_dict(), run.log.iloc[-1].to_dict()


def run_record(run: Run) -> dict[str, float]:
    """The numbers of one run's table row: best epoch, training time in minutes, and
    best_<m> / last_<m> for each of METRICS (NaN if not logged)."""
    best, last = best_and_last(run)
    summary = run.summary or {}
    record = {"best_epoch": best["epoch"],
              "time_min": summary.get("total_time_s", run.log["epoch_time_s"].sum()) / 60}
    for metric in METRICS:
        record[f"best_{metric}"] = best.get(f"test_{metric}", float("nan"))
        record[f"last_{metric}"] = last.get(f"test_{metric}", float("nan"))
    return record


def group_records(group: Group) -> pd.DataFrame:
    """run_record of each run in the group, one row per run."""
    return pd.DataFrame([run_record(run) for run in group.runs], dtype=float)


def experiment_key(run: Run) -> str | None:
    """What a run computed: its config without NOT_EXPERIMENT_KEYS, and whether it finished.
    None for runs without a recorded seed, which are never grouped."""
    if "seed" not in run.config:
        return None
    config = {k: v for k, v in run.config.items() if k not in NOT_EXPERIMENT_KEYS}
    return json.dumps([config, run.summary is not None], sort_keys=True, default=str)


def group_label(labels: list[str]) -> str:
    """The labels as a shell brace expansion: kd/s0, kd/s1 -> kd/s{0,1}; a/kd, b/kd -> {a,b}/kd.
    Distinct runs have distinct labels, so distinct groups do too."""
    if len(labels) == 1:
        return labels[0]
    prefix = os.path.commonprefix(labels)
    rests = [label[len(prefix):] for label in labels]
    suffix = os.path.commonprefix([rest[::-1] for rest in rests])[::-1]
    middles = [rest[:len(rest) - len(suffix)] for rest in rests]
    return f"{prefix}{{{','.join(middles)}}}{suffix}"


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs that differ only by seed (see NOT_EXPERIMENT_KEYS) as one group, in first-run order."""
    keyed: dict[str, list[Run]] = {}
    for i, run in enumerate(runs):
        keyed.setdefault(experiment_key(run) or f"run {i}", []).append(run)
    groups = []
    for members in keyed.values():
        members = sorted(members, key=lambda r: r.config.get("seed", 0))
        groups.append(Group(group_label([r.label for r in members]), members))
    return groups

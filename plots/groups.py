"""Each run's results at its best and its last epoch, and runs grouped over seeds."""
import json
import math
import os
from dataclasses import dataclass

import pandas as pd

from kd import rundir
from plots.rundata import Run

METRICS = ["top1", "top5", "loss", "ece", "super_top1", "agree"]  # test_<metric> in the logs


@dataclass
class Group:
    label: str
    runs: list[Run]  # one run, or the seeds of one experiment in seed order


def selected_by(run: Run) -> str:
    """The log column that picked the best epoch (runs from before --val_size: test_top1)."""
    chosen = (run.summary or {}).get("selected_by")
    if chosen in list(run.log.columns):  # a list: chosen may be any JSON value
        return chosen
    return "val_top1" if "val_top1" in run.log.columns else "test_top1"


def best_and_last(run: Run) -> tuple[pd.Series, pd.Series]:
    """The log.csv rows of the best and the last epoch. Best: summary.json's best_epoch when
    log.csv has it, else the first epoch with the top selected_by."""
    rows = run.log[run.log["epoch"] == (run.summary or {}).get("best_epoch")]
    top = run.log[selected_by(run)].fillna(-math.inf).idxmax()  # all NaN: the first epoch
    best = rows.iloc[0] if len(rows) else run.log.loc[top]
    return best, run.log.iloc[-1]


def run_record(run: Run) -> dict[str, float]:
    """The numbers of one run's table row: best epoch, training time in minutes (the logged
    epoch times, without evaluation), and best_<m> / last_<m> for each of METRICS (NaN if not
    logged)."""
    best, last = best_and_last(run)
    record = {"best_epoch": best["epoch"], "train_time_min": run.log["epoch_time_s"].sum() / 60}
    for metric in METRICS:
        record[f"best_{metric}"] = best.get(f"test_{metric}", float("nan"))
        record[f"last_{metric}"] = last.get(f"test_{metric}", float("nan"))
    return record


def group_records(group: Group) -> pd.DataFrame:
    """run_record of each run in the group, one row per run."""
    return pd.DataFrame([run_record(run) for run in group.runs], dtype=float)


def experiment_key(run: Run) -> str | None:
    """The run's experiment (kd.rundir.experiment_key) and whether it finished: a table row
    averages finished seeds, or unfinished ones. None for runs never grouped."""
    experiment = rundir.experiment_key(run.config)
    return None if experiment is None else json.dumps([experiment, run.summary is not None])


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
    """The seeds of one experiment (experiment_key) as one group, in first-run order."""
    keyed: dict[str, list[Run]] = {}
    for i, run in enumerate(runs):
        keyed.setdefault(experiment_key(run) or f"run {i}", []).append(run)
    groups = []
    for members in keyed.values():
        members = sorted(members, key=lambda r: r.config.get("seed", 0))
        groups.append(Group(group_label([r.label for r in members]), members))
    return groups

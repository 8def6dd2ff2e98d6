"""Plot and tabulate training runs.

Draws test top-1, train loss and learning rate against epoch, one line per run on shared axes,
writes them as PNGs, and prints a markdown table with each run's results to stdout.

    python plots/plot_runs.py                        # every run folder directly under runs/
    python plots/plot_runs.py runs/teacher runs/kd --out figs

A run folder holds log.csv (one row per epoch), config.json and, once the run has finished,
summary.json. Runs without summary.json are tabulated from log.csv and marked unfinished; their
time is the sum of the logged training time per epoch, so it leaves out evaluation and checkpoints.
Bad input is reported as one line on stderr with exit code 2.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: before pyplot is imported
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import pandas as pd

REQUIRED_COLUMNS = ["epoch", "lr", "train_loss", "test_top1", "test_top5", "epoch_time_s"]
FIGURES = [  # (log.csv column, file name, title, y-axis label)
    ("test_top1", "test_top1.png", "Test top-1 accuracy", "top-1 accuracy (%)"),
    ("train_loss", "train_loss.png", "Training loss (KD runs: the full KD objective)",
     "loss (nats)"),
    ("lr", "lr.png", "Learning rate (end of epoch)", "learning rate"),
]
LINE_STYLES = ["-", "--", ":", "-."]
SUMMARY_KEYS = ["best_test_top1", "best_test_top5", "best_epoch", "last_test_top1",
                "last_test_top5", "epochs", "total_time_s"]
TABLE_HEADER = ["run", "arch", "epochs", "best top-1", "best epoch", "best top-5",
                "last top-1", "last top-5", "time (min)", "status"]


class InputError(Exception):
    """Bad input the user can fix; main() prints it as one line and exits with code 2."""


@dataclass
class Run:
    name: str
    log: pd.DataFrame
    config: dict
    summary: dict | None  # None while the run is unfinished


def find_runs(root: Path) -> list[Path]:
    """The run folders (directories holding log.csv) directly under root, sorted by name."""
    return sorted(p.parent for p in root.glob("*/log.csv"))


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


def load_run(folder: Path) -> Run:
    if not (folder / "log.csv").is_file():
        raise InputError(f"{folder} is not a run folder (no log.csv)")
    summary = read_json(folder / "summary.json")
    missing = [k for k in SUMMARY_KEYS if summary is not None and k not in summary]
    if missing:
        raise InputError(f"{folder / 'summary.json'} lacks the keys {', '.join(missing)}")
    return Run(name=folder.resolve().name, log=read_log(folder / "log.csv"),
               config=read_json(folder / "config.json") or {}, summary=summary)


def results(run: Run) -> dict:
    """The summary.json keys, from summary.json if the run finished, else computed from log.csv.

    As in training, the best epoch is the first with the highest test top-1, and best top-5 is
    the top-5 of that epoch.
    """
    if run.summary is not None:
        return run.summary
    best = run.log.loc[run.log["test_top1"].idxmax()]
    last = run.log.iloc[-1]
    return {"best_test_top1": best["test_top1"], "best_test_top5": best["test_top5"],
            "best_epoch": int(best["epoch"]), "last_test_top1": last["test_top1"],
            "last_test_top5": last["test_top5"], "epochs": int(last["epoch"]),
            "total_time_s": run.log["epoch_time_s"].sum()}


def table_row(run: Run) -> list[str]:
    r = results(run)
    planned = run.config.get("epochs")
    epochs = f"{r['epochs']}/{planned}" if planned else str(r["epochs"])
    return [run.name, str(run.config.get("arch", "?")), epochs, f"{r['best_test_top1']:.2f}",
            str(r["best_epoch"]), f"{r['best_test_top5']:.2f}", f"{r['last_test_top1']:.2f}",
            f"{r['last_test_top5']:.2f}", f"{r['total_time_s'] / 60:.1f}",
            "done" if run.summary is not None else "unfinished"]


def markdown_table(runs: list[Run]) -> str:
    lines = [TABLE_HEADER, ["---"] * len(TABLE_HEADER)] + [table_row(run) for run in runs]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def plot_metric(runs: list[Run], column: str, title: str, ylabel: str, path: Path) -> None:
    """One line per run of `column` against epoch, legend outside the axes, saved as a PNG.

    Line styles cycle as well as colours, so runs with identical curves (often the learning
    rate) stay visible on top of each other.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(runs):
        ax.plot(run.log["epoch"], run.log[column], label=run.name, linewidth=1.5,
                linestyle=LINE_STYLES[i % len(LINE_STYLES)])
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                        help="run folders to plot (default: every folder under runs/ that "
                             "holds a log.csv)")
    parser.add_argument("--out", type=Path, default=Path("plots"),
                        help="folder to write the PNGs into (default: plots/)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        folders = args.runs or find_runs(Path("runs"))
        if not folders:
            raise InputError("no runs found: runs/ holds no folder with a log.csv")
        runs = [load_run(folder) for folder in folders]
        args.out.mkdir(parents=True, exist_ok=True)
        for column, filename, title, ylabel in FIGURES:
            plot_metric(runs, column, title, ylabel, args.out / filename)
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(runs))


if __name__ == "__main__":
    main()

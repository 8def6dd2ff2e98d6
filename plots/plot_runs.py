"""Report on training runs: learning curves, calibration, dark knowledge, model cost, results.

    python plots/plot_runs.py                          # every run below runs/, output into plots/
    python plots/plot_runs.py runs/demo --out figs     # every run below runs/demo
    python plots/plot_runs.py runs/teacher runs/kd --no-cost

A run folder is any folder holding log.csv (written by the three training scripts, beside
config.json, summary.json once finished, and logits_best.pt). Runs whose configs differ only by
seed form one row: mean ± sample std over the seeds. Runs without summary.json are tabulated
from log.csv and marked unfinished; their time is the sum of the logged training time per epoch.
Writes PNGs and results.md into --out and prints results.md. Bad input is reported as one line
on stderr with exit code 2.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as a script: find plots/ and kd/

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless: before pyplot is imported

from plots.calibration import N_BINS, plot_reliability  # noqa: E402
from plots.compare import plot_comparison  # noqa: E402
from plots.cost import COST_HEADER, cost_note, cost_rows, model_costs  # noqa: E402
from plots.curves import plot_curves  # noqa: E402
from plots.dark_knowledge import (TABLE_HEADER, mass_rows, plot_dark_knowledge,  # noqa: E402
                                  teacher_masses)
from plots.groups import Group, group_runs  # noqa: E402
from plots.rundata import InputError, Run, load_runs  # noqa: E402
from plots.tables import markdown, results_table  # noqa: E402

INTRO = f"""Metrics on the test split. *best*: the epoch the `best by` split picked (`test`
flatters the best columns; compare the last ones); *last*: the final epoch. NLL in nats; ECE in %
with {N_BINS} equal-width confidence bins; *super top-1*: the predicted class lies in the true
superclass; *agree*: student and teacher top-1 match (KD runs). Rows with n > 1 are runs that
differ only by seed: mean ± sample std over the n seeds."""
DARK_INTRO = """Mean softmax(logits / T) of each teacher at its best epoch on the test set:
on the true class, on the 4 other classes of the true superclass, on the 95 classes of other
superclasses, and per class of each kind. T: 1 and the temperature of the KD runs."""


def write_figures(runs: list[Run], groups: list[Group], masses: list[tuple[Run, float, dict]],
                  out: Path) -> list[str]:
    """Every figure the runs allow, into out; returns their file names."""
    names = plot_curves(runs, out)
    plot_comparison(groups, out / "comparison.png")
    names.append("comparison.png")
    if any(run.logits is not None for run in runs):
        plot_reliability(runs, out / "reliability.png")
        names.append("reliability.png")
    if masses:
        plot_dark_knowledge(masses, out / "dark_knowledge.png")
        names.append("dark_knowledge.png")
    return names


def report(runs: list[Run], groups: list[Group], costs: dict | None,
           masses: list[tuple[Run, float, dict]], figures: list[str], latency_runs: int) -> str:
    """results.md: the results table, the figures, the dark-knowledge and the model-cost tables."""
    parts = ["# Results", INTRO, results_table(groups, costs)]
    missing = [run.label for run in runs if run.logits is None]
    if missing:
        parts.append(f"No logits_best.pt (left out of the reliability diagrams and dark "
                     f"knowledge): {', '.join(missing)}.")
    parts.append("\n".join(f"![{name}]({name})" for name in figures))
    if masses:
        parts += ["## Dark knowledge of the teacher", DARK_INTRO,
                  markdown(TABLE_HEADER, mass_rows(masses))]
    if costs:
        parts += ["## Model cost", cost_note(latency_runs), markdown(COST_HEADER, cost_rows(costs))]
    return "\n\n".join(parts) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                        help="run folders, or folders to search for run folders (default: runs/)")
    parser.add_argument("--out", type=Path, default=Path("plots"),
                        help="folder for the PNGs, results.md and the model-cost cache "
                             "(default: plots/)")
    parser.add_argument("--no-cost", dest="cost", action="store_false",
                        help="skip the model cost (parameters, MACs, CPU latency)")
    parser.add_argument("--latency_runs", type=int, default=20,
                        help="timed forward passes per model; the median is reported (default: 20)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.latency_runs < 1:
            raise InputError("--latency_runs must be at least 1")
        if not args.runs and not any(Path("runs").rglob("log.csv")):
            raise InputError("no runs found: runs/ holds no folder with a log.csv")
        runs = load_runs(args.runs or [Path("runs")])
        groups = group_runs(runs)
        masses = teacher_masses(runs)
        args.out.mkdir(parents=True, exist_ok=True)
        costs = model_costs([run.config for run in runs], args.out / "cost_cache.json",
                            args.latency_runs) if args.cost else None
        figures = write_figures(runs, groups, masses, args.out)
        text = report(runs, groups, costs, masses, figures, args.latency_runs)
        (args.out / "results.md").write_text(text)
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text, end="")


if __name__ == "__main__":
    main()

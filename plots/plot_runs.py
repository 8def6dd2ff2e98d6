"""Report on training runs: learning curves, calibration, dark knowledge, model cost, results.

    python plots/plot_runs.py                          # every run below runs/, output into plots/
    python plots/plot_runs.py runs/demo --out figs     # every run below runs/demo
    python plots/plot_runs.py runs/teacher runs/kd --no-cost

A run folder is any folder holding config.json or log.csv (written by the three training
scripts, beside summary.json once finished, and logits_best.pt). Runs whose configs differ only
by seed form one row: mean ± sample std over the seeds. Runs without summary.json are tabulated
from log.csv and marked unfinished. A folder holding study.json (study.py's --out_dir) adds a
study section: each method's grid point picked on validation data, its gain over the CE baseline
with a confidence interval, heatmaps and curves (plots/study.py). Writes PNGs and results.md
into --out and prints results.md.

A problem with one run (no epoch logged yet, a cut-off or unreadable log.csv, missing, unreadable
or non-finite logits, an unreadable summary.json...) never stops the report: what can be read is
reported, and each part left out is named in results.md and in a `warning:` line on stderr. Bad
arguments, and runs of which none can be reported, are one `error:` line on stderr, exit code 2.
"""
import argparse
import sys
from pathlib import Path

import matplotlib

from kd.errors import UserError, say
from kd.metrics import ECE_BINS
from plots.calibration import plot_reliability
from plots.compare import plot_comparison
from plots.cost import cost_section, deployed_section, model_costs
from plots.curves import plot_curves
from plots.dark_knowledge import TABLE_HEADER, mass_rows, plot_dark_knowledge, teacher_masses
from plots.groups import Group, group_runs
from plots.rundata import Run, load_runs
from plots.study import find_studies, read_study, study_section
from plots.tables import markdown, results_table

INTRO = f"""Metrics on the test split. *best*: the epoch the `best by` split picked (`test`
flatters the best columns; compare the last ones); *last*: the final epoch. NLL in nats; ECE in %
with {ECE_BINS} equal-width confidence bins; *super top-1*: the predicted class lies in the true
superclass; *agree*: student and teacher top-1 match (KD runs). *train time*: the sum of the
logged epoch times, training only, without evaluation. Rows with n > 1 are runs that differ only
by seed: mean ± sample std over the n seeds."""
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


def study_sections(paths: list[Path], runs: list[Run], out: Path) -> list[str]:
    """A section (plots.study) for each study folder (study.py's --out_dir) at or below paths."""
    studies = find_studies(paths)
    sections = []
    for i, folder in enumerate(studies):
        inside = [run for run in runs if folder.resolve() in run.folder.resolve().parents]
        prefix = "study_" if len(studies) == 1 else f"study{i + 1}_"
        sections.append(study_section(read_study(folder.as_posix(), inside), out, prefix))
    return sections


def report(groups: list[Group], costs: dict | None, masses: list[tuple[Run, float, dict]],
           figures: list[str], skipped: list[str], studies: list[str], deployed: str | None
           ) -> str:
    """results.md: the results table, what was left out, the study sections, the figures, the
    dark-knowledge and the model-cost tables, and the deployed forms kd.export measured."""
    parts = ["# Results", INTRO, results_table(groups, costs)]
    if skipped:
        parts.append("Left out:\n\n" + "\n".join(f"- {line}" for line in skipped))
    parts += studies
    parts.append("\n".join(f"![{name}]({name})" for name in figures))
    if masses:
        parts += ["## Dark knowledge of the teacher", DARK_INTRO,
                  markdown(TABLE_HEADER, mass_rows(masses))]
    if costs or deployed:
        parts.append("## Model cost")
    if costs:
        parts.append(cost_section(costs))
    if deployed:
        parts.append(deployed)
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
    matplotlib.use("Agg")  # figures are only saved: no display needed
    try:
        if args.latency_runs < 1:
            raise UserError("--latency_runs must be at least 1")
        if not args.runs and not Path("runs").is_dir():
            raise UserError("no runs found: no RUN_DIR given and no runs/ folder here")
        runs, skipped = load_runs(args.runs or [Path("runs")])
        masses, unknown_superclasses = teacher_masses(runs)
        skipped += unknown_superclasses
        for line in skipped:
            say(f"warning: {line}")
        if not runs:
            raise UserError("no run can be reported (see the warnings above)")
        groups = group_runs(runs)
        args.out.mkdir(parents=True, exist_ok=True)
        costs = model_costs([run.config for run in runs], args.out / "cost_cache.json",
                            args.latency_runs) if args.cost else None
        figures = write_figures(runs, groups, masses, args.out)
        studies = study_sections(args.runs or [Path("runs")], runs, args.out)
        text = report(groups, costs, masses, figures, skipped, studies, deployed_section(runs))
        (args.out / "results.md").write_text(text)
    except (UserError, OSError) as e:
        say(f"error: {e}")
        sys.exit(2)
    print(text, end="")


if __name__ == "__main__":
    main()

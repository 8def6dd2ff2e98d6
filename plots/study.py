"""The study report (study.py): does distillation help the student, by how much, with which
settings?

Selection never sees the test set. A method's grid point is the one with the highest mean
validation top-1 at the last epoch over its finished seeds; only then are that point's test
numbers read. The gain is its last-epoch test top-1 minus the CE baseline's, paired by seed (the
seeds both have), with a two-sided 95% Student-t interval over the per-seed differences d:
mean(d) ± t(0.975, n - 1) * sd(d) / sqrt(n), sd the sample standard deviation.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from kd.rundir import STUDY_FILE, settings
from plots.groups import Group, group_runs
from plots.rundata import Run
from plots.style import save_figure
from plots.tables import markdown, number

LEVEL = 0.95


def find_studies(paths: list[Path]) -> list[Path]:
    """The study folders (holding study.json) at or below paths, once each."""
    found = {}
    for path in paths:
        for marker in sorted(path.rglob(STUDY_FILE)) if path.is_dir() else []:
            found.setdefault(marker.parent.resolve(), marker.parent)
    return list(found.values())


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t distribution with df degrees of freedom: the t
    where 0.5 + the integral of the density from 0 to t is p (Simpson's rule, bisection)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(t: float, steps: int = 4000) -> float:
        h = t / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return 0.5 + h / 3 * (density(0) + inner + density(t))

    low, high = 0.0, 1000.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def paired_interval(differences: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high) of the mean difference: the Student-t interval; NaN bounds for n < 2."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass
class Point:
    """One grid point of a method (or the baseline): its finished seeds and its setting."""
    method: str
    setting: dict  # the grid axes' values, e.g. {"T": 4.0, "alpha": 0.5}
    runs: list[Run]  # seed order

    def last(self, column: str) -> dict[int, float]:
        """seed -> the column's value at the last epoch (NaN if not logged)."""
        return {run.config.get("seed"): float(run.log.iloc[-1].get(column, math.nan))
                for run in self.runs}

    def mean_std(self, column: str) -> tuple[float, float]:
        values = pd.Series(list(self.last(column).values()), dtype=float)
        return values.mean(), values.std(ddof=1)  # std NaN for one seed

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={value_text(v)}" for k, v in self.setting.items()) or "(one point)"


def value_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def sort_key(value) -> tuple:
    """Numbers in numeric order, then anything else by its text."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, str(value))


def grid_points(groups: list[Group]) -> list[Point]:
    """The groups of one method as points, set by the config keys whose values differ."""
    configs = [{k: v for k, v in settings(g.runs[0].config).items() if k != "seed"}
               for g in groups]
    axes = [k for k in configs[0] if any(c.get(k) != configs[0][k] for c in configs)]
    axes += [k for c in configs for k in c if k not in configs[0] and k not in axes]
    points = [Point(g.runs[0].method, {k: c.get(k) for k in axes}, g.runs)
              for g, c in zip(groups, configs)]
    return sorted(points, key=lambda p: tuple(map(sort_key, p.setting.values())))


def one_run_per_seed(point: Point, notes: list[str]) -> Point:
    """The point with the first run (in label order) of each seed; a note names the others,
    the same run made again in another folder."""
    kept: dict = {}
    for run in sorted(point.runs, key=lambda r: r.label):
        kept.setdefault(run.config.get("seed"), run)
    extra = [run.label for run in point.runs if run not in kept.values()]
    if extra:
        notes.append(f"{point.method} {point.label}: more than one run of a seed; left out: "
                     + ", ".join(sorted(extra)))
    point.runs = sorted(kept.values(), key=lambda r: r.config.get("seed", 0))
    return point


@dataclass
class Study:
    label: str
    baseline: Point | None
    methods: dict[str, list[Point]]  # method -> its grid points
    selected: dict[str, Point]  # method -> the point with the best mean last val_top1
    notes: list[str]  # what the study cannot say yet, and why
    teachers: dict[str, float]  # teacher_sha256 -> its test top-1, from the distilled runs' logits


def read_study(label: str, runs: list[Run]) -> Study:
    """The study's baseline, grid points and selections from its finished student runs."""
    done = [run for run in runs if run.summary is not None and not run.is_teacher]
    notes = []
    if len(done) < len(runs):
        notes.append("not finished yet, left out: "
                     + ", ".join(run.label for run in runs if run not in done))
    groups = group_runs(done)
    baselines = [g for g in groups if g.runs[0].method == "ce"]
    baseline = one_run_per_seed(grid_points(baselines)[0], notes) if len(baselines) == 1 else None
    if len(baselines) != 1:
        notes.append(f"{len(baselines)} finished CE baselines (one is needed): no gains")
    methods: dict[str, list[Point]] = {}
    for method in dict.fromkeys(g.runs[0].method for g in groups if g not in baselines):
        methods[method] = [one_run_per_seed(p, notes) for p in
                           grid_points([g for g in groups if g.runs[0].method == method])]
        seeds = sorted({len(p.runs) for p in methods[method]})
        if len(seeds) > 1:
            notes.append(f"{method}: the grid points have {seeds[0]} to {seeds[-1]} finished "
                         f"seeds; their means are not equally certain")
    selected = {}
    for method, points in methods.items():
        scores = [p.mean_std("val_top1")[0] for p in points]
        best = max((s for s in scores if not math.isnan(s)), default=math.nan)
        if not math.isnan(best):  # on a tie the first point in grid order
            tied = [p.label for p, s in zip(points, scores) if s == best]
            selected[method] = points[scores.index(best)]
            if len(tied) > 1:
                notes.append(f"{method}: {', '.join(tied[:-1])} and {tied[-1]} tie on "
                             f"validation top-1; the first in grid order, {tied[0]}, is shown "
                             f"as selected")
        else:
            notes.append(f"{method}: no run logged val_top1 (run with --val_size): no selection")
    theirs = baseline.last("test_top1") if baseline else {}
    for method, point in selected.items():
        ours = point.last("test_top1")
        if baseline and ours.keys() != theirs.keys():
            shared = sorted(ours.keys() & theirs.keys())
            notes.append(f"{method}: its selected point has seeds {sorted(ours)}, the baseline "
                         f"{sorted(theirs)}: the gain pairs the {len(shared)} they share, the "
                         f"other columns average each point's own")
    return Study(label, baseline, methods, selected, notes, teacher_top1(done))


def teacher_top1(runs: list[Run]) -> dict[str, float]:
    """Each teacher's test top-1 (%), by its checkpoint's SHA-256, from the teacher logits the
    distilled runs saved in logits_best.pt."""
    found = {}
    for run in runs:
        if run.logits and "teacher_logits" in run.logits:
            hits = run.logits["teacher_logits"].argmax(1) == run.logits["labels"]
            found.setdefault(str(run.config.get("teacher_sha256", "?")),
                             100 * hits.float().mean().item())
    return found


def gain(point: Point, baseline: Point) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of point's last test top-1 minus the baseline's, paired by seed."""
    ours, theirs = point.last("test_top1"), baseline.last("test_top1")
    seeds = [s for s in ours if s in theirs]
    if not seeds:
        return math.nan, math.nan, math.nan, 0
    return (*paired_interval([ours[s] - theirs[s] for s in seeds]), len(seeds))


def verdict(mean: float, low: float, high: float, n: int) -> str:
    """The gain's interval in words."""
    if n < 2:
        return "no verdict: fewer than 2 paired seeds"
    if low > 0:
        return "helps: the interval is above 0"
    if high < 0:
        return "hurts: the interval is below 0"
    return "inconclusive: the interval includes 0"


def gain_text(mean: float, low: float, high: float, n: int) -> str:
    if n == 0:
        return "– (no common seed)"
    if n < 2:
        return f"{mean:+.2f} (1 seed: no interval)"
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] (n={n})"


GAIN_HEADER = ["method", "selected point (of grid)", "n", "val top-1", "test top-1",
               f"gain over CE, {LEVEL:.0%} CI", "verdict", "test ECE %", "test agree"]


def gain_table(study: Study) -> str:
    """The answer: the baseline, then each method's selected point, at the last epoch."""
    rows = []
    points = ([("ce", study.baseline, "–")] if study.baseline else []) + [
        (method, point, f"{point.label} (of {len(study.methods[method])})")
        for method, point in study.selected.items()]
    for method, point, where in points:
        cells = [number(*point.mean_std(f"{split}_{metric}"), 2)
                 for split, metric in [("val", "top1"), ("test", "top1")]]
        paired = None if method == "ce" or study.baseline is None else gain(point, study.baseline)
        rows.append([method, where, str(len(point.runs)), *cells,
                     gain_text(*paired) if paired else "–", verdict(*paired) if paired else "–",
                     number(*point.mean_std("test_ece"), 2),
                     number(*point.mean_std("test_agree"), 2)])
    return markdown(GAIN_HEADER, rows)


def grid_table(method: str, points: list[Point], chosen: Point | None) -> str:
    """Every point of a method's grid with its mean validation top-1 (test numbers are left out:
    they must not pick the point)."""
    rows = [[point.label + (" (selected)" if point is chosen else ""), str(len(point.runs)),
             number(*point.mean_std("val_top1"), 2)] for point in points]
    return markdown([f"{method} grid point", "n", "val top-1 (last epoch)"], rows)


def plot_heatmap(method: str, points: list[Point], chosen: Point | None, path: Path) -> None:
    """Mean last-epoch validation top-1 over the grid: rows the first axis, columns the others."""
    axes = list(points[0].setting)
    row_of = lambda p: p.setting[axes[0]] if axes else None
    col_of = lambda p: tuple(p.setting[k] for k in axes[1:])
    rows = sorted({row_of(p) for p in points}, key=sort_key)
    cols = sorted({col_of(p) for p in points}, key=lambda values: tuple(map(sort_key, values)))
    cells = {(rows.index(row_of(p)), cols.index(col_of(p))): p for p in points}
    scores = pd.DataFrame(math.nan, index=range(len(rows)), columns=range(len(cols)))
    for (r, c), p in cells.items():
        scores.loc[r, c] = p.mean_std("val_top1")[0]
    fig, ax = plt.subplots(figsize=(2.6 + 1.3 * len(cols), 1.6 + 0.7 * len(rows)),
                           layout="constrained")
    image = ax.imshow(scores.to_numpy(dtype=float), cmap="viridis", aspect="auto")
    middle = (image.norm.vmin + image.norm.vmax) / 2 if scores.notna().any().any() else 0
    for (r, c), p in cells.items():
        score = scores.loc[r, c]
        ax.text(c, r, "no val" if math.isnan(score) else f"{score:.2f}\nn={len(p.runs)}",
                ha="center", va="center", fontsize="small",
                color="black" if math.isnan(score) or score > middle else "white")
        if p is chosen:
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=2.5))
    if axes[1:]:  # a grid of one axis has one column, and no x label to give it
        ax.set_xticks(range(len(cols)), rotation=20, ha="right", labels=[
            ", ".join(f"{k}={value_text(v)}" for k, v in zip(axes[1:], values))
            for values in cols])
    else:
        ax.set_xticks([])
    if axes:
        ax.set_yticks(range(len(rows)), labels=[f"{axes[0]}={value_text(v)}" for v in rows])
    else:
        ax.set_yticks([])
    fig.colorbar(image, ax=ax, label="val top-1 (%)")
    ax.set_title(f"{method}: mean validation top-1 at the last epoch (red: selected)",
                 fontsize="medium")
    save_figure(fig, path)


def plot_study_curves(study: Study, path: Path) -> None:
    """Test top-1 per epoch of the baseline and each selected point: the mean over seeds, and a
    band from the lowest to the highest seed."""
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    points = ([study.baseline] if study.baseline else []) + list(study.selected.values())
    for point in points:
        curves = pd.concat([run.log.set_index("epoch")["test_top1"] for run in point.runs], axis=1)
        name = "CE baseline" if point is study.baseline else f"{point.method} {point.label}"
        line, = ax.plot(curves.index, curves.mean(axis=1), linewidth=1.5,
                        marker="o" if len(curves) < 20 else None,  # a 1-epoch run shows
                        label=f"{name} (n={len(point.runs)})")
        ax.fill_between(curves.index, curves.min(axis=1), curves.max(axis=1),
                        color=line.get_color(), alpha=0.2)
    ax.set(title="Test top-1: CE baseline and each method's selected point (band: seed range)",
           xlabel="epoch", ylabel="top-1 accuracy (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", frameon=False)
    save_figure(fig, path)


def study_section(study: Study, out: Path, prefix: str) -> str:
    """The study's part of results.md, its figures written into out with names from prefix."""
    parts = [f"## Study: {study.label}",
             "Each method's grid point is picked by its mean validation top-1 at the last epoch; "
             "the table then reports that point's last-epoch test numbers (mean ± sample std over "
             f"seeds). Gain: test top-1 minus the CE baseline's, paired by seed, with a two-sided "
             f"{LEVEL:.0%} Student-t interval on the mean of the per-seed differences. The "
             f"interval does not account for picking the point among the grid on the same "
             f"seeds, which biases the gain upward: confirm it on fresh seeds (docs/studies.md)."]
    if study.teachers:
        parts.append("The teacher: test top-1 " + ", ".join(
            f"{top1:.2f} %" + (f" (checkpoint SHA-256 {sha[:12]})" if len(study.teachers) > 1
                               else "") for sha, top1 in study.teachers.items())
                     + " (from the distilled runs' logits_best.pt).")
    parts += [f"- {note}" for note in study.notes]
    if not study.baseline and not study.selected:
        return "\n\n".join(parts)
    parts.append(gain_table(study))
    figures = []
    for method, points in study.methods.items():
        name = f"{prefix}heatmap_{method}.png"
        plot_heatmap(method, points, study.selected.get(method), out / name)
        parts.append(grid_table(method, points, study.selected.get(method)))
        figures.append(name)
    if study.baseline or study.selected:
        plot_study_curves(study, out / f"{prefix}curves.png")
        figures.append(f"{prefix}curves.png")
    parts.append("\n".join(f"![{name}]({name})" for name in figures))
    return "\n\n".join(parts)

"""Learning curves against epoch, one line per run: test and training top-1, the hard-label
cross-entropy every run minimises or includes, the distilled runs' whole objective on an axis of
its own, and the learning rate."""
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from plots.rundata import Run
from plots.style import save_figure


def hard_label_ce(run: Run) -> pd.Series:
    """CE(y, p_s) on the training batches: a distilled run logs it as train_ce, a CE run's whole
    loss is it."""
    return run.log["train_ce"] if "train_ce" in run.log.columns else run.log["train_loss"]


def distillation_objective(run: Run) -> pd.Series | None:
    return run.log["train_loss"] if run.is_kd else None


Series = Callable[[Run], pd.Series | None]  # None: the run has no such curve
CURVES: list[tuple[str, str, str, Series]] = [  # (file name, title, y-axis label, series)
    ("test_top1.png", "Test top-1 accuracy", "top-1 accuracy (%)", lambda r: r.log["test_top1"]),
    ("train_top1.png", "Training top-1 accuracy (augmented batches, train mode)",
     "top-1 accuracy (%)", lambda r: r.log["train_top1"]),
    ("train_ce.png", "Training cross-entropy on the hard labels (every run: comparable)",
     "CE (nats)", hard_label_ce),
    ("train_objective.png", "Training objective of the distilled runs (each method's own terms "
     "and weights: not comparable with CE)", "loss", distillation_objective),
    ("lr.png", "Learning rate (end of epoch)", "learning rate", lambda r: r.log["lr"]),
]
LINE_STYLES = ["-", "--", ":", "-."]


def plot_curve(runs: list[Run], series: Series, title: str, ylabel: str, path: Path) -> bool:
    """One line per run that has the series, against epoch, legend outside the axes, saved as a
    PNG; False (nothing written) when no run has it.

    Line styles cycle as well as colours, so runs with identical curves (often the learning
    rate) stay visible on top of each other.
    """
    lines = [(run, series(run)) for run in runs]
    lines = [(run, values) for run, values in lines if values is not None]
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for i, (run, values) in enumerate(lines):
        ax.plot(run.log["epoch"], values, label=run.label, linewidth=1.5,
                linestyle=LINE_STYLES[i % len(LINE_STYLES)])
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.title.set_fontsize("medium")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    save_figure(fig, path)
    return True


def plot_curves(runs: list[Run], out: Path) -> list[str]:
    """The CURVES that some run has, into out; returns their file names."""
    return [filename for filename, title, ylabel, series in CURVES
            if plot_curve(runs, series, title, ylabel, out / filename)]

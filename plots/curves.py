"""Learning curves: test top-1, train loss and learning rate against epoch, one line per run."""
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from plots.rundata import Run
from plots.style import save_figure

CURVES = [  # (log.csv column, file name, title, y-axis label)
    ("test_top1", "test_top1.png", "Test top-1 accuracy", "top-1 accuracy (%)"),
    ("train_loss", "train_loss.png", "Training loss (KD runs: the full KD objective)",
     "loss (nats)"),
    ("lr", "lr.png", "Learning rate (end of epoch)", "learning rate"),
]
LINE_STYLES = ["-", "--", ":", "-."]


def plot_curve(runs: list[Run], column: str, title: str, ylabel: str, path: Path) -> None:
    """One line per run of `column` against epoch, legend outside the axes, saved as a PNG.

    Line styles cycle as well as colours, so runs with identical curves (often the learning
    rate) stay visible on top of each other.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for i, run in enumerate(runs):
        ax.plot(run.log["epoch"], run.log[column], label=run.label, linewidth=1.5,
                linestyle=LINE_STYLES[i % len(LINE_STYLES)])
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    save_figure(fig, path)


def plot_curves(runs: list[Run], out: Path) -> list[str]:
    """All CURVES into out; returns the file names."""
    for column, filename, title, ylabel in CURVES:
        plot_curve(runs, column, title, ylabel, out / filename)
    return [filename for _, filename, _, _ in CURVES]

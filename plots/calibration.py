"""Reliability diagrams: accuracy against confidence in equal-width bins, one panel per run."""
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from kd.metrics import ECE_BINS, calibration_bins, expected_calibration_error
from plots.rundata import Run
from plots.style import save_figure

MAX_COLUMNS = 4


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """kd.metrics' ECE bins as means: per bin 'count', 'accuracy' and 'confidence' (both NaN for
    an empty bin), and 'ece' in [0, 1], computed as the training logs compute test_ece."""
    bins = calibration_bins(logits, labels)
    return {"count": bins["count"], "accuracy": bins["correct"] / bins["count"],
            "confidence": bins["confidence"] / bins["count"],
            "ece": expected_calibration_error(logits, labels).item()}


def draw_reliability(ax: plt.Axes, hist_ax: plt.Axes, bins: dict, title: str) -> None:
    """Accuracy bars with the gap to each bin's mean confidence, over a histogram of the bins."""
    count, accuracy, confidence = (bins[k].numpy() for k in ("count", "accuracy", "confidence"))
    n_bins = len(count)
    edges = np.arange(n_bins) / n_bins
    filled = count > 0
    left, acc, conf = edges[filled], accuracy[filled], confidence[filled]
    width = 1 / n_bins
    ax.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="black",
           linewidth=0.5, label="accuracy")
    ax.bar(left, conf - acc, bottom=acc, width=width, align="edge", color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    ax.tick_params(labelbottom=False)
    share = 100 * count / count.sum()
    hist_ax.bar(edges, share, width=width, align="edge", color="grey", edgecolor="black",
                linewidth=0.5)
    hist_ax.set(xlim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="% of images")


def plot_reliability(runs: list[Run], path: Path) -> None:
    """One reliability diagram per run that has test logits, side by side (wrapping after 4)."""
    runs = [run for run in runs if run.logits is not None]
    cols = min(len(runs), MAX_COLUMNS)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(3.6 * cols, 4.6 * rows), squeeze=False,
                             layout="constrained",
                             gridspec_kw={"height_ratios": [3, 1] * rows})
    for i in range(rows * cols):
        ax, hist_ax = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        if i >= len(runs):
            ax.set_visible(False)
            hist_ax.set_visible(False)
            continue
        run = runs[i]
        bins = reliability_bins(run.logits["logits"], run.logits["labels"])
        draw_reliability(ax, hist_ax, bins,
                         f"{run.label}\n{run.role}, ECE {100 * bins['ece']:.2f}%")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=3,
               frameon=False)
    fig.suptitle(f"Reliability on the test set at the best epoch ({ECE_BINS} equal-width bins)")
    save_figure(fig, path)

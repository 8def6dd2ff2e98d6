"""Bar chart of test top-1, ECE and superclass top-1 at the last epoch, one bar per run or group."""
import math
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from plots.groups import Group, group_records
from plots.style import ROLE_COLORS, save_figure

PANELS = [  # (run_record key, x-axis label)
    ("last_top1", "top-1 accuracy (%)"),
    ("last_ece", "ECE (%), lower is better"),
    ("last_super_top1", "superclass accuracy (%)"),
]


def bar_text(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "not logged"
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def plot_comparison(groups: list[Group], path: Path) -> None:
    """Horizontal bars, one row per group; error bars are the std over seeds."""
    records = [group_records(group) for group in groups]
    colors = [ROLE_COLORS.get(group.runs[0].role, "grey") for group in groups]
    rows = range(len(groups))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 1.6 + 0.45 * len(groups)), sharey=True,
                             layout="constrained")
    for ax, (key, xlabel) in zip(axes, PANELS):
        means = [r[key].mean() for r in records]
        stds = [r[key].std(ddof=1) for r in records]
        bars = ax.barh(rows, [0 if math.isnan(m) else m for m in means], color=colors,
                       xerr=stds, capsize=3)  # NaN (one run): no error bar
        ax.bar_label(bars, labels=[bar_text(m, s) for m, s in zip(means, stds)], padding=4,
                     fontsize="small")
        finite = [m + (0 if math.isnan(s) else s) for m, s in zip(means, stds) if not math.isnan(m)]
        ax.set_xlim(0, 1.35 * max(finite, default=1) or 1)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(rows, labels=[f"{g.label} (n={len(g.runs)})" for g in groups])
    axes[0].invert_yaxis()
    roles = dict.fromkeys(group.runs[0].role for group in groups)
    fig.legend(handles=[Patch(color=ROLE_COLORS.get(r, "grey"), label=r) for r in roles],
               loc="outside lower center", ncol=len(roles), frameon=False)
    fig.suptitle("Test metrics at the last epoch (error bars: std over seeds)")
    save_figure(fig, path)

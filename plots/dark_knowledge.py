"""Dark knowledge: where a teacher puts the probability it does not give the true class.

KD claims the teacher's wrong-class probabilities carry structure. On CIFAR-100 the check is the
superclass: per test image, the mass on the 4 other classes of the true class's superclass
against the mass on the 95 classes of other superclasses, in total and per class, at T = 1 and at
the distillation temperature (softmax(logits / T), as the KD loss sees it).
"""
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter
import numpy as np
import torch
import torch.nn.functional as F

from kd.metrics import fine_to_coarse
from plots.rundata import Run
from plots.style import save_figure

DEFAULT_T = 4.0
TABLE_HEADER = ["teacher", "T", "true class %", "same superclass %", "other superclasses %",
                "per same-superclass class %", "per other class %", "ratio per class"]


def superclass_mass(logits: torch.Tensor, labels: torch.Tensor, class_to_coarse: torch.Tensor,
                    T: float) -> dict[str, float]:
    """Mean over images of softmax(logits / T) on the true class ('true'), on the other classes
    of its superclass ('same'), on all classes of other superclasses ('other'); 'same_per_class'
    and 'other_per_class' divide each image's mass by its number of such classes first;
    'ratio' = same_per_class / other_per_class. Masses are fractions of 1."""
    p = (logits / T).softmax(dim=1)
    in_superclass = class_to_coarse[None, :] == class_to_coarse[labels][:, None]  # [N, C]
    is_true = F.one_hot(labels, p.shape[1]).bool()
    same, other = in_superclass & ~is_true, ~in_superclass
    same_mass, other_mass = (p * same).sum(1), (p * other).sum(1)
    result = {"true": p[is_true].mean(), "same": same_mass.mean(), "other": other_mass.mean(),
              "same_per_class": (same_mass / same.sum(1).clamp(min=1)).mean(),
              "other_per_class": (other_mass / other.sum(1).clamp(min=1)).mean()}
    result = {k: v.item() for k, v in result.items()}
    result["ratio"] = result["same_per_class"] / result["other_per_class"]
    return result


def kd_temperatures(runs: list[Run]) -> list[float]:
    """1 and every T the KD runs used (DEFAULT_T when there are none)."""
    kd = {float(run.config["T"]) for run in runs
          if run.is_kd and isinstance(run.config.get("T"), (int, float))}
    return [1.0] + sorted((kd or {DEFAULT_T}) - {1.0})


def teacher_masses(runs: list[Run]) -> tuple[list[tuple[Run, float, dict]], list[str]]:
    """(teacher run, T, superclass_mass) for each teacher run with test logits and each T, and
    the teachers left out because their test labels miss some classes."""
    results, skipped = [], []
    for run in runs:
        if not run.is_teacher or run.logits is None:
            continue
        logits, labels = run.logits["logits"], run.logits["labels"]
        mapping = fine_to_coarse(labels, run.logits["coarse_labels"], logits.shape[1])
        if (mapping < 0).any():
            skipped.append(f"left out of the dark knowledge: {run.label} (the test labels in "
                           f"logits_best.pt miss some classes, so their superclasses are unknown)")
            continue
        results += [(run, T, superclass_mass(logits, labels, mapping, T))
                    for T in kd_temperatures(runs)]
    return results, skipped


def mass_rows(masses: list[tuple[Run, float, dict]]) -> list[list[str]]:
    pct = lambda x: f"{100 * x:.3g}"
    return [[run.label, f"{T:g}", pct(m["true"]), pct(m["same"]), pct(m["other"]),
             pct(m["same_per_class"]), pct(m["other_per_class"]), f"{m['ratio']:.1f}"]
            for run, T, m in masses]


def plot_dark_knowledge(masses: list[tuple[Run, float, dict]], path: Path) -> None:
    """Left: the split of the mass (true / same superclass / other). Right: mass per wrong class."""
    one_teacher = len({run.label for run, _, _ in masses}) == 1
    ticks = [f"T={T:g}" if one_teacher else f"{run.label}\nT={T:g}" for run, T, _ in masses]
    x = np.arange(len(masses))
    fig, (split_ax, class_ax) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    bottom = np.zeros(len(masses))
    for key, name, color in [("true", "true class", "tab:green"),
                             ("same", "other classes of the true superclass", "tab:orange"),
                             ("other", "classes of other superclasses", "tab:grey")]:
        share = np.array([100 * m[key] for _, _, m in masses])
        bars = split_ax.bar(x, share, 0.6, bottom=bottom, color=color, label=name)
        split_ax.bar_label(bars, labels=[f"{s:.1f}" if s >= 4 else "" for s in share],
                           label_type="center", fontsize="small")
        bottom += share
    split_ax.set(xticks=x, xticklabels=ticks, ylim=(0, 100), ylabel="mean probability (%)",
                 title="Where the teacher's probability goes")
    split_ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), fontsize="small", frameon=False)
    width = 0.38
    for offset, key, name, color in [(-width / 2, "same_per_class", "per same-superclass class",
                                      "tab:orange"),
                                     (width / 2, "other_per_class", "per other-superclass class",
                                      "tab:grey")]:
        class_ax.bar(x + offset, [100 * m[key] for _, _, m in masses], width, color=color,
                     label=name)
    per_class = [100 * m[k] for _, _, m in masses for k in ("same_per_class", "other_per_class")]
    for xi, (_, _, m) in zip(x, masses):
        top = 100 * max(m["same_per_class"], m["other_per_class"])
        class_ax.annotate(f"×{m['ratio']:.1f}", (xi, top), xytext=(0, 4),
                          textcoords="offset points", ha="center", fontsize="small")
    class_ax.set(xticks=x, xticklabels=ticks, yscale="log", ylim=(min(per_class) / 3,
                 max(per_class) * 3), ylabel="mean probability per class (%, log scale)",
                 title="Mass per wrong class (ratio same / other above)")
    class_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    class_ax.legend(loc="upper left", bbox_to_anchor=(0, -0.12), fontsize="small", frameon=False)
    fig.suptitle("Teacher's dark knowledge on the test set (best epoch)")
    save_figure(fig, path)

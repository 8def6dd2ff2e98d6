"""What all figures share: one colour per kind of run, and how they are saved."""
from pathlib import Path

import matplotlib.pyplot as plt

ROLE_COLORS = {"teacher": "tab:green", "student": "tab:blue", "KD student": "tab:orange"}


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save as a PNG (figures are made with layout="constrained") and free the memory."""
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)

"""What every loss shares: the hard-label CE that trains the teacher and the CE student, the
float32 view of autocast logits, and the signature kd.train calls. The distillation losses are in
their methods' modules, kd/methods/<name>.py.

Each loss is a pure function that returns (total, named terms); kd.train.train_step calls exactly
these functions, and the log records the mean of every named term per epoch as train_<name>.
Losses are computed in float32 (or wider) whatever the autocast dtype of the logits.
"""
from typing import Callable

import torch
import torch.nn.functional as F

LossTerms = dict[str, torch.Tensor]
LossFn = Callable[..., tuple[torch.Tensor, LossTerms]]


def ce_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, LossTerms]:
    """L = CE(y, p_s), the mean cross-entropy of the hard labels. No named terms."""
    return F.cross_entropy(student_logits.float(), targets), {}


def wide(*logits: torch.Tensor) -> list[torch.Tensor]:
    """The logits in float32 (or wider), whatever the autocast dtype they come in."""
    return [z.to(torch.promote_types(z.dtype, torch.float32)) for z in logits]


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardization (Sun et al., CVPR 2024; --logit_std): z' = (z - mean(z)) /
    (eps + std(z)), over each image's classes (std with Bessel's correction, as their code)."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (eps + logits.std(dim=1, keepdim=True))

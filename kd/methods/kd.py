"""KD: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS workshop
2015; as mdistiller's distillers/KD.py, with the hard-label weight written as alpha.

    L = alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

alpha weighs the hard labels: alpha=1 is plain cross-entropy, alpha=0 pure distillation. The KL
is summed over classes and averaged over the batch ('batchmean'; the default 'mean' would also
average over the 100 classes); T^2 keeps the soft-target gradients at the scale of the hard-label
ones when T changes. --logit_std (Sun et al., CVPR 2024): z_s and z_t in the KL are
standardize()d first (CE stays on the raw logits). Terms: 'ce' = CE(y, p_s), 'kd' = T^2 * KL.
"""
import argparse
import functools

import torch
import torch.nn.functional as F

from kd.flags import number
from kd.losses import LossFn, LossTerms, standardize, wide
from kd.methods.common import Method


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            T: float | torch.Tensor) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), summed over classes, batch mean."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1),
                    F.log_softmax(teacher_logits / T, dim=1), reduction="batchmean",
                    log_target=True) * T * T


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float | torch.Tensor,
            logit_std: bool = False) -> torch.Tensor:
    """The module's 'kd' term, T^2 * KL, in float32 (or wider), standardize()d first with
    --logit_std (CTKD takes it at its learned T)."""
    s, t = wide(student_logits, teacher_logits)
    return soft_kl(standardize(s), standardize(t), T) if logit_std else soft_kl(s, t, T)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            alpha: float, T: float, logit_std: bool = False) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on a batch of logits."""
    ce = F.cross_entropy(wide(student_logits)[0], targets)
    kd = kd_term(student_logits, teacher_logits, T, logit_std)
    return alpha * ce + (1 - alpha) * kd, {"ce": ce, "kd": kd}


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=number(float, 0, 1, why=" (it weighs the hard-label CE)"),
                   default=0.5, help="kd: weight of the hard-label CE; 1 - alpha weighs the "
                   "T^2-scaled KL")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(kd_loss, alpha=args.alpha, T=args.T, logit_std=args.logit_std)


METHOD = Method(("T", "alpha", "logit_std"), add_flags, loss_at)

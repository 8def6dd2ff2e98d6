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


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            alpha: float, T: float, logit_std: bool = False) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on a batch of logits."""
    s, t = wide(student_logits, teacher_logits)
    ce = F.cross_entropy(s, targets)
    zs, zt = (standardize(s), standardize(t)) if logit_std else (s, t)
    kl = F.kl_div(F.log_softmax(zs / T, dim=1), F.log_softmax(zt / T, dim=1),
                  reduction="batchmean", log_target=True)
    kd = kl * T * T
    return alpha * ce + (1 - alpha) * kd, {"ce": ce, "kd": kd}


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=number(float, 0, 1, why=" (it weighs the hard-label CE)"),
                   default=0.5, help="kd: weight of the hard-label CE; 1 - alpha weighs the "
                   "T^2-scaled KL")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(kd_loss, alpha=args.alpha, T=args.T, logit_std=args.logit_std)


METHOD = Method(("T", "alpha", "logit_std"), add_flags, loss_at)

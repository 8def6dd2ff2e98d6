"""NST: Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
2017; as RepDistiller's distiller_zoo/NST.py (mdistiller's distillers/NST.py is the same):
weight 50 on CIFAR-100 (mdistiller's engine/cfg.py), the polynomial kernel of degree 2.

    L = ce_weight * CE(y, p_s) + nst_weight * sum over stages of MMD^2(F_s, F_t)
    MMD^2 = mean k(f_t, f_t') + mean k(f_s, f_s') - 2 mean k(f_s, f_t),  k(a, b) = <a, b>^2

f: one channel's map, flattened and L2-normalised: each image's C channels are its samples, and
each mean runs over the images and all pairs of channels. The larger map of each stage's pair is
adaptive-average-pooled to the smaller's size; the channel counts need not match. Where the
maps are small and the channels many (the last stages: 2048 x 2048 channel pairs per image), a
mean is computed through the HW x HW Gram matrices instead of the channel pairs, the same sum
(mean_poly_kernel). No connector to train. Terms: 'ce', 'nst'.
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd import features
from kd.data import Split
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


def mean_poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean over images and channel pairs (i, j) of <a_i, b_j>^2, for a [B, C_a, N] and
    b [B, C_b, N]: through the [C_a, C_b] products or, when smaller, the N x N Gram matrices
    (sum_ij <a_i, b_j>^2 = <A^T A, B^T B>_F)."""
    ca, cb, n = a.shape[1], b.shape[1], a.shape[2]
    if ca * cb <= n * n:
        total = (a @ b.transpose(1, 2)).pow(2).sum(dim=(1, 2))
    else:
        total = ((a.transpose(1, 2) @ a) * (b.transpose(1, 2) @ b)).sum(dim=(1, 2))
    return (total / (ca * cb)).mean()


def nst_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """The squared MMD, summed over the pairs of maps (of equal sizes)."""
    total = 0.0
    for s, t in zip(wide(*student_maps), wide(*teacher_maps)):
        s, t = (F.normalize(f.flatten(2), dim=2) for f in (s, t))
        total = total + (mean_poly_kernel(t, t) + mean_poly_kernel(s, s)
                         - 2 * mean_poly_kernel(s, t))
    return total


def nst_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, features: tuple, ce_weight: float, nst_weight: float
                  ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student maps, teacher maps)."""
    ce = hard_label_ce(student_logits, targets)
    nst = nst_loss(*features)
    return ce_weight * ce + nst_weight * nst, {"ce": ce, "nst": nst}


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> features.PairedTaps:
    return features.paired_taps(student, teacher, list(range(features.STAGES)))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nst_weight", type=weight, default=50.0,
                   help="nst: weight of the neuron-selectivity (MMD) loss")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(nst_objective, ce_weight=args.ce_weight,
                             nst_weight=args.nst_weight)


METHOD = Method(("ce_weight", "nst_weight"), add_flags, loss_at, connector)

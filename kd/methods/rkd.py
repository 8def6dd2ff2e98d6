"""RKD: Park et al., "Relational Knowledge Distillation", CVPR 2019; as RepDistiller's
distiller_zoo/RKD.py (mdistiller's distillers/RKD.py is the same): distance weight 25, angle
weight 50, feature weight 1 on CIFAR-100 (`-r 1 -a 0 -b 1`; mdistiller's engine/cfg.py).

    L = ce_weight * CE(y, p_s) + rkd_weight * (w_d * distance + w_a * angle)
    distance = smooth_l1(d_s / mean(d_s), d_t / mean(d_t))   d: the B x B Euclidean distances
    angle    = smooth_l1(A_s, A_t)   A[i, j, k] = <e_ij, e_kj>, e_ij = (f_i - f_j) / |f_i - f_j|

f: each model's pooled feature (the relations compare images within a model, so the dimensions
need not match); mean(d): over the off-diagonal pairs with d > 0; distances are
sqrt(max(|f_i|^2 + |f_j|^2 - 2 <f_i, f_j>, 1e-12)), 0 on the diagonal; smooth_l1 with beta 1,
averaged over the entries. The teacher's side carries no gradient. No connector to train.
Terms: 'ce', 'distance', 'angle' (before their weights).
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


def distances(f: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[B, D] -> [B, B] Euclidean distances, 0 on the diagonal."""
    square = f.pow(2).sum(dim=1)
    d = (square[:, None] + square[None, :] - 2 * f @ f.T).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(f), dtype=f.dtype, device=f.device))


def angles(f: torch.Tensor) -> torch.Tensor:
    """[B, D] -> [B * B * B]: the cosines of the angles each pair of images makes at a third."""
    e = F.normalize(f[None, :, :] - f[:, None, :], p=2, dim=2)
    return torch.bmm(e, e.transpose(1, 2)).flatten()


def rkd_losses(student_feature: torch.Tensor, teacher_feature: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, angle) of the module's formula."""
    s, t = (f.flatten(1) for f in wide(student_feature, teacher_feature))
    d_s, d_t = distances(s), distances(t)
    mean = lambda d: d.sum() / (d > 0).sum()  # over the pairs with d > 0, with no host sync
    distance = F.smooth_l1_loss(d_s / mean(d_s), d_t / mean(d_t))
    return distance, F.smooth_l1_loss(angles(s), angles(t))


def rkd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, features: tuple, ce_weight: float, rkd_weight: float,
                  distance_weight: float, angle_weight: float) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's pooled features ([student], [teacher])."""
    ce = hard_label_ce(student_logits, targets)
    (student,), (teacher,) = features
    distance, angle = rkd_losses(student, teacher)
    rkd = distance_weight * distance + angle_weight * angle
    return ce_weight * ce + rkd_weight * rkd, {"ce": ce, "distance": distance, "angle": angle}


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> features.PairedTaps:
    return features.paired_taps(student, teacher, [features.STAGES])


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rkd_weight", type=weight, default=1.0,
                   help="rkd: weight of the relational loss")
    p.add_argument("--rkd_distance", type=weight, default=25.0,
                   help="rkd: weight w_d of the distance term within it")
    p.add_argument("--rkd_angle", type=weight, default=50.0,
                   help="rkd: weight w_a of the angle term within it")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(rkd_objective, ce_weight=args.ce_weight, rkd_weight=args.rkd_weight,
                             distance_weight=args.rkd_distance, angle_weight=args.rkd_angle)


METHOD = Method(("ce_weight", "rkd_weight", "rkd_distance", "rkd_angle"), add_flags, loss_at,
                connector)

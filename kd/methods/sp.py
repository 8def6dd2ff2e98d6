"""SP: Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019; as
RepDistiller's distiller_zoo/SP.py (mdistiller's distillers/SP.py is the same): weight 3000 on
CIFAR-100 (`-r 1 -a 0 -b 3000`), on the last stage's map.

    L = ce_weight * CE(y, p_s) + sp_weight * |G_t - G_s|_F^2 / B^2
    G = normalize(F F^T), F: the last stage's maps flattened per image, [B, C * H * W]

normalize: each row of the B x B Gram matrix to unit L2 norm. G compares images within a model,
so the maps' sizes and channels need not match (neither is pooled). No connector to train.
Terms: 'ce', 'sp'.
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


def sp_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """The similarity-preserving loss of one pair of maps."""
    s, t = (f.flatten(1) for f in wide(student_map, teacher_map))
    g_s, g_t = F.normalize(s @ s.T, dim=1), F.normalize(t @ t.T, dim=1)
    return (g_t - g_s).pow(2).sum() / len(s) ** 2


def sp_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, features: tuple, ce_weight: float, sp_weight: float
                 ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's last-stage maps ([student], [teacher])."""
    ce = hard_label_ce(student_logits, targets)
    (student,), (teacher,) = features
    sp = sp_loss(student, teacher)
    return ce_weight * ce + sp_weight * sp, {"ce": ce, "sp": sp}


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> features.PairedTaps:
    return features.paired_taps(student, teacher, [features.STAGES - 1], match_sizes=False)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sp_weight", type=weight, default=3000.0,
                   help="sp: weight of the similarity-preserving loss")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(sp_objective, ce_weight=args.ce_weight, sp_weight=args.sp_weight)


METHOD = Method(("ce_weight", "sp_weight"), add_flags, loss_at, connector)

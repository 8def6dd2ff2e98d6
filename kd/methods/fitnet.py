"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015; as mdistiller's
distillers/FitNet.py (CE 1, hint weight 100, the middle stage).

    L = ce_weight * CE(y, p_s) + hint_weight * mean over all elements of (r(F_s) - F_t)^2

F_s: the student's map at --hint_stage, r: its trainable regressor (HintRegressor), F_t: the
teacher's map at the same stage and size. Terms: 'ce', 'hint'.
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


def fitnet_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """The hint loss: the mean squared difference of the regressed student map and the
    teacher's."""
    s, t = wide(student_feature, teacher_feature)
    return F.mse_loss(s, t)


def fitnet_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     targets: torch.Tensor, features: tuple, ce_weight: float, hint_weight: float
                     ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (regressed student map, teacher map)."""
    ce = hard_label_ce(student_logits, targets)
    hint = fitnet_loss(*features)
    return ce_weight * ce + hint_weight * hint, {"ce": ce, "hint": hint}


class HintRegressor(nn.Module):
    """FitNet's regressor (mdistiller's ConvReg at equal sizes): the student's map at the hint
    stage, pooled to the teacher's size when larger, through a 1x1 conv, BatchNorm and ReLU to
    the teacher's channels. Returns (regressed student map, teacher map pooled to the same
    size)."""

    def __init__(self, student: features.Taps, teacher: features.Taps, stage: int):
        super().__init__()
        self.taps, self.index = (student, teacher), stage - 1
        (cs, hs, _), (ct, ht, _) = student.shapes[self.index], teacher.shapes[self.index]
        self.size = min(hs, ht)
        self.conv = nn.Conv2d(cs, ct, kernel_size=1)
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = (taps.read([self.index])[0] for taps in self.taps)
        hint = F.relu(self.bn(self.conv(features.pool_to(student, self.size))))
        return hint, features.pool_to(teacher, self.size)


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> HintRegressor:
    taps = features.student_taps(student)
    return HintRegressor(taps, features.teacher_taps(teacher, taps), args.hint_stage)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hint_weight", type=weight, default=100.0,
                   help="fitnet: weight of the hint loss (mdistiller's CIFAR-100 setting)")
    p.add_argument("--hint_stage", type=int, choices=range(1, features.STAGES + 1), default=2,
                   help="fitnet: the stage whose maps are matched (1..4; 2, the middle, as "
                        "mdistiller)")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(fitnet_objective, ce_weight=args.ce_weight,
                             hint_weight=args.hint_weight)


METHOD = Method(("ce_weight", "hint_weight", "hint_stage"), add_flags, loss_at, connector)

"""AT: Zagoruyko and Komodakis, "Paying More Attention to Attention", ICLR 2017; as
RepDistiller's distiller_zoo/AT.py (and mdistiller's distillers/AT.py): p = 2, weight 1000 on
CIFAR-100 (RepDistiller's `-r 1 -a 0 -b 1000`, mdistiller's engine/cfg.py).

    L = ce_weight * CE(y, p_s) + at_weight * sum over stages of mean((a(F_s) - a(F_t))^2)
    a(F) = normalize(mean over channels of F^p, flattened over the map)   (L2, per image)

F_s, F_t: the stage maps (the teacher's four stages after their ReLU; the student's blocks that
end each resolution: linear bottlenecks, the last after its hardswish), the larger of each pair
adaptive-average-pooled to the smaller's size; the mean runs over images and positions. The
attention map averages over channels, so the student's and teacher's channels need not match
and there is no connector to train. Terms: 'ce', 'at' (the sum over stages).
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd import features
from kd.data import Split
from kd.flags import number
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


def attention(feature: torch.Tensor, p: int) -> torch.Tensor:
    """a(F): [B, C, H, W] -> [B, H * W], each row of unit L2 norm."""
    return F.normalize(feature.pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], p: int
            ) -> torch.Tensor:
    """The attention-transfer loss, summed over the pairs of maps (of equal sizes)."""
    return sum((attention(s, p) - attention(t, p)).pow(2).mean()
               for s, t in zip(wide(*student_maps), wide(*teacher_maps)))


def at_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, features: tuple, ce_weight: float, at_weight: float,
                 p: int) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student maps, teacher maps)."""
    ce = hard_label_ce(student_logits, targets)
    at = at_loss(*features, p)
    return ce_weight * ce + at_weight * at, {"ce": ce, "at": at}


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> features.PairedTaps:
    return features.paired_taps(student, teacher, list(range(features.STAGES)))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--at_weight", type=weight, default=1000.0,
                   help="at: weight of the attention-transfer loss")
    p.add_argument("--at_p", type=number(int, 1), default=2,
                   help="at: the power p of the attention map, mean over channels of F^p")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(at_objective, ce_weight=args.ce_weight, at_weight=args.at_weight,
                             p=args.at_p)


METHOD = Method(("ce_weight", "at_weight", "at_p"), add_flags, loss_at, connector)

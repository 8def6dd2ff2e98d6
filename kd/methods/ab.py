"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
Neurons", AAAI 2019; as RepDistiller's distiller_zoo/AB.py and its two stages (train_student.py,
helper/pretrain.py): --init_epochs 30 in which the student's feature layers and the connectors
learn the teacher's activation boundaries, then plain training on the labels (`-r 1 -a 0`; the
main stage's AB term is 0 in RepDistiller's loop).

    init stage: sum over stages i of 2^(i - 4) * 3 / (1000 B) * sum over elements of
        (r_i(F_s) + m)^2 [r_i(F_s) > -m, F_t <= 0] + (r_i(F_s) - m)^2 [r_i(F_s) <= m, F_t > 0]
    main stage: L = ce_weight * CE(y, p_s)

F_s, F_t: the stages' maps before their final activation (kd.features.pre_activation), the
larger of each pair pooled to the smaller's size; m: the margin, 1; r_i: a trainable 1x1 conv
and BatchNorm to the teacher's channels. RepDistiller's connector is a strided conv or deconv
(ConvReg) that fits its pairs' 2x size ratios; ours are 4x at a 32 px teacher and 56 vs 32 at
224 px, so the connector is OFD's 1x1 and the maps are pooled. The init stage's SGD runs at
--init_lr 0.01, fixed (RepDistiller's learning rate for a MobileNet student, which its
pretrain.py uses); the teacher stays frozen. Terms: 'ce'
(init_log.csv: 'init_ab').
"""
import argparse
import functools

import torch
import torch.nn as nn

from kd import features
from kd.data import Split
from kd.flags import positive_float
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce
from kd.methods.ofd import conv_bn
from kd.train import InitStage


def ab_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], margin: float
            ) -> torch.Tensor:
    """The activation-boundary loss, summed over the stages with RepDistiller's weights."""
    n, total = len(student_maps), 0.0
    for i, (s, t) in enumerate(zip(wide(*student_maps), wide(*teacher_maps))):
        loss = ((s + margin).pow(2) * ((s > -margin) & (t <= 0))
                + (s - margin).pow(2) * ((s <= margin) & (t > 0)))
        total = total + 2.0 ** (i - n + 1) * loss.sum() / len(s) / 1000 * 3
    return total


def init_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, features: tuple, margin: float
                   ) -> tuple[torch.Tensor, LossTerms]:
    """The init stage's loss, on the connector's (connected student maps, teacher maps)."""
    ab = ab_loss(*features, margin)
    return ab, {"ab": ab}


def ce_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, features: tuple, ce_weight: float
                 ) -> tuple[torch.Tensor, LossTerms]:
    """The main stage's L."""
    ce = hard_label_ce(student_logits, targets)
    return ce_weight * ce, {"ce": ce}


class StageConnectors(nn.Module):
    """AB's connector (and FSP's): each tapped student stage through a 1x1 conv and BatchNorm to
    the teacher's channels. Returns (connected student maps, teacher maps) at the smaller of
    each pair's sizes."""

    def __init__(self, student: features.Taps, teacher: features.Taps):
        super().__init__()
        self.taps = (student, teacher)
        self.sizes = [min(s[1], t[1]) for s, t in zip(student.shapes, teacher.shapes)]
        self.connectors = nn.ModuleList(conv_bn(s[0], t[0])
                                        for s, t in zip(student.shapes, teacher.shapes))

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student, teacher = (taps.read() for taps in self.taps)
        return ([features.pool_to(c(s), n) for c, s, n in zip(self.connectors, student,
                                                                self.sizes)],
                [features.pool_to(t, n) for t, n in zip(teacher, self.sizes)])


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> StageConnectors:
    return StageConnectors(*features.preact_taps(student, teacher))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ab_margin", type=positive_float, default=1.0,
                   help="ab: the margin m around the activation boundary")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(ce_objective, ce_weight=args.ce_weight)


def init_at(args: argparse.Namespace) -> LossFn:
    return functools.partial(init_objective, margin=args.ab_margin)


INIT = InitStage(
    parameters=lambda student, connector: [*connector.parameters(),
                                           *student.features.parameters()],
    loss=init_at, connect=lambda connector, keys, labels:
    connector(keys, labels), training=lambda student, connector: [student.features, connector])
METHOD = Method(("ce_weight", "init_epochs", "init_lr", "ab_margin"), add_flags, loss_at,
                connector, INIT)

"""OFD: Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019; as mdistiller's
distillers/OFD.py: CE 1, feature weight 0.001 on CIFAR-100 (engine/cfg.py), 1x1 connectors.

    L = ce_weight * CE(y, p_s) + ofd_weight * sum over stages i of d_p(r_i(F_s), F_t) / 2^(4 - i)
    d_p(s, t) = sum over channels and positions, mean over images, of
        (s - m)^2 [s > m, t <= m] + (s - t)^2 [s > t, m < t <= 0] + (s - t)^2 [t > 0]

F_s, F_t: the stages' maps before their final activation (kd.features.pre_activation: for the
teacher, each stage's last Bottleneck's bn3 output plus its input, the sum its ReLU reads;
torchvision's ResNet-50 exposes no such tap, so it is rebuilt from these two), the larger of each
pair pooled to the smaller's size. r_i: the trainable 1x1 conv and BatchNorm to the teacher's
channels (Connectors). m: per teacher channel, E[x | x < 0] for x ~ N(beta, gamma^2) of that
bn3, -3 |gamma| where P(x < 0) <= 0.001 (the margin the teacher's ReLU cuts at). Unlike
mdistiller (whose OFD.train() leaves the teacher in train mode), the teacher stays frozen, its
BatchNorm statistics included. Terms: 'ce', 'ofd'.
"""
import argparse
import functools
import math

import torch
import torch.nn as nn

from kd import features
from kd.data import Split
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


def margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """[C]: E[x | x < 0] for x ~ N(bias, weight^2) per channel; -3 |weight| where
    P(x < 0) <= 0.001."""
    s, m = bn.weight.detach().double().abs(), bn.bias.detach().double()
    below = torch.special.ndtr(-m / s)
    expected = -s * torch.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / below + m
    return torch.where(below > 0.001, expected, -3 * s).float()


def partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """d_p of one stage: margin [C], source and target [B, C, H, W]."""
    m = margin.view(1, -1, 1, 1)
    loss = ((source - m).pow(2) * ((source > m) & (target <= m))
            + (source - target).pow(2) * ((source > target) & (target > m) & (target <= 0))
            + (source - target).pow(2) * (target > 0))
    return loss.mean(dim=0).sum()


def ofd_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor],
             margins: list[torch.Tensor]) -> torch.Tensor:
    """The stages' partial L2 distances, the deepest weighted 1, each shallower one half the
    next."""
    n = len(student_maps)
    return sum(partial_l2(s, t, m) / 2 ** (n - i - 1) for i, (s, t, m) in
               enumerate(zip(wide(*student_maps), wide(*teacher_maps), margins)))


def ofd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, features: tuple, ce_weight: float, ofd_weight: float
                  ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student maps, teacher maps, margins)."""
    ce = hard_label_ce(student_logits, targets)
    ofd = ofd_loss(*features)
    return ce_weight * ce + ofd_weight * ofd, {"ce": ce, "ofd": ofd}


def conv_bn(in_channels: int, out_channels: int) -> nn.Sequential:
    """mdistiller's ConnectorConvBN stage: 1x1 conv, no bias, N(0, 2 / out) weights, then BN."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0, math.sqrt(2.0 / out_channels))
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels))


class Connectors(nn.Module):
    """OFD's connector: each stage's pre-activation student map through its 1x1 conv + BN to the
    teacher's channels. Returns (connected student maps, teacher maps, margins), the maps of each
    stage at the smaller of the two sizes; the margins are a buffer, saved with the connector."""

    def __init__(self, student: features.Taps, teacher: features.Taps,
                 margins: list[torch.Tensor]):
        super().__init__()
        self.taps = (student, teacher)
        self.sizes = [min(s[1], t[1]) for s, t in zip(student.shapes, teacher.shapes)]
        self.connectors = nn.ModuleList(conv_bn(s[0], t[0])
                                        for s, t in zip(student.shapes, teacher.shapes))
        for i, m in enumerate(margins):
            self.register_buffer(f"margin{i}", m)

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        student, teacher = (taps.read() for taps in self.taps)
        connected = [features.pool_to(c(s), n)
                     for c, s, n in zip(self.connectors, student, self.sizes)]
        margins = [getattr(self, f"margin{i}") for i in range(len(self.sizes))]
        return connected, [features.pool_to(t, n) for t, n in zip(teacher, self.sizes)], margins


def stage_margins(teacher: nn.Module, taps: features.Taps) -> list[torch.Tensor]:
    """The margin of each tapped Bottleneck's bn3."""
    modules = dict(teacher.named_modules())
    return [margin(modules[f"{name}.bn3"]) for name in taps.names]


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> Connectors:
    student_taps, teacher_taps = features.preact_taps(student, teacher)
    return Connectors(student_taps, teacher_taps, stage_margins(teacher, teacher_taps))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ofd_weight", type=weight, default=0.001,
                   help="ofd: weight of the partial L2 distance")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(ofd_objective, ce_weight=args.ce_weight, ofd_weight=args.ofd_weight)


METHOD = Method(("ce_weight", "ofd_weight"), add_flags, loss_at, connector)

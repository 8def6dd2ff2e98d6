"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019; as
RepDistiller's distiller_zoo/VID.py (the authors' code), whose variances train: weight 1 on
CIFAR-100 (`-r 1 -a 0 -b 1`), initial variance 5, eps 1e-5. mdistiller's distillers/VID.py keeps
its log-scales out of the optimiser, so its variances never move; here they train.

    L = ce_weight * CE(y, p_s) + vid_weight * sum over stages of
        mean over images, channels, positions of (mu(F_s) - F_t)^2 / (2 var) + log(var) / 2
    var = softplus(s) + eps, one trainable s per teacher channel, softplus(s_0) + eps = 5

mu: a trainable regressor of the student's stage map (1x1 conv to the teacher's channels, ReLU,
1x1, ReLU, 1x1, no biases: RepDistiller's VIDLoss(s, t, t)); the larger map of each pair is
adaptive-average-pooled to the smaller's size first. At our pair's channels (2048 at the
teacher's last stage) the regressors hold about 12 M parameters. Terms: 'ce', 'vid'.
"""
import argparse
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd import features
from kd.data import Split
from kd.flags import positive_float
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight

EPS = 1e-5  # the variance's floor, as the reference


def vid_loss(means: list[torch.Tensor], log_scales: list[torch.Tensor],
             teacher_maps: list[torch.Tensor], eps: float = EPS) -> torch.Tensor:
    """The Gaussian negative log-likelihood (without its constant) of each teacher map under the
    regressed mean and the per-channel variance, summed over the stages."""
    total = 0.0
    for mu, scale, t in zip(wide(*means), wide(*log_scales), wide(*teacher_maps)):
        var = (F.softplus(scale) + eps).view(1, -1, 1, 1)
        total = total + (0.5 * ((mu - t).pow(2) / var + var.log())).mean()
    return total


def vid_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, features: tuple, ce_weight: float, vid_weight: float
                  ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (means, log-scales, teacher maps)."""
    ce = hard_label_ce(student_logits, targets)
    vid = vid_loss(*features)
    return ce_weight * ce + vid_weight * vid, {"ce": ce, "vid": vid}


def regressor(in_channels: int, channels: int) -> nn.Sequential:
    conv = lambda a, b: nn.Conv2d(a, b, kernel_size=1, bias=False)
    return nn.Sequential(conv(in_channels, channels), nn.ReLU(), conv(channels, channels),
                         nn.ReLU(), conv(channels, channels))


class VariationalRegressors(nn.Module):
    """VID's connector: per stage, the regressor of the student's map and the teacher channels'
    log-scales. Returns (regressed means, log-scales, teacher maps), one of each per stage."""

    def __init__(self, student: features.Taps, teacher: features.Taps, init_var: float):
        super().__init__()
        self.taps = (student, teacher)
        pairs = list(zip(student.shapes[:features.STAGES], teacher.shapes[:features.STAGES]))
        self.sizes = [min(s[1], t[1]) for s, t in pairs]
        self.regressors = nn.ModuleList(regressor(s[0], t[0]) for s, t in pairs)
        start = math.log(math.expm1(init_var - EPS))  # softplus(start) + EPS = init_var
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t[0],), start))
                                           for _, t in pairs)

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        which = list(range(features.STAGES))
        student, teacher = (taps.read(which) for taps in self.taps)
        means = [r(features.pool_to(s, n)) for r, s, n in zip(self.regressors, student, self.sizes)]
        return means, list(self.log_scales), [features.pool_to(t, n)
                                              for t, n in zip(teacher, self.sizes)]


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> VariationalRegressors:
    taps = features.student_taps(student)
    return VariationalRegressors(taps, features.teacher_taps(teacher, taps), args.vid_init_var)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vid_weight", type=weight, default=1.0,
                   help="vid: weight of the variational information loss")
    p.add_argument("--vid_init_var", type=positive_float, default=5.0,
                   help="vid: initial variance of every teacher channel (it trains)")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(vid_objective, ce_weight=args.ce_weight, vid_weight=args.vid_weight)


METHOD = Method(("ce_weight", "vid_weight", "vid_init_var"), add_flags, loss_at, connector)

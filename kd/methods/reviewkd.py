"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021; follows
mdistiller's distillers/ReviewKD.py (CE 1, review weight 1 as engine/cfg.py, warm-up 20 epochs).

    L = ce_weight * CE(y, p_s) + min(epoch / warmup, 1) * review_weight * HCL
    HCL = sum over levels of [MSE(F_s, F_t) + sum_{l in 4, 2, 1; l < h} w_l MSE(P_l F_s, P_l F_t)]
          / (1 + sum w_l),   w_l = 1/2, 1/4, 1/8 for the pooled sizes taken in turn

F_s: the student's maps after the review (ReviewFusion), F_t: the teacher's at the same sizes;
P_l: adaptive average pooling to l x l; h: the level's map size. Terms: 'ce', 'review'.
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
from kd.methods.common import Method, hard_label_ce, warmed_up, weight


def hcl_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]
             ) -> torch.Tensor:
    """The hierarchical context loss HCL, summed over the levels; maps of equal shapes."""
    total = 0.0
    for s, t in zip(wide(*student_features), wide(*teacher_features)):
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in (4, 2, 1):
            if size < s.shape[-1]:
                weight /= 2
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size),
                                                  F.adaptive_avg_pool2d(t, size))
                weights += weight
        total = total + loss / weights
    return total


def reviewkd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       targets: torch.Tensor, features: tuple, ce_weight: float,
                       review_weight: torch.Tensor | float) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student maps, teacher maps); review_weight includes
    the warm-up (a tensor, so that a new value each epoch does not recompile a compiled loss)."""
    ce = hard_label_ce(student_logits, targets)
    review = hcl_loss(*features)
    return ce_weight * ce + review_weight * review, {"ce": ce, "review": review}


class FusionBlock(nn.Module):
    """ReviewKD's attention-based fusion (ABF; Chen et al., 2021, their code and mdistiller's):
    a 1x1 conv of the student's map to mid channels, fused with the map from the level below
    through two attention weights, resized to the target size, then a 3x3 conv to the teacher's
    channels. Returns (the output map, the fused map handed to the next level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) \
            if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, below: torch.Tensor | None, out_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            below = F.interpolate(below, x.shape[-2:], mode="nearest")
            weights = self.att_conv(torch.cat([x, below], dim=1))
            x = x * weights[:, :1] + below * weights[:, 1:]
        if x.shape[-1] > out_size:
            x = F.adaptive_avg_pool2d(x, out_size)
        elif x.shape[-1] < out_size:
            x = F.interpolate(x, (out_size, out_size), mode="nearest")
        return self.conv2(x), x


class ReviewFusion(nn.Module):
    """ReviewKD's connector: the student's four stages and pooled feature, reviewed from the
    deepest level down (each level fused with the one below), each mapped to the teacher's
    channels at the matched size. Returns (student maps, teacher maps), five of each, in stage
    order, for hcl_loss."""

    def __init__(self, student: features.Taps, teacher: features.Taps):
        super().__init__()
        self.taps = (student, teacher)
        sizes = [min(s[1], t[1]) for s, t in zip(student.shapes, teacher.shapes)]
        self.sizes = sizes[::-1]  # deepest first, as the review runs
        mid = min(512, student.shapes[-1][0])
        self.blocks = nn.ModuleList(
            FusionBlock(s[0], mid, t[0], fuse=level > 0)
            for level, (s, t) in enumerate(zip(student.shapes[::-1], teacher.shapes[::-1])))

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student, teacher = (taps.read() for taps in self.taps)
        outputs, below = [], None
        for block, x, size in zip(self.blocks, student[::-1], self.sizes):
            out, below = block(x, below, size)
            outputs.insert(0, out)
        return outputs, [features.pool_to(t, s) for t, s in zip(teacher, self.sizes[::-1])]


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> ReviewFusion:
    taps = features.student_taps(student)
    return ReviewFusion(taps, features.teacher_taps(teacher, taps))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--review_weight", type=weight, default=1.0,
                   help="reviewkd: weight of the hierarchical context loss")
    p.add_argument("--review_warmup", type=number(int, 0), default=20,
                   help="reviewkd: epochs over which the review weight grows linearly to 1")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    scale = args.review_weight * warmed_up(epoch, args.review_warmup)
    return functools.partial(reviewkd_objective, ce_weight=args.ce_weight,
                             review_weight=torch.tensor(scale))


METHOD = Method(("ce_weight", "review_weight", "review_warmup"), add_flags, loss_at, connector)

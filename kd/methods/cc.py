"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019; as
RepDistiller's distiller_zoo/CC.py (the authors' code as RepDistiller restructured it) with its
LinearEmbed connectors: 128-d embeddings, weight 0.02 on CIFAR-100 (`-r 1 -a 0 -b 0.02`).

    L = ce_weight * CE(y, p_s) + cc_weight * mean over i < B - 1 of sum_d |D_i,d| |D_i+1,d|
    D = W_s f_s + b_s - (W_t f_t + b_t)

f: each model's pooled feature, W, b: the two trainable linear embeddings to --feat_dim
(CorrelationEmbed). The loss couples each image with the next one in the batch, as the
reference code does (not the Gaussian-kernel correlation matrix of the paper's text). Terms:
'ce', 'cc'.
"""
import argparse
import functools

import torch
import torch.nn as nn

from kd import features
from kd.data import Split
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


def cc_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """The correlation-congruence loss of the reference code on [B, D] embeddings."""
    s, t = wide(student_embedding, teacher_embedding)
    delta = (s - t).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def cc_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, features: tuple, ce_weight: float, cc_weight: float
                 ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student embedding, teacher embedding)."""
    ce = hard_label_ce(student_logits, targets)
    cc = cc_loss(*features)
    return ce_weight * ce + cc_weight * cc, {"ce": ce, "cc": cc}


class CorrelationEmbed(nn.Module):
    """CC's connector: each model's pooled feature through its own linear map to feat_dim
    (RepDistiller's LinearEmbed). Returns (student embedding, teacher embedding)."""

    def __init__(self, student: features.Taps, teacher: features.Taps, feat_dim: int):
        super().__init__()
        self.taps = (student, teacher)
        self.embed_s = nn.Linear(student.shapes[features.STAGES][0], feat_dim)
        self.embed_t = nn.Linear(teacher.shapes[features.STAGES][0], feat_dim)

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = (taps.read([features.STAGES])[0].flatten(1) for taps in self.taps)
        return self.embed_s(student), self.embed_t(teacher)


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> CorrelationEmbed:
    taps = features.student_taps(student)
    return CorrelationEmbed(taps, features.teacher_taps(teacher, taps), args.feat_dim)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cc_weight", type=weight, default=0.02,
                   help="cc: weight of the correlation-congruence loss")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(cc_objective, ce_weight=args.ce_weight, cc_weight=args.cc_weight)


METHOD = Method(("ce_weight", "cc_weight", "feat_dim"), add_flags, loss_at, connector)

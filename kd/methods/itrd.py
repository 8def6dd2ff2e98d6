"""ITRD: Miles, Lopez-Rodriguez and Mikolajczyk, "Information Theoretic Representation
Distillation", BMVC 2022; follows the authors' roymiles/ITRD, distiller_zoo/IT.py (ITLoss:
forward_correlation_it, forward_mutual_it, Embed with n=1) and helper/loops.py's objective,
with the ResNet50 -> MobileNetV2 command of its README (commit aec7669, README.md line 63:
`-r 1.0 -b 1.0 --lambda_corr 2.0 --lambda_mutual 1.0 --alpha_it 1.5`).

    L = ce_weight * CE(y, p_s) + itrd_corr * L_corr + itrd_mutual * L_mutual
    z_s = W f_s + b    (f_s the student's pooled 576-d feature, z_s 2048-d like f_t)

    L_corr = log2 sum_d (|c_d - 1|^2)^alpha,  c_d = (1 / B) sum_i n(z_s)_id n(f_t)_id
             n(f) = (f - its mean over the batch) / its std over the batch (Bessel's), per d
    L_mutual = sum_ij (G_s,ij / tr G_s)^2 - sum_ij (G_st,ij / tr G_st)^2
             G_s = u_s u_s^T, G_t = u_t u_t^T (u: each image's z_s or f_t L2-normalised),
             G_st = G_s * G_t elementwise

f_t: the teacher's pooled 2048-d feature (not embedded); W, b: the one trainable linear map
(ITREmbed), shared by both terms. The reference code's choices, kept here (several beside
commented-out alternatives in IT.py): the embedding is a plain linear map (its BatchNorm and
ReLU, and the two-layer MLP, are commented out or unused); c_d divides by B although the std
has Bessel's correction (so c_d tops at (B - 1) / B); |c - 1|^2 is not trace-normalised;
L_mutual is the difference of the two sums of squares themselves, with no logarithm (a Renyi-2
entropy would be -log2 of such a sum). One departure: the std is floored at 1e-12, so a
dimension constant over the batch (a teacher channel that ReLU zeroes for every image of the
batch) is standardised to 0 and adds |0 - 1|^(2 alpha) = 1 to the sum, where the reference
divides 0 by 0 and the loss is NaN; wherever every std exceeds 1e-12 the two are equal.

Defaults: the README's ResNet50 -> MobileNetV2 command, -b 1.0 folded into the two weights.
train_student.py's own defaults (`--lambda_corr 2.0 --lambda_mutual 0.05 --alpha_it 1.5`, lines
83-85) differ in lambda_mutual from every per-pair command of the README (1.0; alpha 1.01 for
the same-architecture pairs, 1.5 for the cross-architecture ones); zkxufo/TTM carries the same
IT.py as distiller_zoo/itrd.py, with --lambda_mutual 1.0 as its default. The reference's pooled
features are the same with or without its preact flag. Terms: 'ce',
'correlation' = L_corr, 'mutual' = L_mutual (unweighted).
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd import features
from kd.data import Split
from kd.flags import positive_float
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


STD_FLOOR = 1e-12  # a dimension constant over the batch: standardised to 0, not 0 / 0


def correlation_loss(student_embedding: torch.Tensor, teacher_feature: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """L_corr on [B, D] embeddings (the reference's forward_correlation_it after its embed)."""
    s, t = wide(student_embedding, teacher_feature)
    standardized = lambda f: (f - f.mean(dim=0)) / f.std(dim=0).clamp_min(STD_FLOOR)
    c = (standardized(s) * standardized(t)).sum(dim=0) / s.shape[0]
    return torch.log2((c - 1).abs().pow(2).pow(alpha).sum())


def mutual_loss(student_embedding: torch.Tensor, teacher_feature: torch.Tensor
                ) -> torch.Tensor:
    """L_mutual on [B, D] embeddings (the reference's forward_mutual_it after its embed)."""
    s, t = wide(student_embedding, teacher_feature)
    gram = lambda f: (lambda u: u @ u.T)(F.normalize(f, dim=1))
    g_s = gram(s)
    g_st = g_s * gram(t)
    trace = lambda g: g.diagonal().sum()  # torch.trace's backward reads its size back (a sync)
    g_s, g_st = g_s / trace(g_s), g_st / trace(g_st)
    return g_s.pow(2).sum() - g_st.pow(2).sum()


def itrd_losses(student_embedding: torch.Tensor, teacher_feature: torch.Tensor, alpha: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_corr, L_mutual), in float32 (or wider) under autocast too: the Gram matrices' products
    would be bf16, and L_mutual, a difference of two sums, loses its digits to that rounding."""
    with torch.autocast(student_embedding.device.type, enabled=False):
        return (correlation_loss(student_embedding, teacher_feature, alpha),
                mutual_loss(student_embedding, teacher_feature))


def itrd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, features: tuple, ce_weight: float, corr_weight: float,
                   mutual_weight: float, alpha: float) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student embedding, teacher pooled feature)."""
    ce = hard_label_ce(student_logits, targets)
    correlation, mutual = itrd_losses(*features, alpha)
    total = ce_weight * ce + corr_weight * correlation + mutual_weight * mutual
    return total, {"ce": ce, "correlation": correlation, "mutual": mutual}


class ITREmbed(nn.Module):
    """ITRD's connector: the student's pooled feature through one linear map to the teacher's
    pooled dimension (the reference's Embed(s_dim, t_dim, n=1)), in float32 (or wider) whatever
    the autocast dtype, as the correlation's standardisation needs. Returns (student embedding,
    teacher pooled feature), both [B, D_t]."""

    def __init__(self, student: features.Taps, teacher: features.Taps):
        super().__init__()
        self.taps = (student, teacher)
        self.embed = nn.Linear(student.shapes[features.STAGES][0],
                               teacher.shapes[features.STAGES][0])

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = (wide(taps.read([features.STAGES])[0].flatten(1))[0]
                            for taps in self.taps)
        with torch.autocast(student.device.type, enabled=False):
            return self.embed(student.to(self.embed.weight.dtype)), teacher


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> ITREmbed:
    taps = features.student_taps(student)
    return ITREmbed(taps, features.teacher_taps(teacher, taps))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--itrd_corr", type=weight, default=2.0,
                   help="itrd: weight of the correlation loss (the reference's --lambda_corr)")
    p.add_argument("--itrd_mutual", type=weight, default=1.0,
                   help="itrd: weight of the mutual-information loss (the reference's "
                        "--lambda_mutual)")
    p.add_argument("--itrd_alpha", type=positive_float, default=1.5,
                   help="itrd: Renyi's alpha-order of the correlation loss (the reference's "
                        "--alpha_it; 1.5 for its cross-architecture pairs, 1.01 for the others)")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(itrd_objective, ce_weight=args.ce_weight,
                             corr_weight=args.itrd_corr, mutual_weight=args.itrd_mutual,
                             alpha=args.itrd_alpha)


METHOD = Method(("ce_weight", "itrd_corr", "itrd_mutual", "itrd_alpha"), add_flags, loss_at,
                connector)

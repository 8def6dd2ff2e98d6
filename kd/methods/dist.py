"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022; as
torchdistill's DISTLoss (losses/mid_level.py), with beta = gamma = 2 as its weight 2.0 gives.

    L = ce_weight * CE(y, p_s) + beta * inter + gamma * intra,  with Y = softmax(Z / T) per image
    inter = T^2 * (1 - mean over images i of pearson(Y_s[i, :], Y_t[i, :]))
    intra = T^2 * (1 - mean over classes c of pearson(Y_s[:, c], Y_t[:, c]))

Terms: 'ce', 'inter', 'intra'.
"""
import argparse
import functools

import torch

from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of a and b (eps in the denominator, as DIST's code)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
              gamma: float, T: float) -> tuple[torch.Tensor, LossTerms]:
    """The distillation part, beta * inter + gamma * intra. Terms: 'inter', 'intra'."""
    s, t = wide(student_logits, teacher_logits)
    y_s, y_t = (s / T).softmax(dim=1), (t / T).softmax(dim=1)
    inter = T * T * (1 - pearson(y_s, y_t).mean())
    intra = T * T * (1 - pearson(y_s.T, y_t.T).mean())
    return beta * inter + gamma * intra, {"inter": inter, "intra": intra}


def dist_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, beta: float, gamma: float, T: float, ce_weight: float
                   ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L."""
    ce = hard_label_ce(student_logits, targets)
    distill, terms = dist_loss(student_logits, teacher_logits, beta, gamma, T)
    return ce_weight * ce + distill, {"ce": ce, **terms}


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist_beta", type=weight, default=2.0,
                   help="dist: weight of the inter-class relation")
    p.add_argument("--dist_gamma", type=weight, default=2.0,
                   help="dist: weight of the intra-class relation")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(dist_objective, beta=args.dist_beta, gamma=args.dist_gamma,
                             T=args.T, ce_weight=args.ce_weight)


METHOD = Method(("T", "ce_weight", "dist_beta", "dist_gamma"), add_flags, loss_at)

"""KDSVD: Lee, Kim and Song, "Self-supervised Knowledge Distillation Using Singular Value
Decomposition", ECCV 2018; as RepDistiller's distiller_zoo/KDSVD.py (mdistiller's
distillers/KDSVD.py: CE 1, feature weight 1, k = 1 on CIFAR-100, engine/cfg.py).

    L = ce_weight * CE(y, p_s) + kdsvd_weight * sum over stages i > 1 of
        sum over entries of (rbf(V_s,i, V_s,i-1) - rbf(V_t,i, V_t,i-1))^2 / B
    rbf(a, b)[p, q, j] = exp(-(a[p, j] - b[q, j])^2 / 8)

V: per image, the first singular vectors of a stage's map, L2-normalised and scaled by the
teacher's normalised singular values (k of the teacher's, k + 3 of the student's, each of the
student's sign-aligned to the teacher vector it matches best, so the student's first k
after alignment are compared); non-finite entries count 0, as in the reference.

Our pair forces a choice: the reference takes the right singular vectors of the [HW, C] map,
which index channels, and so needs equal channels in both models (RepDistiller's and
mdistiller's CIFAR-100 pairs have them; ours has 16..576 against 256..2048). Here the map is
[C, HW], its right singular vectors index positions, and each stage's pair is compared at the
smaller of its two sizes (pooled), so every size and channel count works. No connector to
train. Terms: 'ce', 'kdsvd'.
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd import features
from kd.data import Split
from kd.flags import positive_int
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


def finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def singular_vectors(feature: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s [B, n], v [B, HW, n]): the first n singular values and right singular vectors of each
    image's [C, HW] map, each L2-normalised (the values over the n, the vectors over HW)."""
    _, s, vh = torch.linalg.svd(feature.flatten(2), full_matrices=False)
    s, v = finite(s), finite(vh.transpose(1, 2))
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def align(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a's vectors [B, N, n_a] moved onto b's [B, N, n_b]: for each of b's, the sign-matched one
    of a's with the largest |cosine|."""
    cosine = a.transpose(1, 2) @ b  # [B, n_a, n_b]
    best = cosine.abs() == cosine.abs().max(dim=1, keepdim=True).values
    return a @ torch.where(best, torch.sign(cosine), torch.zeros_like(cosine))


def kdsvd_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor], k: int
               ) -> torch.Tensor:
    """The module's distillation term, on pairs of maps of equal sizes."""
    total, previous = 0.0, None
    for f_s, f_t in zip(wide(*student_maps), wide(*teacher_maps)):
        s_t, v_t = singular_vectors(f_t, k)
        _, v_s = singular_vectors(f_s, k + 3)
        v_s = align(v_s, v_t)
        v_t, v_s = v_t * s_t[:, None], v_s * s_t[:, None]
        if previous is not None:
            rbf = lambda a, b: torch.exp(-(a[:, :, None] - b[:, None]).pow(2) / 8)
            difference = (rbf(v_s, previous[0]) - rbf(v_t, previous[1])).pow(2)
            total = total + finite(difference).sum() / len(f_s)
        previous = v_s, v_t
    return total


def kdsvd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    targets: torch.Tensor, features: tuple, ce_weight: float,
                    kdsvd_weight: float, k: int) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student maps, teacher maps)."""
    ce = hard_label_ce(student_logits, targets)
    kdsvd = kdsvd_loss(*features, k)
    return ce_weight * ce + kdsvd_weight * kdsvd, {"ce": ce, "kdsvd": kdsvd}


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> features.PairedTaps:
    return features.paired_taps(student, teacher, list(range(features.STAGES)))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kdsvd_weight", type=weight, default=1.0,
                   help="kdsvd: weight of the singular-vector correlation loss")
    p.add_argument("--kdsvd_k", type=positive_int, default=1,
                   help="kdsvd: singular vectors compared per stage")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(kdsvd_objective, ce_weight=args.ce_weight,
                             kdsvd_weight=args.kdsvd_weight, k=args.kdsvd_k)


METHOD = Method(("ce_weight", "kdsvd_weight", "kdsvd_k"), add_flags, loss_at, connector)

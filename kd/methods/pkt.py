"""PKT: Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018; as RepDistiller's distiller_zoo/PKT.py (the authors' code; mdistiller's
distillers/PKT.py is the same): weight 30000 on CIFAR-100 (`-r 1 -a 0 -b 30000`).

    L = ce_weight * CE(y, p_s) + pkt_weight * mean over i, j of
        q_ij log((q_ij + eps) / (p_ij + eps))
    p_ij = (1 + cos(f_s,i, f_s,j)) / 2, normalised over j;  q_ij the same of the teacher's

f: each model's pooled feature (576-d and 2048-d: the kernel compares images within a model, so
the dimensions need not match), cos its cosine similarity (each vector divided by its norm +
eps), eps = 1e-7. The mean runs over the B x B pairs. No connector to train. The reference
sets NaN entries of the normalised features to 0; here a NaN shows, as a blow-up. Terms: 'ce',
'pkt'.
"""
import argparse
import functools

import torch
import torch.nn as nn

from kd import features
from kd.data import Split
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


def similarity_distribution(f: torch.Tensor, eps: float) -> torch.Tensor:
    """[B, D] -> [B, B]: each image's cosine similarities to the batch, mapped to [0, 1] and
    normalised to a distribution over the batch."""
    f = f.flatten(1)
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    similarity = (f @ f.T + 1) / 2
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, eps: float = 1e-7
             ) -> torch.Tensor:
    """The probabilistic knowledge transfer loss: the mean of q log(q / p) over the B x B
    pairs."""
    s, t = wide(student_feature, teacher_feature)
    p, q = similarity_distribution(s, eps), similarity_distribution(t, eps)
    return (q * torch.log((q + eps) / (p + eps))).mean()


def pkt_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, features: tuple, ce_weight: float, pkt_weight: float
                  ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's pooled features ([student], [teacher])."""
    ce = hard_label_ce(student_logits, targets)
    (student,), (teacher,) = features
    pkt = pkt_loss(student, teacher)
    return ce_weight * ce + pkt_weight * pkt, {"ce": ce, "pkt": pkt}


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> features.PairedTaps:
    return features.paired_taps(student, teacher, [features.STAGES])


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pkt_weight", type=weight, default=30000.0,
                   help="pkt: weight of the probabilistic knowledge transfer loss")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(pkt_objective, ce_weight=args.ce_weight,
                             pkt_weight=args.pkt_weight)


METHOD = Method(("ce_weight", "pkt_weight"), add_flags, loss_at, connector)

"""WTTM: Zheng and Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR
2024; follows the authors' zkxufo/TTM, distiller_zoo/wttm.py (WTTM) and train_student.py's
objective (`-r` CE weight, `-b` distillation weight, `--ttm_l` the power gamma).

    L = ce_weight * CE(y, p_s) + wttm_beta * mean over images of U * KL(q_t || p_s)
    p_s = softmax(z_s),  p_t = softmax(z_t)    (both at temperature 1)
    U = sum_c p_t,c^gamma,  q_t = p_t^gamma / U    (the power-transformed teacher)

KL summed over the classes. The temperature acts on the teacher alone (q_t = softmax(gamma *
z_t), T = 1 / gamma), and the student's distribution is never tempered; U, which grows as the
teacher's prediction is smoother (1 for one-hot, C^(1 - gamma) for uniform), weights each image.
Computed in the log domain (log q_t = gamma log p_t - logsumexp(gamma log p_t)), which equals
the reference's pow / sum / kl_div wherever its p_t^gamma does not underflow. No T^2 factor, as
the reference.

Defaults: gamma 0.2 and beta 4, README.md's one WTTM command (lines 40-41: `--add wttm --ttm_l
0.2 -b 0.8 -a 4`, vgg13 -> vgg8, WTTM's weight 4 beside CRD's 0.8). The repository has no
setting for ResNet-50 -> MobileNetV2 (the paper lists each pair's T and beta in its appendix
A.4) and no WTTM-alone command; train_student.py's own default `--ttm_l 1` (line 68) is plain KL
at T 1. ce_weight 1: train_student.py's `-r` (line 60). Terms: 'ce', 'wttm' = the mean of U * KL
(unweighted).
"""
import argparse
import functools

import torch
import torch.nn.functional as F

from kd.flags import positive_float
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight


def wttm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float
              ) -> torch.Tensor:
    """The weighted transformed-teacher-matching loss: mean over images of U * KL(q_t || p_s)."""
    s, t = wide(student_logits, teacher_logits)
    powered = gamma * F.log_softmax(t, dim=1)  # log p_t^gamma
    log_u = torch.logsumexp(powered, dim=1, keepdim=True)  # log U
    log_q = powered - log_u
    kl = (log_q.exp() * (log_q - F.log_softmax(s, dim=1))).sum(dim=1)
    return (log_u.squeeze(1).exp() * kl).mean()


def wttm_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, gamma: float, beta: float, ce_weight: float
                   ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L."""
    ce = hard_label_ce(student_logits, targets)
    wttm = wttm_loss(student_logits, teacher_logits, gamma)
    return ce_weight * ce + beta * wttm, {"ce": ce, "wttm": wttm}


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wttm_gamma", type=positive_float, default=0.2,
                   help="wttm: the power gamma of the teacher's probabilities (1 / its "
                        "temperature; the reference's --ttm_l)")
    p.add_argument("--wttm_beta", type=weight, default=4.0,
                   help="wttm: weight of the U-weighted KL (the reference's -b)")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(wttm_objective, gamma=args.wttm_gamma, beta=args.wttm_beta,
                             ce_weight=args.ce_weight)


METHOD = Method(("ce_weight", "wttm_gamma", "wttm_beta"), add_flags, loss_at)

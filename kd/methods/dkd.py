"""DKD: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; follows mdistiller's
distillers/DKD.py and its CIFAR-100 defaults (engine/cfg.py: CE 1, alpha 1, beta 8, T 4, warm-up
20 epochs).

    L = ce_weight * CE(y, p_s) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)
    TCKD = T^2 * KL([p_t^y, 1 - p_t^y] || [p_s^y, 1 - p_s^y])    target class vs the rest
    NCKD = T^2 * KL(q_t || q_s)    q = softmax(z / T) over the classes other than y

p = softmax(z / T); batch means. Per image KL(p_t || p_s) = TCKD + (1 - p_t^y) * NCKD: plain KD
is alpha = 1, beta = 1 - p_t^y. As mdistiller, q drops the target by subtracting 1000 from its
logit / T. The binary distributions are kept as log-probabilities (log p^y and the logsumexp of
the others), so a confident model gives no log(0). --logit_std: the logits are standardize()d
first. Terms: 'ce', 'tckd', 'nckd'.
"""
import argparse
import functools

import torch
import torch.nn.functional as F

from kd.flags import number
from kd.losses import LossFn, LossTerms, standardize, wide
from kd.methods.common import Method, hard_label_ce, warmed_up, weight


def dkd_distributions(logits: torch.Tensor, targets: torch.Tensor, T: float | torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two distributions of logits [R, K] (rows with targets [R]), as log-probabilities:
    the binary [p^y, 1 - p^y] of p = softmax(z / T), and q = softmax(z / T) over the classes
    other than y (the target's logit / T less 1000, as mdistiller)."""
    target = torch.arange(logits.shape[1], device=targets.device) == targets[:, None]
    log_p = F.log_softmax(logits / T, dim=1)
    binary = torch.stack([log_p.gather(1, targets[:, None]).squeeze(1),
                          log_p.masked_fill(target, -torch.inf).logsumexp(dim=1)], dim=1)
    return binary, F.log_softmax(logits / T - 1000.0 * target, dim=1)


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
             alpha: float, beta: float, T: float, logit_std: bool = False
             ) -> tuple[torch.Tensor, LossTerms]:
    """The distillation part, alpha * TCKD + beta * NCKD. Terms: 'tckd', 'nckd'."""
    s, t = wide(student_logits, teacher_logits)
    s, t = (standardize(s), standardize(t)) if logit_std else (s, t)
    (binary_s, others_s), (binary_t, others_t) = (dkd_distributions(z, targets, T) for z in (s, t))
    tckd = F.kl_div(binary_s, binary_t, reduction="batchmean", log_target=True) * T * T
    nckd = F.kl_div(others_s, others_t, reduction="batchmean", log_target=True) * T * T
    return alpha * tckd + beta * nckd, {"tckd": tckd, "nckd": nckd}


def dkd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, alpha: float, beta: float, T: float, ce_weight: float,
                  distill_weight: torch.Tensor | float, logit_std: bool = False
                  ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L: distill_weight is the warm-up, as a tensor so that a new value each epoch
    does not recompile a compiled loss."""
    ce = hard_label_ce(student_logits, targets)
    distill, terms = dkd_loss(student_logits, teacher_logits, targets, alpha, beta, T, logit_std)
    return ce_weight * ce + distill_weight * distill, {"ce": ce, **terms}


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dkd_alpha", type=weight, default=1.0, help="dkd: weight of TCKD")
    p.add_argument("--dkd_beta", type=weight, default=8.0, help="dkd: weight of NCKD")
    p.add_argument("--dkd_warmup", type=number(int, 0), default=20,
                   help="dkd: epochs over which the distillation weight grows linearly to 1 "
                        "(default: %(default)s)")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(dkd_objective, alpha=args.dkd_alpha, beta=args.dkd_beta, T=args.T,
                             ce_weight=args.ce_weight,
                             distill_weight=torch.tensor(warmed_up(epoch, args.dkd_warmup)),
                             logit_std=args.logit_std)


METHOD = Method(("T", "logit_std", "ce_weight", "dkd_alpha", "dkd_beta", "dkd_warmup"),
                add_flags, loss_at)

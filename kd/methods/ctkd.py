"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023; follows the
authors' zhengli97/CTKD with its global temperature (models/temp_global.py Global_T, the default
of train_student.py's --mlp_name), its loss in helper/loops.py train_distill and the curriculum
of train_student.py's CosineDecay, at scripts/run_cifar_distill.sh's settings.

    L = ctkd_ce_weight * CE(y, p_s) + ctkd_weight * D(z_s, z_t; T)
    T = t_min + (t_max - t_min) * sigmoid(theta)    theta: one trainable scalar, 1 at the start
    D = T^2 KL(softmax(z_t / T) || softmax(z_s / T))    --ctkd_loss kd (kd.methods.kd.kd_term)
      = TCKD + 2 NCKD at T                             --ctkd_loss dkd (kd.methods.dkd.dkd_loss)

T is learned adversarially: a gradient reversal layer between T and the loss passes T on
unchanged and multiplies its gradient by -lambda, so the student's SGD step descends L while
theta ascends it (T moves to where the student finds the teacher hardest to match). lambda
follows an easy-to-hard curriculum per epoch e:

    lambda(e) = lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * min(e, E) / E)) / 2

from 0 to 1 over E = 10 epochs (then 1). theta trains with the student by the same SGD, learning
rate schedule, momentum and weight decay, as the reference's trainable_list does (no lr or decay
of its own); it is the connector, saved in last.pt['connector'] ('global_T'). The connector
reads no features (Method.logits_only): the teacher cache can stand in for the teacher.

Followed from the code: the reference's range flags are --t_start 1 and --t_end 20 with T =
t_start + t_end * sigmoid(theta) (loops.py), so t_end is the width and T lies in (1, 21): here
t_min 1 and t_max 21. Its curriculum (--decay_max 0 --decay_min -1 --decay_loops 10 in the
script; the parser's defaults 0, 0, 0 divide by zero) gives the GRL the negative factor
-lambda(e) directly, indexed by the 1-based epoch (epoch 1 already has lambda(1) = 0.024); here
lambda is the paper's positive one and the GRL negates it. The reversal is applied to T rather
than to theta before the sigmoid: the same gradients. The weights are the parser's (-r 0.1 CE,
-a 0.9 KL); with DKD the script's comment runs -r 1 -a 0 -b 1 --dkd_alpha 1 --dkd_beta 2 (so
--ctkd_ce_weight 1 --ctkd_weight 1 here; TCKD 1 and NCKD 2 are fixed, the parser's defaults, and
no warm-up, as the reference's DKDloss has none). Left out: the instance-wise temperature (its
code was released apart from the repository) and the linear curriculum (--cosine_decay 0,
whose LinearDecay ignores decay_min). --logit_std standardizes the logits before T as for kd.
Terms: 'ce', 'kd' (or 'tckd', 'nckd'), 'temperature' (T, for the log; not a summand).
"""
import argparse
import functools
import math

import torch
import torch.nn as nn

from kd.data import Split
from kd.errors import UserError
from kd.flags import number, positive_float, positive_int
from kd.losses import LossFn, LossTerms
from kd.methods.common import Method, hard_label_ce, weight
from kd.methods.dkd import dkd_loss
from kd.methods.kd import kd_term

DKD_ALPHA, DKD_BETA = 1.0, 2.0  # --ctkd_loss dkd: TCKD's and NCKD's weights (the reference's)


def grad_reverse(x: torch.Tensor, strength: torch.Tensor | float) -> torch.Tensor:
    """The gradient reversal layer (Ganin and Lempitsky, 2015): x in the forward, its gradient
    times -strength in the backward. Written as x.detach() - strength * (x - x.detach()) (the
    bracket is exactly 0, with gradient 1) rather than an autograd.Function, so a compiled loss
    traces it and the forward value is x itself."""
    return x.detach() - strength * (x - x.detach())


def grl_lambda(epoch: int, lambda_min: float, lambda_max: float, epochs: int) -> float:
    """The curriculum's reversal strength in a (1-based) epoch: cosine from lambda_min at epoch 0
    to lambda_max at `epochs`, then constant (the reference's CosineDecay, negated)."""
    progress = min(max(epoch, 0), epochs) / epochs
    return lambda_min + (lambda_max - lambda_min) * (1 - math.cos(math.pi * progress)) / 2


def distillation_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, T: torch.Tensor, loss: str, logit_std: bool
                      ) -> tuple[torch.Tensor, LossTerms]:
    """D at temperature T (a tensor): kd's T^2 KL or DKD's TCKD + 2 NCKD, and its terms."""
    if loss == "kd":
        kd = kd_term(student_logits, teacher_logits, T, logit_std)
        return kd, {"kd": kd}
    return dkd_loss(student_logits, teacher_logits, targets, DKD_ALPHA, DKD_BETA, T, logit_std)


def ctkd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, temperature: torch.Tensor, loss: str, ce_weight: float,
                   distill_weight: float, grl_strength: torch.Tensor | float,
                   logit_std: bool = False) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's temperature; grl_strength is the epoch's lambda, as a
    tensor so that a new value each epoch does not recompile a compiled loss."""
    T = grad_reverse(temperature, grl_strength)
    ce = hard_label_ce(student_logits, targets)
    distill, terms = distillation_term(student_logits, teacher_logits, targets, T, loss,
                                       logit_std)
    return ce_weight * ce + distill_weight * distill, \
        {"ce": ce, **terms, "temperature": temperature.detach()}


class GlobalTemperature(nn.Module):
    """The reference's Global_T: one trainable scalar theta (1 at the start, as torch.ones(1)),
    mapped into (t_min, t_max). Called as the other connectors, connector(keys, labels); returns
    T (the objective puts the reversal between it and the loss)."""

    def __init__(self, t_min: float, t_max: float):
        super().__init__()
        self.t_min, self.t_max = t_min, t_max
        self.global_T = nn.Parameter(torch.ones(()))

    def forward(self, keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.t_min + (self.t_max - self.t_min) * torch.sigmoid(self.global_T)


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> GlobalTemperature:
    if args.ctkd_t_max <= args.ctkd_t_min:
        raise UserError(f"--ctkd_t_max {args.ctkd_t_max:g} must exceed --ctkd_t_min "
                        f"{args.ctkd_t_min:g} (the temperature's range)")
    return GlobalTemperature(args.ctkd_t_min, args.ctkd_t_max)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ctkd_loss", choices=["kd", "dkd"], default="kd",
                   help="ctkd: the distillation loss at the learned temperature: kd's T^2 KL, "
                        "or DKD's TCKD + 2 NCKD (the reference's weights, no warm-up)")
    p.add_argument("--ctkd_ce_weight", type=weight, default=0.1,
                   help="ctkd: weight of the hard-label CE (the reference's -r; 1 in its DKD "
                        "command)")
    p.add_argument("--ctkd_weight", type=weight, default=0.9,
                   help="ctkd: weight of the distillation loss (the reference's -a for kd, -b "
                        "for dkd: 1 in its DKD command)")
    p.add_argument("--ctkd_t_min", type=positive_float, default=1.0,
                   help="ctkd: lowest temperature (the reference's --t_start)")
    p.add_argument("--ctkd_t_max", type=positive_float, default=21.0,
                   help="ctkd: highest temperature (the reference's --t_start + --t_end)")
    p.add_argument("--ctkd_lambda_min", type=number(float, 0), default=0.0,
                   help="ctkd: the gradient reversal's strength at epoch 0 (minus the "
                        "reference's --decay_max)")
    p.add_argument("--ctkd_lambda_max", type=number(float, 0), default=1.0,
                   help="ctkd: its strength from --ctkd_lambda_epochs on (minus the "
                        "reference's --decay_min)")
    p.add_argument("--ctkd_lambda_epochs", type=positive_int, default=10,
                   help="ctkd: epochs of the cosine curriculum from --ctkd_lambda_min to "
                        "--ctkd_lambda_max (the reference's --decay_loops)")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    strength = grl_lambda(epoch, args.ctkd_lambda_min, args.ctkd_lambda_max,
                          args.ctkd_lambda_epochs)
    return functools.partial(ctkd_objective, loss=args.ctkd_loss, ce_weight=args.ctkd_ce_weight,
                             distill_weight=args.ctkd_weight,
                             grl_strength=torch.tensor(strength), logit_std=args.logit_std)


METHOD = Method(("logit_std", "ctkd_loss", "ctkd_ce_weight", "ctkd_weight", "ctkd_t_min",
                 "ctkd_t_max", "ctkd_lambda_min", "ctkd_lambda_max", "ctkd_lambda_epochs"),
                add_flags, loss_at, connector, logits_only=True)

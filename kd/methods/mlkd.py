"""MLKD: Jin, Wang and Lin, "Multi-Level Logit Distillation", CVPR 2023; follows the code of
Jin-Ying/Multi-Level-Logit-Distillation (mdistiller/distillers/KD_ours.py, its dataset's strong
view; CE weight 0.1 and KD weight 0.9 from its engine/cfg.py, T 4), not the paper where they
differ.

    L = ce_weight * (CE(y, p_s^w) + CE(y, p_s^s)) + kd_weight * (instance + class + batch)
    instance = m * sum_{tau in T, 3, 5, 2, 6} KL_tau(w)
               + KL_T(s) + KL_3(s) + KL_5(s) + KL_2(w) + KL_6(w)
    class    = c * sum_tau |P_t^T P_t - P_s^T P_s|^2 / C         (C x C class correlations)
    batch    = m * sum_tau |P_t P_t^T - P_s P_s^T|^2 / B         (B x B image correlations)

w: the weak view (the loader's crop and flip), s: the strong view (a fresh crop and flip,
RandAugment and Cutout: kd.augment, batched on the device); KL_tau = tau^2 * KL(softmax(z_t / tau)
|| softmax(z_s / tau)) averaged over the batch; P = softmax(z^w / tau) [B, C]; |.|^2 the sum of
squares. The teacher runs on both views; the student's two forwards are separate, as the
reference's (BatchNorm statistics per view).

Where the code differs from the paper (followed here): the confidence masks multiply batch-mean
losses before a mean, so m is the fraction of images whose teacher confidence max p_t^w is at or
below the batch median and c the fraction of classes whose summed p_t^w is (each about a half),
a scale, not a per-image mask; the strong-view instance term takes its temperatures 2 and 6 on
the weak view; the strong-view class and batch terms are computed and not returned by the code,
so they are not here. Medians are linear-interpolation quantiles, as np.percentile, on the
device. Terms: 'ce' (both views' CE), 'instance', 'class', 'batch'.
"""
import argparse
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.augment import strong_view
from kd.data import NUM_VIEWS, Split, normalize
from kd.inference import MEMORY_FORMAT
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, weight
from kd.methods.kd import soft_kl

OTHER_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # beside --T, as the reference's code


def correlation_gap(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
                    over_classes: bool) -> torch.Tensor:
    """|G_t - G_s|^2 / n of the Gram matrices of P = softmax(z / tau): P^T P and n = C (class
    level), or P P^T and n = B (batch level)."""
    p_s, p_t = F.softmax(student_logits / tau, dim=1), F.softmax(teacher_logits / tau, dim=1)
    gram = (lambda p: p.T @ p) if over_classes else (lambda p: p @ p.T)
    with torch.autocast(p_s.device.type, enabled=False):  # float32 products, autocast or not
        return (gram(p_t) - gram(p_s)).pow(2).sum() / p_s.shape[1 if over_classes else 0]


def below_median(values: torch.Tensor) -> torch.Tensor:
    """The fraction of values at or below their median: np.percentile's (50), the linear
    interpolation of the two middle values, from a sort (its positions are known on the host)."""
    ordered, middle = values.sort().values, (len(values) - 1) / 2
    low, high = ordered[math.floor(middle)], ordered[math.ceil(middle)]
    median = low + (high - low) * (middle - math.floor(middle))
    return (values <= median).to(values.dtype).mean()


def mlkd_loss(weak: tuple[torch.Tensor, torch.Tensor], strong: tuple[torch.Tensor, torch.Tensor],
              T: float) -> tuple[torch.Tensor, LossTerms]:
    """instance + class + batch of the module's L, on (student, teacher) logits of each view.
    Terms: 'instance', 'class', 'batch'."""
    (s_w, t_w), (s_s, t_s) = wide(*weak), wide(*strong)
    taus = (T, *OTHER_TEMPERATURES)
    p_t = F.softmax(t_w, dim=1)
    m, c = below_median(p_t.amax(dim=1)), below_median(p_t.sum(dim=0))
    instance = (m * sum(soft_kl(s_w, t_w, tau) for tau in taus)
                + sum(soft_kl(s_s, t_s, tau) for tau in taus[:3])
                + sum(soft_kl(s_w, t_w, tau) for tau in taus[3:]))
    class_ = c * sum(correlation_gap(s_w, t_w, tau, over_classes=True) for tau in taus)
    batch = m * sum(correlation_gap(s_w, t_w, tau, over_classes=False) for tau in taus)
    terms = {"instance": instance, "class": class_, "batch": batch}
    return instance + class_ + batch, terms


def mlkd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, strong: tuple[torch.Tensor, torch.Tensor], T: float,
                   ce_weight: float, kd_weight: float) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the weak view's logits and the connector's strong-view logits."""
    s_w, s_s = wide(student_logits, strong[0])
    ce = F.cross_entropy(s_w, targets) + F.cross_entropy(s_s, targets)
    distill, terms = mlkd_loss((student_logits, teacher_logits), strong, T)
    return ce_weight * ce + kd_weight * distill, {"ce": ce, **terms}


class StrongViews(nn.Module):
    """MLKD's connector: each training image's strong view (kd.augment.strong_view, drawn anew
    every step from torch's RNG, which kd.train seeds per epoch), through the student and the
    teacher. Returns (student logits, teacher logits) of the strong views.

    It holds the training file's uint8 images (a buffer, not saved: last.pt's connector entry is
    empty) and the two models by reference, not as submodules: the student is trained and saved
    as the student, the teacher stays frozen."""

    def __init__(self, student: nn.Module, teacher: nn.Module, train: Split):
        super().__init__()
        self.models = (student, teacher)
        self.register_buffer("images", train.images, persistent=False)

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = self.models
        images = self.images[torch.div(keys, NUM_VIEWS, rounding_mode="floor")]
        x = normalize(strong_view(images)).contiguous(memory_format=MEMORY_FORMAT)
        with torch.no_grad():
            teacher_logits = teacher(x)
        return student(x), teacher_logits


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> StrongViews:
    return StrongViews(student, teacher, train)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlkd_ce_weight", type=weight, default=0.1,
                   help="mlkd: weight of the hard-label CE of both views (the reference's "
                        "CE_WEIGHT)")
    p.add_argument("--mlkd_weight", type=weight, default=0.9,
                   help="mlkd: weight of the instance, class and batch terms (its KD_WEIGHT)")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(mlkd_objective, T=args.T, ce_weight=args.mlkd_ce_weight,
                             kd_weight=args.mlkd_weight)


METHOD = Method(("T", "mlkd_ce_weight", "mlkd_weight"), add_flags, loss_at, connector)

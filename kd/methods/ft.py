"""FT: Kim, Park and Kwak, "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018; as RepDistiller's distiller_zoo/FT.py, models/util.py (Paraphraser,
Translator, k = 0.5) and its two stages: --init_epochs 30 in which the paraphraser learns to
reconstruct the teacher's last-stage map, then the paraphraser frozen and the translator trained
with the student, weight 200 on CIFAR-100 (`-r 1 -a 0 -b 200`).

    init stage: MSE(P_dec(P_enc(F_t)), F_t)
    main stage: L = ce_weight * CE(y, p_s) + ft_weight * mean |f(T(F_s)) - f(P_enc(F_t))|
    f(x) = normalize(mean over channels of x^2, flattened over the map)   (L2, per image)

F_s, F_t: both models' last-stage maps (after their activations), the larger of the two factors
pooled to the smaller's size; P: the paraphraser (3x3 convs with LeakyReLU 0.1, no BatchNorm,
to k x the teacher's channels and back), T: the translator (3x3 convs with BatchNorm and
LeakyReLU, from the student's channels to k x the teacher's). The factor f is RepDistiller's
(the paper's p1 = 2, p2 = 1). At our teacher's 2048 channels the paraphraser holds 132 M
parameters and the translator 17 M (RepDistiller's resnet32x4 teacher has 256). The init stage's
SGD runs at --init_lr 0.01, fixed: RepDistiller's pretrain.py takes 0.01 for FT's ResNet and WRN
students and its learning rate, also 0.01, for a MobileNet student. Terms: 'ce', 'ft'
(init_log.csv: 'init_reconstruction').
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd import features
from kd.data import Split
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight
from kd.train import InitStage

K = 0.5  # the factor's channels, as a share of the teacher's


def factor(x: torch.Tensor) -> torch.Tensor:
    """f(x): [B, C, H, W] -> [B, H * W], each row of unit L2 norm."""
    return F.normalize(x.pow(2).mean(dim=1).flatten(1), dim=1)


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor) -> torch.Tensor:
    """The factor-transfer loss of maps of equal sizes."""
    s, t = wide(student_factor, teacher_factor)
    return (factor(s) - factor(t)).abs().mean()


def ft_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 targets: torch.Tensor, features: tuple, ce_weight: float, ft_weight: float
                 ) -> tuple[torch.Tensor, LossTerms]:
    """The main stage's L, on the connector's (translated student map, teacher factor)."""
    ce = hard_label_ce(student_logits, targets)
    ft = ft_loss(*features)
    return ce_weight * ce + ft_weight * ft, {"ce": ce, "ft": ft}


def init_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, features: tuple) -> tuple[torch.Tensor, LossTerms]:
    """The init stage's loss, on the connector's (reconstruction, teacher map)."""
    reconstruction, teacher_map = wide(*features)
    mse = F.mse_loss(reconstruction, teacher_map)
    return mse, {"reconstruction": mse}


def convs(channels: list[int], batch_norm: bool, transposed: bool = False) -> nn.Sequential:
    """3x3 convs (stride 1, padding 1) through `channels`, each followed by BatchNorm when asked
    and LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers = []
    for a, b in zip(channels, channels[1:]):
        layers += [conv(a, b, 3, 1, 1), *([nn.BatchNorm2d(b)] if batch_norm else []),
                   nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class FactorConnector(nn.Module):
    """FT's connector: the paraphraser's encoder and decoder on the teacher's last-stage map and
    the translator on the student's. Returns (translated student map, teacher factor), at the
    smaller of their sizes, the teacher's factor computed without gradients (the paraphraser is
    frozen after the init stage); reconstruct() returns (reconstruction, teacher map) instead."""

    def __init__(self, student: features.Taps, teacher: features.Taps):
        super().__init__()
        self.taps = (student, teacher)
        last = features.STAGES - 1
        (cs, hs, _), (ct, ht, _) = student.shapes[last], teacher.shapes[last]
        self.size, mid = min(hs, ht), int(ct * K)
        self.encoder = convs([ct, ct, mid, mid], batch_norm=False)
        self.decoder = convs([mid, mid, ct, ct], batch_norm=False, transposed=True)
        self.translator = convs([cs, cs, mid, mid], batch_norm=True)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        last = [features.STAGES - 1]
        return tuple(taps.read(last)[0] for taps in self.taps)

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = self.read()
        with torch.no_grad():
            teacher_factor = features.pool_to(self.encoder(teacher), self.size)
        return features.pool_to(self.translator(student), self.size), teacher_factor

    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, teacher = self.read()
        return self.decoder(self.encoder(teacher)), teacher


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> FactorConnector:
    taps = features.student_taps(student)
    return FactorConnector(taps, features.teacher_taps(teacher, taps))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ft_weight", type=weight, default=200.0,
                   help="ft: weight of the factor-transfer loss")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(ft_objective, ce_weight=args.ce_weight, ft_weight=args.ft_weight)


INIT = InitStage(
    parameters=lambda student, connector: [*connector.encoder.parameters(),
                                           *connector.decoder.parameters()],
    loss=lambda args: init_objective,
    connect=lambda connector, keys, labels: connector.reconstruct(),
    training=lambda student, connector: [connector.encoder, connector.decoder])
METHOD = Method(("ce_weight", "init_epochs", "init_lr", "ft_weight"), add_flags, loss_at,
                connector, INIT)

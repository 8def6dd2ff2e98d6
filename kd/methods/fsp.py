"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization
and Transfer Learning", CVPR 2017; as RepDistiller's distiller_zoo/FSP.py and its two stages:
--init_epochs 30 in which the student's feature layers learn the teacher's flow between
consecutive stages, then plain training on the labels (`-r 1 -a 0`; the main stage's FSP term is
0 in RepDistiller's loop).

    init stage: sum over consecutive stages (i, i + 1) of mean((G_s,i - G_t,i)^2)
    G_i = mean over positions of F_i+1[:, c, p] F_i[:, d, p]   ([B, C_i+1, C_i]: the FSP matrix)
    main stage: L = ce_weight * CE(y, p_s)

F: the four stages' maps, each student map through a trainable 1x1 conv and BatchNorm to the
teacher's channels; within a pair the larger map is pooled to the smaller's size, and each
stage of the two models is compared at the smaller of its two sizes. Our pair forces this: the
reference raises ValueError unless both models have the same channels at every stage, which its
CIFAR-100 pairs do and ours (16..576 against 256..2048) does not; it also includes the stem's
output as the first map. The init stage's SGD runs at --init_lr 0.01, fixed (RepDistiller's
for a MobileNet student), on the student's feature layers and the connectors. Terms: 'ce'
(init_log.csv: 'init_fsp').
"""
import argparse
import functools

import torch
import torch.nn as nn

from kd import features
from kd.data import Split
from kd.losses import LossFn, LossTerms, wide
from kd.methods.ab import StageConnectors, ce_objective
from kd.methods.common import Method
from kd.train import InitStage


def fsp_matrices(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The FSP matrix [B, C_i+1, C_i] of each pair of consecutive maps."""
    out = []
    for bottom, top in zip(maps, maps[1:]):
        size = min(bottom.shape[-1], top.shape[-1])
        bottom, top = (features.pool_to(x, size).flatten(2) for x in (bottom, top))
        out.append(top @ bottom.transpose(1, 2) / bottom.shape[-1])
    return out


def fsp_loss(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor]) -> torch.Tensor:
    """The FSP loss over the consecutive pairs of stages."""
    return sum((s - t).pow(2).mean() for s, t in zip(fsp_matrices(wide(*student_maps)),
                                                      fsp_matrices(wide(*teacher_maps))))


def init_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   targets: torch.Tensor, features: tuple) -> tuple[torch.Tensor, LossTerms]:
    """The init stage's loss, on the connector's (connected student maps, teacher maps)."""
    fsp = fsp_loss(*features)
    return fsp, {"fsp": fsp}


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> StageConnectors:
    return StageConnectors(*features.stage_taps(student, teacher))


def add_flags(p: argparse.ArgumentParser) -> None:
    """FSP reads only the shared --ce_weight, --init_epochs and --init_lr."""


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(ce_objective, ce_weight=args.ce_weight)


INIT = InitStage(
    parameters=lambda student, connector: [*connector.parameters(),
                                           *student.features.parameters()],
    loss=lambda args: init_objective,
    connect=lambda connector, keys, labels: connector(keys, labels),
    training=lambda student, connector: [student.features, connector])
METHOD = Method(("ce_weight", "init_epochs", "init_lr"), add_flags, loss_at, connector,
                INIT)

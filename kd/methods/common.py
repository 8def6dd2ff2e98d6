"""What the method modules share: the entry each one gives the registry (Method), the flags more
than one method reads, and the hard-label CE that most objectives add to their distillation term.
"""
import argparse
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.data import Split
from kd.flags import number, positive_float, positive_int
from kd.losses import LossFn, wide
from kd.train import InitStage

weight = number(float, 0)
# a feature method's connector, built from distill_student.py's flags, the student, the teacher
# (on its device) and the training file (distill_student.training_file: every image by its
# position, the label -1 where --val_size holds it out)
Connector = Callable[[argparse.Namespace, nn.Module, nn.Module, Split], nn.Module]


@dataclass(frozen=True)
class Method:
    """A distillation method, as its module kd.methods.<name> gives it to the registry.

    flags: the flags it reads beyond those of every distilled run, shared ones included (study.py
    grids a method over these only; a flag no method of the run reads is refused); add_flags:
    adds the flags that are its own to distill_student.py's parser; loss_at(args, epoch): the
    loss it minimises in an epoch, called by kd.train as loss(logits, teacher_logits, labels) or,
    with a connector, loss(logits, teacher_logits, labels, connector(keys, labels));
    connector: for a feature method, what builds the trainable module that reads both models'
    taps (kd.features), trained with the student and saved apart from it in last.pt; init: a
    stage of --init_epochs before the first epoch (kd.train.InitStage); logits_only: the
    connector reads nothing of the teacher but its logits of the training batch (CTKD's
    temperature), so the logit cache --teacher_cache can stand in for the live teacher.
    """

    flags: tuple[str, ...]
    add_flags: Callable[[argparse.ArgumentParser], None]
    loss_at: Callable[[argparse.Namespace, int], LossFn]
    connector: Connector | None = None
    init: InitStage | None = None
    logits_only: bool = False

    @property
    def online(self) -> bool:
        """Whether the teacher must run online: the connector reads more of it than the logit
        cache holds (its features, or its logits of other views)."""
        return self.connector is not None and not self.logits_only


# The flags several methods read: name -> (argparse keywords, what it is); the help names the
# methods that read it (kd.methods.add_flags).
SHARED_FLAGS = {
    "T": (dict(type=positive_float, default=4.0), "softmax temperature of both models"),
    "ce_weight": (dict(type=weight, default=1.0), "weight of the hard-label CE"),
    "logit_std": (dict(action="store_true"),
                  "standardize each image's logits (mean 0, std 1) before T"),
    "feat_dim": (dict(type=positive_int, default=128), "dimension of both embeddings"),
    "init_epochs": (dict(type=number(int, 0), default=30),
                    "epochs of the initialisation stage before the first (RepDistiller's)"),
    "init_lr": (dict(type=positive_float, default=0.01),
                "fixed learning rate of the initialisation stage's SGD (RepDistiller's for a "
                "MobileNet student)"),
}


def hard_label_ce(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE(y, p_s) in float32 (or wider), whatever the autocast dtype of the logits."""
    return F.cross_entropy(wide(student_logits)[0], targets)


def warmed_up(epoch: int, warmup_epochs: int) -> float:
    """DKD's and ReviewKD's linear warm-up of the distillation weight: min(epoch / warmup, 1)."""
    return min(epoch / warmup_epochs, 1.0) if warmup_epochs else 1.0

"""Distill a fine-tuned ResNet-50 teacher into the MobileNetV3-Small student.

Through its logits:
--method kd (Hinton et al., 2015; the default):
    alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))
--method dkd (Zhao et al., 2022): ce_weight * CE + warm-up * (dkd_alpha * TCKD + dkd_beta * NCKD)
--method dist (Huang et al., 2022): ce_weight * CE + dist_beta * inter + dist_gamma * intra
--logit_std (Sun et al., 2024) z-scores both models' logits first, for kd and dkd.
Through its features (the teacher runs online; a trainable connector, saved in last.pt apart
from the student, carries the student's features to the teacher's):
--method fitnet (Romero et al., 2015): ce_weight * CE + hint_weight * MSE at --hint_stage
--method crd (Tian et al., 2020): ce_weight * CE + crd_weight * contrastive loss (memory bank)
--method reviewkd (Chen et al., 2021): ce_weight * CE + warm-up * review_weight * HCL
Formulas and terms: kd/losses.py; taps and connectors: kd/features.py.
"""
import argparse
import copy
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from kd import features
from kd.cache import open_cache
from kd.checkpoint import file_sha256
from kd.distributed import World
from kd.errors import UserError, run_script
from kd.flags import add_student_flags, base_parser, number, positive_float, positive_int
from kd.losses import (crd_objective, dist_objective, dkd_objective, fitnet_objective, kd_loss,
                       reviewkd_objective)
from kd.models import STUDENT_ARCH, build_student, load_teacher
from kd.rundir import resumed_config
from kd.train import MEMORY_FORMAT, LossFn, Teacher, fit, prepare_run

weight = number(float, 0)


def kd_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(kd_loss, alpha=args.alpha, T=args.T, logit_std=args.logit_std)


def dkd_at(args: argparse.Namespace, epoch: int) -> LossFn:
    warmed_up = min(epoch / args.dkd_warmup, 1.0) if args.dkd_warmup else 1.0
    return functools.partial(dkd_objective, alpha=args.dkd_alpha, beta=args.dkd_beta, T=args.T,
                             ce_weight=args.ce_weight, distill_weight=torch.tensor(warmed_up),
                             logit_std=args.logit_std)


def dist_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(dist_objective, beta=args.dist_beta, gamma=args.dist_gamma,
                             T=args.T, ce_weight=args.ce_weight)


def fitnet_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(fitnet_objective, ce_weight=args.ce_weight,
                             hint_weight=args.hint_weight)


def crd_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(crd_objective, ce_weight=args.ce_weight, crd_weight=args.crd_weight)


def reviewkd_at(args: argparse.Namespace, epoch: int) -> LossFn:
    warmed_up = min(epoch / args.review_warmup, 1.0) if args.review_warmup else 1.0
    return functools.partial(reviewkd_objective, ce_weight=args.ce_weight,
                             review_weight=torch.tensor(args.review_weight * warmed_up))


Connector = Callable[[argparse.Namespace, nn.Module, nn.Module], nn.Module]


@dataclass(frozen=True)
class Method:
    """A distillation method: the flags it reads beyond those of every distilled run (study.py
    grids a method over these only; tests/test_study.py checks that no other flag changes its
    loss), the loss it minimises in an epoch, and for a feature method the connector it trains
    (kd.features)."""

    flags: tuple[str, ...]
    loss_at: Callable[[argparse.Namespace, int], LossFn]
    connector: Connector | None = None


METHODS = {
    "kd": Method(("T", "alpha", "logit_std"), kd_at),
    "dkd": Method(("T", "logit_std", "ce_weight", "dkd_alpha", "dkd_beta", "dkd_warmup"), dkd_at),
    "dist": Method(("T", "ce_weight", "dist_beta", "dist_gamma"), dist_at),
    "fitnet": Method(("ce_weight", "hint_weight", "hint_stage"), fitnet_at,
                     features.hint_regressor),
    "crd": Method(("ce_weight", "crd_weight", "feat_dim", "nce_k", "nce_t", "nce_m"), crd_at,
                  features.contrast_memory),
    "reviewkd": Method(("ce_weight", "review_weight", "review_warmup"), reviewkd_at,
                       features.review_fusion),
}
METHOD_FLAGS = {name: method.flags for name, method in METHODS.items()}


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    """The loss --method and its flags minimise in `epoch` (kd.losses)."""
    return METHODS[args.method].loss_at(args, epoch)


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__, out_dir="runs/student_kd", epochs=120, batch_size=256, lr=0.2)
    add_student_flags(p)
    p.add_argument("--teacher_ckpt", default="runs/teacher_resnet50/best.pt",
                   help="checkpoint written by train_teacher.py; its --img_size is reused")
    p.add_argument("--teacher_cache", default=None,
                   help="the teacher's logits of every training view (kd.cache): used when the "
                        "file exists (after checks), built there first when it does not; then no "
                        "teacher forward runs in training. None: the teacher runs online")
    p.add_argument("--method", choices=list(METHODS), default="kd",
                   help="the distillation loss; a flag that the method does not read is refused")
    p.add_argument("--T", type=positive_float, default=4.0,
                   help="kd, dkd, dist: softmax temperature of both models")
    p.add_argument("--alpha", type=number(float, 0, 1, why=" (it weighs the hard-label CE)"),
                   default=0.5, help="kd: weight of the hard-label CE; 1 - alpha weighs the "
                   "T^2-scaled KL")
    p.add_argument("--logit_std", action="store_true",
                   help="kd, dkd: standardize each image's logits (mean 0, std 1) before T")
    p.add_argument("--ce_weight", type=weight, default=1.0,
                   help="dkd, dist, fitnet, crd, reviewkd: weight of the hard-label CE")
    p.add_argument("--dkd_alpha", type=weight, default=1.0,
                   help="dkd: weight of TCKD")
    p.add_argument("--dkd_beta", type=weight, default=8.0,
                   help="dkd: weight of NCKD")
    p.add_argument("--dkd_warmup", type=number(int, 0), default=20,
                   help="dkd: epochs over which the distillation weight grows linearly to 1 "
                        "(default: %(default)s)")
    p.add_argument("--dist_beta", type=weight, default=2.0,
                   help="dist: weight of the inter-class relation")
    p.add_argument("--dist_gamma", type=weight, default=2.0,
                   help="dist: weight of the intra-class relation")
    p.add_argument("--hint_weight", type=weight, default=100.0,
                   help="fitnet: weight of the hint loss (mdistiller's CIFAR-100 setting)")
    p.add_argument("--hint_stage", type=int, choices=range(1, features.STAGES + 1), default=2,
                   help="fitnet: the stage whose maps are matched (1..4; 2, the middle, as "
                        "mdistiller)")
    p.add_argument("--crd_weight", type=weight, default=0.8,
                   help="crd: weight of the contrastive loss")
    p.add_argument("--feat_dim", type=positive_int, default=128,
                   help="crd: dimension of both embeddings")
    p.add_argument("--nce_k", type=positive_int, default=16384,
                   help="crd: negatives per image, drawn from the training images of other "
                        "classes")
    p.add_argument("--nce_t", type=positive_float, default=0.07,
                   help="crd: temperature of the scores")
    p.add_argument("--nce_m", type=number(float, 0, 1, high_open=True), default=0.5,
                   help="crd: momentum of the memory bank's update")
    p.add_argument("--review_weight", type=weight, default=1.0,
                   help="reviewkd: weight of the hierarchical context loss")
    p.add_argument("--review_warmup", type=number(int, 0), default=20,
                   help="reviewkd: epochs over which the review weight grows linearly to 1")
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    refuse_unread_flags(p, args)
    method = METHODS[args.method]
    if method.connector and args.teacher_cache:
        p.error(f"--method {args.method} reads the teacher's features, which the logit cache "
                f"--teacher_cache does not hold: leave it out (the teacher runs online)")
    if method.connector and World.from_env().size > 1:
        raise UserError(f"--method {args.method} runs in one process for now (its connector "
                        f"and CRD's memory bank are not synchronised across torchrun's ranks)")
    start = prepare_run(args, keep=(args.teacher_ckpt, args.teacher_cache or ""))
    teacher = load_teacher(args.teacher_ckpt).to(start.device, memory_format=MEMORY_FORMAT)
    run_info = {"arch": STUDENT_ARCH, "teacher_sha256": file_sha256(args.teacher_ckpt),
                "teacher_logits": "cache" if args.teacher_cache else "online",
                "teacher_cache_sha256": None}
    if start.checkpoint:  # refuse a switch between online and cached logits before any build
        saved = start.checkpoint["config"]
        resumed_config(saved, {**saved, "teacher_logits": run_info["teacher_logits"]}, 0)
    if args.teacher_cache:  # the logits of the very view each image is trained on, looked up
        train_logits = open_cache(args.teacher_cache, teacher, args, start.device)
        run_info["teacher_cache_sha256"] = file_sha256(args.teacher_cache)
    else:
        online = torch.compile(teacher) if args.compile else teacher
        train_logits = lambda images, keys: online(images)
    student = build_student(args.stem)
    connector = method.connector(args, student, teacher) if method.connector else None
    fit(args, student, start, loss_at, run_info, Teacher(teacher, train_logits, connector))


def refuse_unread_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line for a method's flag given to a --method that does not read it (it would be
    recorded in config.json but change nothing), as study.py refuses it."""
    shadow = copy.deepcopy(parser)
    for action in shadow._actions:  # what the command line sets, without the defaults
        action.default = argparse.SUPPRESS
    given = vars(shadow.parse_args())
    for name in given:
        readers = [m for m, method in METHODS.items() if name in method.flags]
        if readers and args.method not in readers:
            parser.error(f"--{name} is read by --method {', '.join(readers)}, not by "
                         f"{args.method}")


if __name__ == "__main__":
    run_script(main)

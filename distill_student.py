"""Distill a fine-tuned ResNet-50 teacher into the MobileNetV3-Small student through its logits.

--method kd (Hinton et al., 2015; the default):
    alpha * CE(y, p_s) + (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))
--method dkd (Zhao et al., 2022): ce_weight * CE + warm-up * (dkd_alpha * TCKD + dkd_beta * NCKD)
--method dist (Huang et al., 2022): ce_weight * CE + dist_beta * inter + dist_gamma * intra
--logit_std (Sun et al., 2024) z-scores both models' logits first, for kd and dkd.
Formulas and terms: kd/losses.py.
"""
import argparse
import functools

import torch

from kd.cache import open_cache
from kd.checkpoint import file_sha256
from kd.errors import run_script
from kd.flags import add_student_flags, base_parser, number, positive_float
from kd.losses import dist_objective, dkd_objective, kd_loss
from kd.models import STUDENT_ARCH, build_student, load_teacher
from kd.rundir import resumed_config
from kd.train import MEMORY_FORMAT, LossFn, Teacher, fit, prepare_run

weight = number(float, 0)


# The flags each --method reads beyond those of every distilled run (study.py grids a method over
# these only; tests/test_study.py checks that no other flag changes the method's loss)
METHOD_FLAGS = {"kd": ("T", "alpha", "logit_std"),
                "dkd": ("T", "logit_std", "ce_weight", "dkd_alpha", "dkd_beta", "dkd_warmup"),
                "dist": ("T", "ce_weight", "dist_beta", "dist_gamma")}


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__, out_dir="runs/student_kd", epochs=120, batch_size=256, lr=0.2)
    add_student_flags(p)
    p.add_argument("--teacher_ckpt", default="runs/teacher_resnet50/best.pt",
                   help="checkpoint written by train_teacher.py; its --img_size is reused")
    p.add_argument("--teacher_cache", default=None,
                   help="the teacher's logits of every training view (kd.cache): used when the "
                        "file exists (after checks), built there first when it does not; then no "
                        "teacher forward runs in training. None: the teacher runs online")
    p.add_argument("--method", choices=["kd", "dkd", "dist"], default="kd",
                   help="the distillation loss")
    p.add_argument("--T", type=positive_float, default=4.0,
                   help="softmax temperature of both models, every method")
    p.add_argument("--alpha", type=number(float, 0, 1, why=" (it weighs the hard-label CE)"),
                   default=0.5, help="kd: weight of the hard-label CE; 1 - alpha weighs the "
                   "T^2-scaled KL")
    p.add_argument("--logit_std", action="store_true",
                   help="kd, dkd: standardize each image's logits (mean 0, std 1) before T")
    p.add_argument("--ce_weight", type=weight, default=1.0,
                   help="dkd, dist: weight of the hard-label CE")
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
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    if args.logit_std and args.method == "dist":
        p.error("--logit_std applies to --method kd and dkd")
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
    fit(args, build_student(args.stem), start, loss_at, run_info, Teacher(teacher, train_logits))


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    """The loss --method and its flags minimise in `epoch` (kd.losses)."""
    if args.method == "kd":
        return functools.partial(kd_loss, alpha=args.alpha, T=args.T, logit_std=args.logit_std)
    if args.method == "dist":
        return functools.partial(dist_objective, beta=args.dist_beta, gamma=args.dist_gamma,
                                 T=args.T, ce_weight=args.ce_weight)
    warmed_up = min(epoch / args.dkd_warmup, 1.0) if args.dkd_warmup else 1.0
    return functools.partial(dkd_objective, alpha=args.dkd_alpha, beta=args.dkd_beta, T=args.T,
                             ce_weight=args.ce_weight, distill_weight=torch.tensor(warmed_up),
                             logit_std=args.logit_std)


if __name__ == "__main__":
    run_script(main)

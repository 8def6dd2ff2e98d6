"""Distill a fine-tuned ResNet-50 teacher into the MobileNetV3-Small student, by --method:
{methods}
Each method is one module, kd/methods/<name>.py: its formula, loss, flags and, for a feature method
(the teacher runs online; a trainable connector, saved in last.pt apart from the student, carries
the student's features to the teacher's), its connector.
"""
import argparse
import copy

import torch

from kd.cache import open_cache
from kd.checkpoint import file_sha256
from kd.data import Split, hold_out, load_split
from kd.distributed import World
from kd.errors import UserError, run_script
from kd.flags import NO_CACHE, STUDENT_RECIPE, add_student_flags, base_parser, cache_file
from kd.inference import MEMORY_FORMAT
from kd.losses import LossFn
from kd.methods import METHODS, add_flags as add_method_flags, readers, summary
from kd.models import STUDENT_ARCH, build_student, load_teacher
from kd.optim import add_optimizer_flags
from kd.rundir import resumed_config
from kd.train import Teacher, fit, prepare_run

__doc__ = __doc__.format(methods="".join(f"  {name:9s} {summary(name)}\n" for name in METHODS))


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    """The loss --method and its flags minimise in `epoch` (kd/methods/<method>.py)."""
    return METHODS[args.method].loss_at(args, epoch)


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__, out_dir="runs/student_kd", **STUDENT_RECIPE)
    add_student_flags(p)
    p.add_argument("--teacher_ckpt", default="runs/teacher_resnet50/best.pt",
                   help="checkpoint written by train_teacher.py; its --img_size is reused")
    p.add_argument("--teacher_cache", type=cache_file, default=None,
                   help="the teacher's logits of every training view (kd.cache): used when the "
                        "file exists (after checks), built there first when it does not; then no "
                        f"teacher forward runs in training. Default, or {NO_CACHE}: the teacher "
                        "runs online")
    add_optimizer_flags(p)
    add_method_flags(p)
    return p


def training_file(args: argparse.Namespace) -> Split:
    """The training file as a connector reads it: every image by its position, the label -1 for
    the images that --val_size holds out as kd.train.fit does (a memory bank has a row per
    image; MLKD draws its strong views of the images)."""
    train = load_split(args.data_dir, train=True, download=args.download)
    if not args.val_size:
        return train
    kept, _ = hold_out(train, args.val_size, args.seed)
    labels = torch.full_like(train.labels, -1)
    labels[kept.file_index] = kept.labels
    return Split(train.images, labels, train.coarse_labels, train.classes)


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    refuse_settings(p, args)
    if args.optimizer == "dot" and World.from_env().size > 1:
        raise UserError("--optimizer dot runs in one process (under torchrun, DDP would "
                        "all-reduce only the first of its two backward passes a step)")
    method = METHODS[args.method]
    if method.online and args.teacher_cache:
        p.error(f"--method {args.method} reads more of the teacher than the logit cache "
                f"--teacher_cache holds (its features, or its logits of other views): leave it "
                f"out (the teacher runs online)")
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
    connector = method.connector(args, student, teacher, training_file(args)) \
        if method.connector else None
    fit(args, student, start, loss_at, run_info,
        Teacher(teacher, train_logits, connector, method.init),
        dot_delta=args.dot_delta if args.optimizer == "dot" else None)


def refuse_settings(parser: argparse.ArgumentParser, args: argparse.Namespace,
                    argv: list[str] | None = None) -> None:
    """One line for settings that cannot train as given (study.py asks it of every distilled
    run it plans, argv its command line): a method's flag given to a --method that does not read
    it, or --dot_delta without --optimizer dot (either would be recorded in config.json but
    change nothing); DOT's two momenta outside [0, 1)."""
    shadow = copy.deepcopy(parser)
    for action in shadow._actions:  # what the command line sets, without the defaults
        action.default = argparse.SUPPRESS
    given = vars(shadow.parse_args(argv))
    for name in given:
        methods = readers(name)
        if methods and args.method not in methods:
            parser.error(f"--{name} is read by --method {', '.join(methods)}, not by "
                         f"{args.method}")
    if "dot_delta" in given and args.optimizer != "dot":
        parser.error(f"--dot_delta is read by --optimizer dot, not by {args.optimizer}")
    task, distillation = args.momentum - args.dot_delta, args.momentum + args.dot_delta
    if args.optimizer == "dot" and not 0 <= task <= distillation < 1:
        parser.error(f"--momentum {args.momentum:g} and --dot_delta {args.dot_delta:g} give DOT "
                     f"momenta {task:g} and {distillation:g}: both must lie in [0, 1)")


if __name__ == "__main__":
    run_script(main)

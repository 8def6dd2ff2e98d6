"""Train the MobileNetV3-Small student on CIFAR-100 with cross-entropy: the baseline for KD."""
import argparse

from kd.errors import run_script
from kd.flags import STUDENT_RECIPE, add_student_flags, base_parser
from kd.losses import ce_loss
from kd.models import STUDENT_ARCH, build_student
from kd.train import LossFn, fit, prepare_run


def build_parser() -> argparse.ArgumentParser:
    p = base_parser(__doc__, out_dir="runs/student_baseline", **STUDENT_RECIPE)
    add_student_flags(p)
    return p


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    """The hard-label cross-entropy, every epoch."""
    return ce_loss


def main() -> None:
    args = build_parser().parse_args()
    start = prepare_run(args)
    fit(args, build_student(args.stem), start, loss_at, {"arch": STUDENT_ARCH})


if __name__ == "__main__":
    run_script(main)

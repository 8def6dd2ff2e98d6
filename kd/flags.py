"""The flags every training script shares, each defined once; a script adds its own on top.

A value that cannot train is refused by its flag's type, before anything is loaded or written.
"""
import argparse
import math
import sys

from kd.errors import say
from kd.models import NUM_CLASSES


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), not a usage block."""

    def error(self, message: str):
        say(f"error: {message} (see {self.prog} --help)")
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help, but None, which the help itself describes ("default:
    one per GPU"); the script's description and epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def number(kind: type, low: float, high: float = float("inf"), *, low_open: bool = False,
           high_open: bool = False, why: str = ""):
    """An argparse type: a `kind` (int or float) between low and high, open ends excluded."""
    if high == float("inf"):
        bounds = f"{'>' if low_open else '>='} {low:g}"
    else:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str):
        value = kind(text)  # a ValueError reads "invalid int value: 'x'"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        inside = (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {bounds}{why}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int = number(int, 1)
positive_float = number(float, 0, low_open=True)


def held_out_images(text: str) -> int:
    """--val_size: a class-balanced hold-out takes the same number of images of each class."""
    value = number(int, 0)(text)
    if value % NUM_CLASSES:
        raise argparse.ArgumentTypeError(f"must be a multiple of the {NUM_CLASSES} classes, "
                                         f"got {text}")
    return value


held_out_images.__name__ = "int"


NO_CACHE = "none"  # --teacher_cache's one spelling of "no cache: the teacher runs online"


def cache_file(text: str) -> str | None:
    """--teacher_cache of distill_student.py: a file, or None for NO_CACHE (as study.py reads it),
    so that no cache file is ever named 'none'."""
    return None if text == NO_CACHE else text


# train_student.py's and distill_student.py's schedule defaults: the CE baseline and every
# distilled run train alike (kd.bench measures at them too)
STUDENT_RECIPE = {"epochs": 120, "batch_size": 256, "lr": 0.2}


def base_parser(description: str, *, out_dir: str, epochs: int, batch_size: int, lr: float
                ) -> argparse.ArgumentParser:
    """Flags every script shares; the keyword arguments are that script's defaults."""
    p = Parser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--out_dir", default=out_dir,
                   help="run folder: config, log, checkpoints, summary")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="training epochs")
    p.add_argument("--batch_size", type=positive_int, default=batch_size,
                   help="global training batch size (split over the processes under torchrun)")
    p.add_argument("--lr", type=positive_float, default=lr,
                   help="peak learning rate (after warmup)")
    p.add_argument("--weight_decay", type=number(float, 0), default=5e-4, help="SGD weight decay")
    p.add_argument("--momentum", type=number(float, 0, 1, high_open=True), default=0.9,
                   help="SGD momentum")
    p.add_argument("--warmup_epochs", type=number(float, 0), default=1.0,
                   help="linear learning-rate warmup before the per-step cosine decay")
    add_data_flags(p)
    p.add_argument("--val_size", type=held_out_images, default=0,
                   help="hold out this many training images (a multiple of 100: class-"
                        "balanced; drawn from --seed) as a "
                        "validation set that picks best.pt; 0: best.pt is picked on the test set")
    add_device_flag(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds weights init, data order, augmentation")
    add_precision_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model, the loss and the KD teacher: fewer kernel "
                        "launches per step, at the cost of compiling first (1-2 min on 2 CPU "
                        "cores)")
    p.add_argument("--sync_bn", action="store_true",
                   help="under torchrun: SyncBatchNorm (batch statistics over the global batch, "
                        "at the cost of a collective and a host sync per BatchNorm layer per "
                        "step); CUDA only")
    p.add_argument("--eval_batch_size", type=positive_int, default=1000,
                   help="batch size for evaluation")
    p.add_argument("--save_every", type=positive_int, default=1,
                   help="write last.pt (the resume point) every N epochs; the final epoch and "
                        "every new best.pt are always written. A ResNet-50 checkpoint with its "
                        "momentum is about 190 MB, and under torchrun the others wait for it")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue the run in --out_dir from last.pt")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the run already in --out_dir (it is deleted first)")
    return p


def add_data_flags(p: argparse.ArgumentParser, *, of_the_run: bool = False) -> None:
    """of_the_run: --data_dir defaults to the folder the checkpoint's run was trained on."""
    p.add_argument("--data_dir", default=None if of_the_run else "./data",
                   help="folder holding cifar-100-python/ (downloaded there when missing); "
                        "its pickles are read, so it must be a folder you trust" +
                        ("; default: the --data_dir the checkpoint's run recorded" * of_the_run))
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR-100 into --data_dir when it is missing there")


def add_precision_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA (autocast to --amp_dtype; the classifier head "
                        "stays float32); ignored on CPU, which runs float32")
    p.add_argument("--amp_dtype", choices=["bf16", "fp16"], default="bf16",
                   help="autocast dtype on CUDA; in training fp16 adds a gradient scaler, and "
                        "SGD then runs unfused (fused SGD mishandles a skipped first step)")


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto picks cuda when available")


def add_student_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar",
                   help="cifar: stem conv and first block at stride 1 (4x4 final map at 32 px); "
                        "imagenet: torchvision's MobileNetV3-Small unchanged (1x1 at 32 px)")

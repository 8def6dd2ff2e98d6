"""Command-line flags, each defined once; the scripts add their own few on top."""
import argparse
import sys

from kd.errors import UserError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), not a usage block."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def base_parser(description: str, *, out_dir: str, epochs: int, batch_size: int, lr: float
                ) -> argparse.ArgumentParser:
    """Flags every script shares; the keyword arguments are that script's defaults."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default=out_dir, help="run folder: config, log, checkpoints, summary")
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    p.add_argument("--batch_size", type=int, default=batch_size, help="training batch size")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (after warmup)")
    p.add_argument("--weight_decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--warmup_epochs", type=float, default=1.0,
                   help="linear learning-rate warmup before the per-step cosine decay")
    p.add_argument("--data_dir", default="./data",
                   help="folder holding cifar-100-python/ (downloaded there when missing); "
                        "its pickles are read, so it must be a folder you trust")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR-100 into --data_dir when it is missing there")
    p.add_argument("--val_size", type=int, default=0,
                   help="hold out this many training images (class-balanced, seeded) as a "
                        "validation set that picks best.pt; 0: best.pt is picked on the test set")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto picks cuda when available")
    p.add_argument("--seed", type=int, default=0, help="seeds weights init, data order, augmentation")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on CUDA (autocast to --amp_dtype); "
                        "ignored on CPU, which trains in float32")
    p.add_argument("--amp_dtype", choices=["bf16", "fp16"], default="bf16",
                   help="autocast dtype on CUDA; fp16 adds a gradient scaler")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (and the KD teacher separately)")
    p.add_argument("--sync_bn", action="store_true",
                   help="under torchrun: SyncBatchNorm (batch statistics over the global batch, "
                        "at the cost of a collective per BatchNorm layer); CUDA only")
    p.add_argument("--eval_batch_size", type=int, default=1000, help="batch size for evaluation")
    p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from last.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out_dir (it is deleted first)")
    return p


def add_student_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar",
                   help="cifar: stem conv and first block at stride 1 (4x4 final map at 32 px); "
                        "imagenet: torchvision's MobileNetV3-Small unchanged (1x1 at 32 px)")


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that cannot train, before anything is loaded or written."""
    checks = [
        (args.epochs > 0, "--epochs must be positive"),
        (args.batch_size > 0, "--batch_size must be positive"),
        (args.eval_batch_size > 0, "--eval_batch_size must be positive"),
        (args.lr > 0, "--lr must be positive"),
        (args.weight_decay >= 0, "--weight_decay must be >= 0"),
        (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
        (args.warmup_epochs >= 0, "--warmup_epochs must be >= 0"),
        (args.val_size >= 0, "--val_size must be >= 0"),
        (not (args.resume and args.overwrite), "--resume and --overwrite exclude each other"),
        (0 <= getattr(args, "alpha", 0) <= 1, "--alpha must be in [0, 1] (it weighs the hard-label CE)"),
        (getattr(args, "T", 1) > 0, "--T must be positive"),
        (getattr(args, "img_size", 32) >= 32, "--img_size must be at least 32"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)

"""Fine-tune an ImageNet-pretrained ResNet-50 on CIFAR-100; 32 px crops are
upsampled to --img_size."""
import argparse

from kd.distributed import local_main_first
from kd.errors import run_script
from kd.flags import base_parser, number
from kd.losses import ce_loss
from kd.models import TEACHER_ARCH, build_teacher
from kd.train import LossFn, fit, prepare_run


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    """The hard-label cross-entropy, every epoch."""
    return ce_loss


def main() -> None:
    p = base_parser(__doc__, out_dir="runs/teacher_resnet50", epochs=40, batch_size=256, lr=0.05)
    p.add_argument("--img_size", type=number(int, 32), default=224,
                   help="the augmented 32 px crop is upsampled (bilinear, on the device) to "
                        "this size")
    p.add_argument("--pretrained", choices=["imagenet", "none"], default="imagenet",
                   help="imagenet: torchvision's IMAGENET1K_V2 weights (downloaded); none: "
                        "random init")
    p.add_argument("--weights", default=None,
                   help="a local torchvision resnet50 ImageNet state dict (.pth), for offline "
                        "machines")
    args = p.parse_args()
    start = prepare_run(args)
    pretrained = "none" if args.resume else args.pretrained  # resume loads its own weights
    with local_main_first(start.world, start.device):  # one ImageNet download per machine
        model = build_teacher(args.img_size, pretrained, None if args.resume else args.weights)
    fit(args, model, start, loss_at, {"arch": TEACHER_ARCH})


if __name__ == "__main__":
    run_script(main)

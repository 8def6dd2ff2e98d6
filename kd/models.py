"""Teacher (torchvision ResNet-50) and student (torchvision MobileNetV3-Small), 100-class heads."""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import ResNet50_Weights, mobilenet_v3_small, resnet50

from kd.checkpoint import load_checkpoint
from kd.errors import UserError

NUM_CLASSES = 100
TEACHER_ARCH = "resnet50"
STUDENT_ARCH = "mobilenet_v3_small"
STEMS = ("cifar", "imagenet")


class Upsampled(nn.Module):
    """Runs `net` on the batch bilinearly resized to img_size x img_size, on the device.

    The teacher was fine-tuned at img_size, so keeping the resize inside the model means a KD run
    feeds it the very same augmented 32 px view as the student, at the size it was trained at.
    """

    def __init__(self, net: nn.Module, img_size: int):
        super().__init__()
        self.net = net
        self.img_size = img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.img_size:
            if torch.is_autocast_enabled(x.device.type):  # interpolate is not on autocast's
                x = x.to(torch.get_autocast_dtype(x.device.type))  # lists: it would write fp32
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False, antialias=False)
        return self.net(x)


class Float32Linear(nn.Linear):
    """A classifier head that computes in float32 under autocast, so the logits that losses and
    metrics see carry no bf16 rounding (steps of 0.125 near 16). Same parameters as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def float32_head(linear: nn.Linear) -> Float32Linear:
    """The same layer, weights and all, as a Float32Linear (drawing no random numbers)."""
    head = nn.utils.skip_init(Float32Linear, linear.in_features, linear.out_features)
    head.load_state_dict(linear.state_dict())
    return head


def plain_heads(model: nn.Module) -> nn.Module:
    """The model with each Float32Linear replaced by an nn.Linear holding the same tensors, for
    export: outside autocast both compute alike, and a plain layer exports as a plain Gemm."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Float32Linear):
            parent, _, child = name.rpartition(".")
            plain = nn.utils.skip_init(nn.Linear, module.in_features, module.out_features)
            plain.weight, plain.bias = module.weight, module.bias
            setattr(model.get_submodule(parent), child, plain)
    return model


def imagenet_state_dict(pretrained: str, weights_path: str | None) -> dict | None:
    """ImageNet ResNet-50 weights: from weights_path if given, torchvision's download if
    pretrained == 'imagenet', else None (random init)."""
    if weights_path:
        try:
            return torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot load --weights {weights_path} as a state dict ({e})")
    if pretrained == "none":
        return None
    try:
        return ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline, proxy, bad cache: all reported the same way
        raise UserError(f"could not fetch torchvision's ImageNet ResNet-50 weights "
                        f"({type(e).__name__}); pass --weights PATH to a local resnet50 state "
                        f"dict, or --pretrained none")


def build_teacher(img_size: int = 224, pretrained: str = "none", weights_path: str | None = None
                  ) -> Upsampled:
    """ResNet-50 (ImageNet stem) with a 100-class head, fed inputs upsampled to img_size."""
    net = resnet50()
    state = imagenet_state_dict(pretrained, weights_path)
    if state is not None:
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise UserError(f"the ImageNet weights do not fit torchvision's resnet50: "
                            f"{str(e)[:200]}")
    net.fc = Float32Linear(net.fc.in_features, NUM_CLASSES)
    return Upsampled(net, img_size)


def build_student(stem: str = "cifar") -> nn.Module:
    """MobileNetV3-Small with a 100-class head, trained from scratch.

    stem='cifar' sets the stem conv and the first block's depthwise conv to stride 1, so a 32 px
    input ends at a 4x4 feature map instead of 1x1; weight shapes are unchanged.
    stem='imagenet' is torchvision's model as it is.
    """
    net = mobilenet_v3_small(num_classes=NUM_CLASSES)
    if stem == "cifar":
        net.features[0][0].stride = (1, 1)
        net.features[1].block[0][0].stride = (1, 1)
    elif stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}")
    net.classifier[-1] = float32_head(net.classifier[-1])
    return net


def model_name(config: dict) -> str | None:
    """The model a run's config describes, e.g. 'resnet50@224px' or
    'mobilenet_v3_small/cifar-stem@32px'; None when it names no model this repo builds."""
    arch = config.get("arch")
    if arch == TEACHER_ARCH and isinstance(config.get("img_size"), int):
        return f"{TEACHER_ARCH}@{config['img_size']}px"
    if arch == STUDENT_ARCH and config.get("stem") in STEMS:
        return f"{STUDENT_ARCH}/{config['stem']}-stem@32px"
    return None


def build_model(config: dict, path: str) -> nn.Module:
    """An untrained model of the architecture the config of checkpoint `path` names."""
    if model_name(config) is None:
        raise UserError(f"{path}: its config names no model this repo builds (arch "
                        f"{config.get('arch')!r}, with img_size for {TEACHER_ARCH} or stem for "
                        f"{STUDENT_ARCH})")
    if config["arch"] == TEACHER_ARCH:
        return build_teacher(img_size=config["img_size"])
    return build_student(config["stem"])


def load_model(path: str, arch: str | None = None) -> tuple[nn.Module, dict]:
    """The model a checkpoint of this repo holds, weights loaded, and the checkpoint.

    arch: refuse a checkpoint of any other architecture. Built inside fork_rng, so that loading
    leaves the global RNG, and so a student's initialisation, exactly as --seed set it.
    """
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    if not isinstance(config, dict):
        raise UserError(f"{path}: its config is not a dictionary")
    if arch is not None and config.get("arch") != arch:
        raise UserError(f"{path} is not a {arch} checkpoint (its config says arch "
                        f"{config.get('arch')!r})")
    with torch.random.fork_rng(devices=[]):
        model = build_model(config, path)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UserError(f"{path} does not fit a {NUM_CLASSES}-class {config['arch']}: {reason}") \
            from None
    return model, ckpt


def load_teacher(path: str) -> Upsampled:
    """The frozen teacher from a train_teacher.py checkpoint, at the --img_size it was trained
    at. `path` is a --teacher_ckpt (distill_student.py's, kd.cache's): a missing one is named so."""
    if not os.path.exists(path):
        raise UserError(f"--teacher_ckpt {path} does not exist (train_teacher.py writes it)")
    teacher, _ = load_model(path, TEACHER_ARCH)
    return teacher.eval().requires_grad_(False)

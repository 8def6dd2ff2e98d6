"""Taps: what lets a feature method (kd/methods/ with a connector) read both models' intermediate
features. Each method's connector, built on these taps, and its loss are in its own module.

Taps are forward hooks on the modules torchvision builds, so neither model's forward is copied
and the student stays a plain MobileNetV3-Small: hooks and connectors are never part of its
state_dict. Stages are where the resolution halves: the teacher's ResNet-50 layer1..layer4 and the
student's last block at each resolution after its stem (features.1, .3, .8, .12 of
MobileNetV3-Small with either stem), then each model's pooled feature (2048-d and 576-d).

Sizes: the teacher runs at its own --img_size, so its stage maps (56/28/14/7 at 224 px, 8/4/2/1
at 32 px) rarely match the student's (32/16/8/4 with the CIFAR stem). Each pair of maps is
matched at the smaller of the two sizes, the larger map adaptive-average-pooled down to it, in
either direction. Channels are matched by the method's own trainable connector.

A connector is called after both forwards of a training step as connector(keys, labels) and
returns what the method's loss compares.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import Bottleneck
from torchvision.ops.misc import Conv2dNormActivation

TEACHER_TAPS = ["net.layer1", "net.layer2", "net.layer3", "net.layer4", "net.avgpool"]
STUDENT_POOLED = "avgpool"
STAGES = 4  # of each model; the pooled feature is the fifth tap


class Taps:
    """The outputs of a model's named submodules in a training step's forward, recorded by
    forward hooks, in the order of `names`; `shapes`: their [C, H, W] at a 32 px input (pooled
    features: [C, 1, 1]). Hooks are no state: the model's state_dict is unchanged.

    Only a training step's forwards are kept, until read: the student's (gradients on) and, for
    taps that follow the student's, the teacher's right after it. Evaluation passes (inference
    mode) keep nothing, so no evaluation batch's maps stay held.
    """

    def __init__(self, model: nn.Module, names: list[str], follows: "Taps | None" = None,
                 preact: bool = False):
        """preact: record each module's output before its final activation (pre_activation)."""
        self.names, self.outputs, self.follows, self.probing = names, {}, follows, True
        modules = dict(model.named_modules())
        for name in names:
            if preact:
                pre_activation(modules[name], self._recorder(name), self._keeping)
            else:
                modules[name].register_forward_hook(self._recorder(name))
        training = model.training
        with torch.no_grad():
            model.eval()
            model(torch.zeros(2, 3, 32, 32, device=next(model.parameters()).device))
        model.train(training)
        self.shapes = [t.shape[1:] for t in self.read()]
        self.probing = False

    def _keeping(self) -> bool:
        """Whether the forward running now is one whose outputs are kept."""
        return self.probing or (bool(self.follows.outputs) if self.follows else
                                torch.is_grad_enabled())

    def _recorder(self, name: str):
        def record(module, inputs, output) -> None:
            if self._keeping():
                self.outputs[name] = output
        return record

    def read(self, which: list[int] | None = None) -> list[torch.Tensor]:
        """The recorded outputs (those at the indices `which`, or all), autograd-usable (a
        teacher's come from inference mode: cloned outside it); the record is emptied."""
        outputs = [self.outputs[self.names[i]] for i in (which or range(len(self.names)))]
        self.outputs = {}
        return [t.clone() if t.is_inference() else t for t in outputs]


def student_stages(student: nn.Module) -> list[str]:
    """The student's stages: its last block at each resolution after the stem."""
    x, sizes = torch.zeros(2, 3, 32, 32, device=next(student.parameters()).device), []
    training = student.training
    with torch.no_grad():
        student.eval()
        for block in student.features:
            x = block(x)
            sizes.append(x.shape[-1])
    student.train(training)
    ends = [i for i in range(1, len(sizes)) if i == len(sizes) - 1 or sizes[i + 1] < sizes[i]]
    return [f"features.{i}" for i in ends]


def student_taps(student: nn.Module) -> Taps:
    """Taps on the student's stages and its pooled feature."""
    return Taps(student, [*student_stages(student), STUDENT_POOLED])


def teacher_taps(teacher: nn.Module, student: Taps) -> Taps:
    """Taps on the teacher's layer1..layer4 and its pooled feature, recording the teacher's
    forward that follows a recorded student forward."""
    return Taps(teacher, TEACHER_TAPS, follows=student)


def pre_activation(module: nn.Module, record, keeping) -> None:
    """Hooks that call record(module, inputs, x) when keeping(), x: the module's output before
    its final activation, for the modules our taps read: a torchvision ResNet Bottleneck without
    downsampling (bn3's output plus the block's input: the residual sum its last ReLU reads), a
    Conv2dNormActivation (its activation's input, its BatchNorm's output: hooked on the
    activation, which --sync_bn's SyncBatchNorm conversion leaves in place, where it replaces
    the BatchNorm and drops its hooks), or a block that ends without an activation
    (MobileNetV3's InvertedResidual: its output). The activations run in place, hence the
    copies."""
    if isinstance(module, Bottleneck) and module.downsample is None:
        normalized = {}
        module.bn3.register_forward_hook(
            lambda m, inputs, output: normalized.update(x=output.clone()) if keeping() else None)
        module.register_forward_hook(lambda m, inputs, output: record(
            m, inputs, normalized.pop("x") + inputs[0]) if "x" in normalized else None)
    elif isinstance(module, Conv2dNormActivation) and len(module) == 3:
        module[2].register_forward_pre_hook(lambda m, inputs: record(
            m, inputs, inputs[0].clone()) if keeping() else None)
    elif isinstance(module, InvertedResidual):
        module.register_forward_hook(record)
    else:
        raise ValueError(f"no pre-activation tap for a {type(module).__name__}")


def stage_taps(student: nn.Module, teacher: nn.Module) -> tuple[Taps, Taps]:
    """Taps on both models' four stages alone (no pooled feature)."""
    stages = Taps(student, student_stages(student))
    return stages, Taps(teacher, TEACHER_TAPS[:STAGES], follows=stages)


def preact_taps(student: nn.Module, teacher: nn.Module) -> tuple[Taps, Taps]:
    """Taps on both models' stages before their final activation (pre_activation): the
    student's stages, the teacher's last Bottleneck of layer1..layer4."""
    student_stage = Taps(student, student_stages(student), preact=True)
    last_blocks = [f"{name}.{len(dict(teacher.named_modules())[name]) - 1}"
                   for name in TEACHER_TAPS[:STAGES]]
    return student_stage, Taps(teacher, last_blocks, follows=student_stage, preact=True)


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """x's maps adaptive-average-pooled down to size x size (unchanged when not larger)."""
    return F.adaptive_avg_pool2d(x, size) if x.shape[-1] > size else x


class PairedTaps(nn.Module):
    """The connector of a method that compares the maps themselves (no parameters): the
    student's and the teacher's taps at the indices `which` (0..STAGES - 1: the stages, STAGES:
    the pooled feature), each pair pooled to the smaller of their sizes when match_sizes.
    Returns (student maps, teacher maps), lists in the order of `which`."""

    def __init__(self, student: Taps, teacher: Taps, which: list[int], match_sizes: bool = True):
        super().__init__()
        self.taps, self.which, self.match_sizes = (student, teacher), which, match_sizes

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student, teacher = (taps.read(self.which) for taps in self.taps)
        if self.match_sizes:
            sizes = [min(s.shape[-1], t.shape[-1]) for s, t in zip(student, teacher)]
            student = [pool_to(s, size) for s, size in zip(student, sizes)]
            teacher = [pool_to(t, size) for t, size in zip(teacher, sizes)]
        return student, teacher


def paired_taps(student: nn.Module, teacher: nn.Module, which: list[int],
                match_sizes: bool = True) -> PairedTaps:
    """PairedTaps on taps of both models (the teacher's following the student's)."""
    taps = student_taps(student)
    return PairedTaps(taps, teacher_taps(teacher, taps), which, match_sizes)

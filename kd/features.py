"""What the feature distillers (FitNet, CRD, ReviewKD) add to training: taps that read both models'
intermediate features, and the trainable connectors that carry the student's features to the
teacher's. The losses they feed are pure functions in kd.losses.

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
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd.data import NUM_VIEWS, hold_out, load_split
from kd.errors import UserError

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

    def __init__(self, model: nn.Module, names: list[str], follows: "Taps | None" = None):
        self.names, self.outputs, self.follows, self.probing = names, {}, follows, True
        modules = dict(model.named_modules())
        for name in names:
            modules[name].register_forward_hook(self._recorder(name))
        training = model.training
        with torch.no_grad():
            model.eval()
            model(torch.zeros(2, 3, 32, 32, device=next(model.parameters()).device))
        model.train(training)
        self.shapes = [t.shape[1:] for t in self.read()]
        self.probing = False

    def _recorder(self, name: str):
        def record(module, inputs, output) -> None:
            if self.probing or (bool(self.follows.outputs) if self.follows else
                                torch.is_grad_enabled()):
                self.outputs[name] = output
        return record

    def read(self, which: list[int] | None = None) -> list[torch.Tensor]:
        """The recorded outputs (those at the indices `which`, or all), autograd-usable (a
        teacher's come from inference mode: cloned outside it); the record is emptied."""
        outputs = [self.outputs[self.names[i]] for i in (which or range(len(self.names)))]
        self.outputs = {}
        return [t.clone() if t.is_inference() else t for t in outputs]


def student_taps(student: nn.Module) -> Taps:
    """Taps on the student's stages (its last block at each resolution after the stem) and its
    pooled feature."""
    x, sizes = torch.zeros(2, 3, 32, 32, device=next(student.parameters()).device), []
    training = student.training
    with torch.no_grad():
        student.eval()
        for block in student.features:
            x = block(x)
            sizes.append(x.shape[-1])
    student.train(training)
    ends = [i for i in range(1, len(sizes)) if i == len(sizes) - 1 or sizes[i + 1] < sizes[i]]
    return Taps(student, [*(f"features.{i}" for i in ends), STUDENT_POOLED])


def teacher_taps(teacher: nn.Module, student: Taps) -> Taps:
    """Taps on the teacher's layer1..layer4 and its pooled feature, recording the teacher's
    forward that follows a recorded student forward."""
    return Taps(teacher, TEACHER_TAPS, follows=student)


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """x's maps adaptive-average-pooled down to size x size (unchanged when not larger)."""
    return F.adaptive_avg_pool2d(x, size) if x.shape[-1] > size else x


class HintRegressor(nn.Module):
    """FitNet's regressor (Romero et al., 2015; mdistiller's ConvReg at equal sizes): the
    student's map at the hint stage, pooled to the teacher's size when larger, through a 1x1
    conv, BatchNorm and ReLU to the teacher's channels. Returns (regressed student map, teacher
    map pooled to the same size)."""

    def __init__(self, student: Taps, teacher: Taps, stage: int):
        super().__init__()
        self.taps, self.index = (student, teacher), stage - 1
        (cs, hs, _), (ct, ht, _) = student.shapes[self.index], teacher.shapes[self.index]
        self.size = min(hs, ht)
        self.conv = nn.Conv2d(cs, ct, kernel_size=1)
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = (taps.read([self.index])[0] for taps in self.taps)
        hint = F.relu(self.bn(self.conv(pool_to(student, self.size))))
        return hint, pool_to(teacher, self.size)


class Embed(nn.Module):
    """CRD's embedding: a linear map of the flattened feature, then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1).float()), dim=1, eps=0.0)


class ContrastMemory(nn.Module):
    """CRD's connector (Tian et al., 2020; RepDistiller's and mdistiller's ContrastMemory with
    'exact' sampling): both pooled features embedded to feat_dim, scored against a memory bank
    of every training image's embeddings, and the bank updated with momentum.

    For each image: its own row (the positive) and nce_k negatives drawn, with replacement, from
    the training images of other classes. Returns (student scores, teacher scores, num_data),
    the scores [B, 1 + nce_k]: exp(<memory row, embedding> / nce_t) / Z, the student's embedding
    against the teacher memory and the teacher's against the student memory, Z fixed at the
    first step as the mean score times num_data, the number of training images. All in float32,
    autocast or not. The memories and Z are buffers: they are saved with the connector in
    last.pt, so a resumed run continues exactly.
    """

    def __init__(self, student: Taps, teacher: Taps, labels: torch.Tensor, feat_dim: int,
                 nce: tuple[int, float, float]):
        """labels: the label of each image of the training file by its position, -1 for the
        images held out (--val_size); nce: (nce_k, nce_t, nce_m)."""
        super().__init__()
        self.taps = (student, teacher)
        self.nce_k, self.nce_t, self.nce_m = nce
        self.embed_s = Embed(student.shapes[-1][0], feat_dim)
        self.embed_t = Embed(teacher.shapes[-1][0], feat_dim)
        trained = labels >= 0
        self.num_data = int(trained.sum())
        counts = torch.bincount(labels[trained], minlength=int(labels.max()) + 1)
        fewest = self.num_data - int(counts.max())  # images of other classes, for the largest
        if self.nce_k > fewest:
            raise UserError(f"--nce_k {self.nce_k}: more negatives than the {fewest} training "
                            f"images of other classes some class has")
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        for name in ("memory_s", "memory_t"):  # rows of held-out images are never read
            self.register_buffer(name, torch.rand(len(labels), feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z", torch.full((2,), -1.0))
        # the training images sorted by class: negatives of class c are drawn outside c's span
        order = torch.argsort(torch.where(trained, labels, labels.max() + 1), stable=True)
        self.register_buffer("by_class", order[:self.num_data], persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)

    def negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, nce_k] file positions of training images of another class than each label."""
        count, start = self.class_count[labels][:, None], self.class_start[labels][:, None]
        draw = torch.rand(len(labels), self.nce_k, device=labels.device)
        r = (draw * (self.num_data - count)).long()  # uniform over the other classes' images
        return self.by_class[r + count * (r >= start)]

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
        with torch.autocast(keys.device.type, enabled=False):
            return self.scores(keys, labels)

    def scores(self, keys: torch.Tensor, labels: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        student, teacher = (taps.read([STAGES])[0] for taps in self.taps)
        v_s, v_t = self.embed_s(student), self.embed_t(teacher)
        index = torch.div(keys, NUM_VIEWS, rounding_mode="floor")  # the image's file position
        rows = torch.cat([index[:, None], self.negatives(labels)], dim=1)
        scores_t = torch.exp(torch.bmm(self.memory_s[rows], v_t[:, :, None])[..., 0] / self.nce_t)
        scores_s = torch.exp(torch.bmm(self.memory_t[rows], v_s[:, :, None])[..., 0] / self.nce_t)
        with torch.no_grad():  # Z once, on the device: no host sync
            first = torch.stack([scores_s.mean(), scores_t.mean()]) * self.num_data
            self.z.copy_(torch.where(self.z < 0, first, self.z))
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                moved = memory[index] * self.nce_m + v * (1 - self.nce_m)
                memory.index_copy_(0, index, F.normalize(moved, dim=1, eps=0.0))
        return scores_s / self.z[0], scores_t / self.z[1], self.num_data


class FusionBlock(nn.Module):
    """ReviewKD's attention-based fusion (ABF; Chen et al., 2021, their code and mdistiller's):
    a 1x1 conv of the student's map to mid channels, fused with the map from the level below
    through two attention weights, resized to the target size, then a 3x3 conv to the teacher's
    channels. Returns (the output map, the fused map handed to the next level)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) \
            if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, below: torch.Tensor | None, out_size: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            below = F.interpolate(below, x.shape[-2:], mode="nearest")
            weights = self.att_conv(torch.cat([x, below], dim=1))
            x = x * weights[:, :1] + below * weights[:, 1:]
        if x.shape[-1] > out_size:
            x = F.adaptive_avg_pool2d(x, out_size)
        elif x.shape[-1] < out_size:
            x = F.interpolate(x, (out_size, out_size), mode="nearest")
        return self.conv2(x), x


class ReviewFusion(nn.Module):
    """ReviewKD's connector: the student's four stages and pooled feature, reviewed from the
    deepest level down (each level fused with the one below), each mapped to the teacher's
    channels at the matched size. Returns (student maps, teacher maps), five of each, in stage
    order, for kd.losses.hcl_loss."""

    def __init__(self, student: Taps, teacher: Taps):
        super().__init__()
        self.taps = (student, teacher)
        sizes = [min(s[1], t[1]) for s, t in zip(student.shapes, teacher.shapes)]
        self.sizes = sizes[::-1]  # deepest first, as the review runs
        mid = min(512, student.shapes[-1][0])
        self.blocks = nn.ModuleList(
            FusionBlock(s[0], mid, t[0], fuse=level > 0)
            for level, (s, t) in enumerate(zip(student.shapes[::-1], teacher.shapes[::-1])))

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        student, teacher = (taps.read() for taps in self.taps)
        outputs, below = [], None
        for block, x, size in zip(self.blocks, student[::-1], self.sizes):
            out, below = block(x, below, size)
            outputs.insert(0, out)
        return outputs, [pool_to(t, s) for t, s in zip(teacher, self.sizes[::-1])]


# What each feature method adds, from distill_student.py's flags, the student and the teacher
# (on its device): taps on both models and the connector between them.
def hint_regressor(args: argparse.Namespace, student: nn.Module, teacher: nn.Module
                   ) -> HintRegressor:
    taps = student_taps(student)
    return HintRegressor(taps, teacher_taps(teacher, taps), args.hint_stage)


def contrast_memory(args: argparse.Namespace, student: nn.Module, teacher: nn.Module
                    ) -> ContrastMemory:
    """CRD's memory for the training images of --data_dir, --val_size held out as fit does."""
    train = load_split(args.data_dir, train=True, download=args.download)
    labels = torch.full((len(train),), -1, dtype=torch.long)
    if args.val_size:
        train, _ = hold_out(train, args.val_size, args.seed)
    labels[train.file_index] = train.labels
    taps = student_taps(student)
    return ContrastMemory(taps, teacher_taps(teacher, taps), labels, args.feat_dim,
                          (args.nce_k, args.nce_t, args.nce_m))


def review_fusion(args: argparse.Namespace, student: nn.Module, teacher: nn.Module
                  ) -> ReviewFusion:
    taps = student_taps(student)
    return ReviewFusion(taps, teacher_taps(teacher, taps))

"""SDD: Wei et al., "Scale Decoupled Distillation", CVPR 2024; follows the authors' SD-DKD,
mdistiller/distillers/SDD_DKD.py (multi_dkd) of shicaiwei123/SDD-CVPR2024, and its CIFAR-100
setting for ResNet-50 -> MobileNetV2 (teacher_vgg.sh: `train_origin.py --cfg
configs/cifar100/sdd_dkd/res50_mv2.yaml --M [1,2,4]`: scales 1, 2, 4; warm-up 20 epochs, the
default of train_origin.py; CE 1, alpha 1, beta 8, T 4 from engine/cfg.py, which that config
keeps; inconsistent regions weighted 2). --sdd_loss kd: SD-KD (distillers/KD.py, sdd_kd_loss).

    L = ce_weight * CE(y, p_s) + w(e) * sdd_weight * (1 / (B N)) sum_i sum_n c_in D(z_s^in, z_t^in)
    w(e) = min(e / dkd_warmup, 1)
    z^in = h(P_s(F)_n)    region n of image i: a cell of P_s(F), over every scale s in --sdd_scales
    D = dkd_alpha * TCKD + dkd_beta * NCKD of the region (DKD's, kd.methods.dkd), or T^2 KL (kd)
    c_in = sdd_inconsistent_weight if [argmax z_t^in = y_i] != [argmax z_t^i = y_i], else 1

F: a model's last feature map before its pooling (the student's features.12, 576 x 4 x 4 with the
CIFAR stem at 32 px; the teacher's layer4, 2048 x 1 x 1 at a 32 px --img_size, 7 x 7 at 224 px);
P_s: adaptive average pooling to s x s; h: the model's own classifier (the student's
Linear-Hardswish-Dropout-Linear head in train mode, gradients and all; the teacher's fc, frozen,
without grad). N = sum of s^2 (21 for 1,2,4). c: a region is consistent when the teacher's
prediction from it is right or wrong as its global prediction z_t^i (its own logits) is, and
weighted 1; an inconsistent ("complementary") one is weighted sdd_inconsistent_weight. The mean
over B N regions is the reference's: each region's loss over the N B rows, then summed.

A scale larger than a map: adaptive pooling repeats it (each output cell averages the input cells
its window overlaps), so a 1 x 1 map pooled to 2 x 2 or 4 x 4 gives copies of the global feature.
At a 32 px teacher every teacher region is then its global logits, all weights are 1, and SDD
distils each of the student's 21 region logits to the teacher's global prediction; the student's
ImageNet stem (a 1 x 1 map at 32 px) likewise makes all its regions its global feature.

Where ours differs from the reference code: each scale is pooled from F itself, where the
reference pools F to 4 x 4 first and the 2 x 2 and 1 x 1 cells from that (the same whenever F's
size and 4 divide one another: all its CIFAR models' 4 x 4 and 2 x 2 maps, and ours at 32 px; at
7 x 7 its overlapping windows make the 1 x 1 cell differ from the pooled feature); the global
prediction is the teacher's logits (the reference takes its 1 x 1 region, the same logits on its
models, and forces that region's weight to 1, which equal logits give here); any scales, not only
its [1], [1,2], [1,2,4] (its [1] is plain DKD on the logits: here the scale-1 region, the
student's pooled feature through its head once more, with a dropout mask of its own: the
reference's MobileNetV2 head has no dropout, ours drops 0.2 of the regions' hidden units as of
the logits'); its zeroing of a NaN or infinite loss (and SD-KD's of NaN KL entries) is
not copied: a NaN shows, as a blow-up. DKD's binary distributions are kept as log-probabilities
as in kd.methods.dkd (the reference takes the log of their probabilities). Terms: 'ce', 'sdd'
(the weighted region mean, before w(e) and sdd_weight), 'inconsistent' (the share of regions
weighted sdd_inconsistent_weight; no gradient).
"""
import argparse
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd import features
from kd.data import Split
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, warmed_up, weight
from kd.methods.dkd import dkd_distributions

LOSSES = ("dkd", "kd")


def region_dkd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
               alpha: float, beta: float, T: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD of each row ([R, K] logits, [R] targets): kd.methods.dkd's
    dkd_loss without its batch mean."""
    (binary_s, others_s), (binary_t, others_t) = (dkd_distributions(z, targets, T)
                                                  for z in (student_logits, teacher_logits))
    kl = lambda s, t: F.kl_div(s, t, reduction="none", log_target=True).sum(dim=1) * T * T
    return alpha * kl(binary_s, binary_t) + beta * kl(others_s, others_t)


def region_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float
              ) -> torch.Tensor:
    """T^2 KL(softmax(z_t / T) || softmax(z_s / T)) of each row."""
    return F.kl_div(F.log_softmax(student_logits / T, dim=1),
                    F.log_softmax(teacher_logits / T, dim=1), reduction="none",
                    log_target=True).sum(dim=1) * T * T


def sdd_loss(student_regions: torch.Tensor, teacher_regions: torch.Tensor,
             teacher_logits: torch.Tensor, targets: torch.Tensor, loss: str, alpha: float,
             beta: float, T: float, inconsistent_weight: float
             ) -> tuple[torch.Tensor, LossTerms]:
    """The weighted region mean (1 / (B N)) sum c_in D: region logits [B, K, N] of both models,
    the teacher's global logits [B, K]. Terms: 'inconsistent'."""
    s, t, g = wide(student_regions, teacher_regions, teacher_logits)
    b, k, n = s.shape
    rows = lambda z: z.transpose(1, 2).reshape(b * n, k)  # image-major: row i * N + n
    if loss == "dkd":
        per_region = region_dkd(rows(s), rows(t), targets[:, None].expand(b, n).reshape(-1),
                                alpha, beta, T)
    else:
        per_region = region_kd(rows(s), rows(t), T)
    local_right = t.argmax(dim=1) == targets[:, None]  # [B, N]
    global_right = g.argmax(dim=1) == targets
    inconsistent = (local_right != global_right[:, None]).to(s.dtype)
    c = 1.0 + (inconsistent_weight - 1.0) * inconsistent
    return (c * per_region.view(b, n)).mean(), {"inconsistent": inconsistent.mean()}


def sdd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, features: tuple, loss: str, alpha: float, beta: float,
                  T: float, inconsistent_weight: float, ce_weight: float, sdd_weight: float,
                  distill_weight: torch.Tensor | float) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student region logits, teacher region logits);
    distill_weight is the warm-up, a tensor so that a new value each epoch does not recompile a
    compiled loss."""
    ce = hard_label_ce(student_logits, targets)
    sdd, terms = sdd_loss(*features, teacher_logits, targets, loss, alpha, beta, T,
                          inconsistent_weight)
    return ce_weight * ce + distill_weight * sdd_weight * sdd, {"ce": ce, "sdd": sdd, **terms}


def pooled_regions(feature_map: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
    """[B, C, N]: the map adaptive-average-pooled to s x s for each scale, the cells flattened
    row-major, scale after scale (a scale larger than the map repeats its cells)."""
    return torch.cat([F.adaptive_avg_pool2d(feature_map, s).flatten(2) for s in scales], dim=2)


def region_logits(feature_map: torch.Tensor, head: nn.Module, scales: tuple[int, ...]
                  ) -> torch.Tensor:
    """[B, K, N]: every region of the map through the classifier head, in one batch."""
    regions = pooled_regions(feature_map, scales)
    b, c, n = regions.shape
    return head(regions.transpose(1, 2).reshape(b * n, c)).view(b, n, -1).transpose(1, 2)


class ScaleRegions(nn.Module):
    """SDD's connector (no parameters): both models' last maps (stage 4 of kd.features' taps),
    pooled to the regions of every scale and put through each model's own classifier. Returns
    (student region logits, teacher region logits), [B, K, N] each; the student's carry
    gradients into its classifier and features, the teacher's are computed without grad.

    The heads are held in a tuple, not registered: they are the models' own modules, trained (the
    student's) and saved with their models, never in this connector's state_dict or parameters.
    """

    def __init__(self, student: features.Taps, teacher: features.Taps,
                 heads: tuple[nn.Module, nn.Module], scales: tuple[int, ...]):
        super().__init__()
        self.taps, self.heads, self.scales = (student, teacher), tuple(heads), scales

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        student, teacher = (taps.read([features.STAGES - 1])[0] for taps in self.taps)
        student_head, teacher_head = self.heads
        with torch.no_grad():
            teacher_regions = region_logits(teacher, teacher_head, self.scales)
        return region_logits(student, student_head, self.scales), teacher_regions


def heads(student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The classifiers that read each model's pooled last map: MobileNetV3-Small's `classifier`,
    the teacher's (kd.models.Upsampled) ResNet-50 `net.fc`."""
    return student.classifier, teacher.net.fc


def scales_of(text: str) -> tuple[int, ...]:
    """--sdd_scales as integers."""
    return tuple(int(s) for s in text.split(","))


def scale_list(text: str) -> str:
    """--sdd_scales: distinct positive integers, comma-separated; kept as a string (so the
    config and the study compare it as given), in ascending order."""
    try:
        values = [int(s) for s in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"must be distinct positive integers, comma-separated "
                                         f"(e.g. 1,2,4), got {text!r}")
    return ",".join(map(str, sorted(values)))


scale_list.__name__ = "str"


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> ScaleRegions:
    taps = features.student_taps(student)
    return ScaleRegions(taps, features.teacher_taps(teacher, taps), heads(student, teacher),
                        scales_of(args.sdd_scales))


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sdd_scales", type=scale_list, default="1,2,4",
                   help="sdd: the scales s, comma-separated: each model's last map adaptive-"
                        "average-pooled to s x s, every cell a region through the model's "
                        "classifier (1: the global feature; the reference's CIFAR-100 [1,2,4])")
    p.add_argument("--sdd_loss", choices=LOSSES, default="dkd",
                   help="sdd: the loss of each region: dkd (SD-DKD, --dkd_alpha TCKD + "
                        "--dkd_beta NCKD) or kd (SD-KD, T^2 KL; the reference's SD-KD: "
                        "--ce_weight 0.1 --sdd_weight 0.9 --dkd_warmup 0)")
    p.add_argument("--sdd_weight", type=weight, default=1.0,
                   help="sdd: weight of the region loss (after the --dkd_warmup warm-up)")
    p.add_argument("--sdd_inconsistent_weight", type=weight, default=2.0,
                   help="sdd: weight of a region whose teacher prediction is right where the "
                        "teacher's global prediction is wrong, or wrong where it is right "
                        "(consistent regions: 1)")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(sdd_objective, loss=args.sdd_loss, alpha=args.dkd_alpha,
                             beta=args.dkd_beta, T=args.T,
                             inconsistent_weight=args.sdd_inconsistent_weight,
                             ce_weight=args.ce_weight, sdd_weight=args.sdd_weight,
                             distill_weight=torch.tensor(warmed_up(epoch, args.dkd_warmup)))


METHOD = Method(("T", "ce_weight", "dkd_alpha", "dkd_beta", "dkd_warmup", "sdd_scales",
                 "sdd_loss", "sdd_weight", "sdd_inconsistent_weight"),
                add_flags, loss_at, connector)

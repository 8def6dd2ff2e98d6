"""CRD: Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR 2020; follows
RepDistiller's crd/criterion.py and crd/memory.py with 'exact' sampling (CE 1, weight 0.8, 128-d
embeddings, 16384 negatives, temperature 0.07, momentum 0.5).

    L = ce_weight * CE(y, p_s) + crd_weight * (contrast_loss(student scores)
                                                 + contrast_loss(teacher scores))

the scores of each model's embedding against the other model's memory bank (ContrastMemory),
num_data training images in the noise distribution. Terms: 'ce', 'crd'.
"""
import argparse
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd import features
from kd.data import NUM_VIEWS, Split, derive_seed
from kd.distributed import average_across_ranks, gather_batch, rank_and_size
from kd.errors import UserError
from kd.flags import number, positive_float, positive_int
from kd.losses import LossFn, LossTerms, wide
from kd.methods.common import Method, hard_label_ce, weight

# derive_seed's rank argument for the negatives' stream: above any process count, so the
# stream is no process's own (dropout's)
NEGATIVES_STREAM = 65_536


def contrast_loss(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss of one side (RepDistiller's ContrastLoss): scores [B, 1 + K], the
    positive first, each P = exp(<m, v> / tau) / Z; noise mass m * Pn with Pn = 1 / num_data:

        L = -(1 / B) * sum_i [log(P_i0 / (P_i0 + K Pn + eps))
                               + sum_k log(K Pn / (P_ik + K Pn + eps))]
    """
    s = wide(scores)[0]
    noise = (s.shape[1] - 1) / num_data
    positive = torch.log(s[:, 0] / (s[:, 0] + noise + eps))
    negative = torch.log(noise / (s[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / s.shape[0]


def crd_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor, num_data: int
             ) -> torch.Tensor:
    """The contrastive loss of both sides."""
    return contrast_loss(student_scores, num_data) + contrast_loss(teacher_scores, num_data)


def crd_objective(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  targets: torch.Tensor, features: tuple, ce_weight: float, crd_weight: float
                  ) -> tuple[torch.Tensor, LossTerms]:
    """The module's L, on the connector's (student scores, teacher scores, num_data)."""
    ce = hard_label_ce(student_logits, targets)
    crd = crd_loss(*features)
    return ce_weight * ce + crd_weight * crd, {"ce": ce, "crd": crd}


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
    autocast or not. The memories and Z are buffers, and the number of steps taken is the
    connector's extra state: all are saved with it in last.pt, so a resumed run continues
    exactly.

    Under torchrun every rank holds the same memories and Z, as DDP keeps the embeddings equal:
    each step updates the memories with the embeddings of the whole global batch (gathered from
    all ranks), Z is the global batch's mean score (averaged over the ranks), and the negatives
    of the global batch are drawn from --seed and the step alone, each rank taking its own rows
    (not from torch's RNG, which kd.train.fit seeds per rank). A run's negatives are thereby the
    same on any number of processes.
    """

    def __init__(self, student: features.Taps, teacher: features.Taps, labels: torch.Tensor,
                 feat_dim: int, nce: tuple[int, float, float], seed: int):
        """labels: the label of each image of the training file by its position, -1 for the
        images held out (--val_size); nce: (nce_k, nce_t, nce_m); seed: --seed, of the
        negatives."""
        super().__init__()
        self.taps, self.seed, self.steps = (student, teacher), seed, 0
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

    def get_extra_state(self) -> torch.Tensor:
        """The steps taken (the next negatives' draw), saved with the connector."""
        return torch.tensor(self.steps)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.steps = int(state)

    def negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, nce_k] file positions of training images of another class than each label: the
        rank's rows of the global batch's draw, from --seed and the step."""
        rank, size = rank_and_size()
        generator = torch.Generator(device=labels.device)
        generator.manual_seed(derive_seed(self.seed, self.steps, NEGATIVES_STREAM))
        draw = torch.rand(len(labels) * size, self.nce_k, generator=generator,
                          device=labels.device)[rank * len(labels):(rank + 1) * len(labels)]
        count, start = self.class_count[labels][:, None], self.class_start[labels][:, None]
        r = (draw * (self.num_data - count)).long()  # uniform over the other classes' images
        return self.by_class[r + count * (r >= start)]

    def forward(self, keys: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
        with torch.autocast(keys.device.type, enabled=False):
            return self.scores(keys, labels)

    def scores(self, keys: torch.Tensor, labels: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
        student, teacher = (taps.read([features.STAGES])[0] for taps in self.taps)
        v_s, v_t = self.embed_s(student), self.embed_t(teacher)
        index = torch.div(keys, NUM_VIEWS, rounding_mode="floor")  # the image's file position
        rows = torch.cat([index[:, None], self.negatives(labels)], dim=1)
        scores_t = torch.exp(torch.bmm(self.memory_s[rows], v_t[:, :, None])[..., 0] / self.nce_t)
        scores_s = torch.exp(torch.bmm(self.memory_t[rows], v_s[:, :, None])[..., 0] / self.nce_t)
        with torch.no_grad():
            if self.steps == 0:  # Z once, the global batch's: every rank's shard is as large
                first = torch.stack([scores_s.mean(), scores_t.mean()]) * self.num_data
                self.z.copy_(average_across_ranks(first))
            index = gather_batch(index)
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                v = gather_batch(v.detach())
                moved = memory[index] * self.nce_m + v * (1 - self.nce_m)
                memory.index_copy_(0, index, F.normalize(moved, dim=1, eps=0.0))
        self.steps += 1
        return scores_s / self.z[0], scores_t / self.z[1], self.num_data


def connector(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
              train: Split) -> ContrastMemory:
    taps = features.student_taps(student)
    return ContrastMemory(taps, features.teacher_taps(teacher, taps), train.labels, args.feat_dim,
                          (args.nce_k, args.nce_t, args.nce_m), args.seed)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--crd_weight", type=weight, default=0.8,
                   help="crd: weight of the contrastive loss")
    p.add_argument("--nce_k", type=positive_int, default=16384,
                   help="crd: negatives per image, drawn from the training images of other "
                        "classes")
    p.add_argument("--nce_t", type=positive_float, default=0.07,
                   help="crd: temperature of the scores")
    p.add_argument("--nce_m", type=number(float, 0, 1, high_open=True), default=0.5,
                   help="crd: momentum of the memory bank's update")


def loss_at(args: argparse.Namespace, epoch: int) -> LossFn:
    return functools.partial(crd_objective, ce_weight=args.ce_weight, crd_weight=args.crd_weight)


METHOD = Method(("ce_weight", "crd_weight", "feat_dim", "nce_k", "nce_t", "nce_m"), add_flags,
                loss_at, connector)

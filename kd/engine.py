"""One training epoch and one evaluation pass, with no host-device synchronisation per step.

Losses and accuracies are summed on the device and read once per epoch (and every
`refresh_every` steps for the progress bar), so the GPU never waits for Python.
"""
import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from kd.distributed import average_across_ranks, max_across_ranks
from kd.errors import UserError
from kd.losses import kd_loss_terms
from kd.models import NUM_CLASSES


class Objective:
    """What a training step minimises: CE on the labels, or the KD loss against a frozen teacher.

    With compile=True the student forward and loss are compiled as one graph and the teacher as
    another (it runs under inference_mode, outside the student's autograd graph).
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None = None, alpha: float = 1.0,
                 T: float = 1.0, compile: bool = False):
        self.model, self.teacher, self.alpha, self.T = model, teacher, alpha, T
        self.term_names = [] if teacher is None else ["ce", "kd"]
        self.student_loss = torch.compile(self._student_loss) if compile else self._student_loss
        self.teacher_forward = torch.compile(teacher) if compile and teacher is not None else teacher

    def _student_loss(self, images, labels, teacher_logits):
        logits = self.model(images)
        if teacher_logits is None:
            return F.cross_entropy(logits.float(), labels), logits, []
        ce, kd = kd_loss_terms(logits, teacher_logits, labels, self.T)
        return self.alpha * ce + (1 - self.alpha) * kd, logits, [ce, kd]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        teacher_logits = None
        if self.teacher is not None:
            with torch.inference_mode():
                teacher_logits = self.teacher_forward(images)
            teacher_logits = teacher_logits.clone()  # a normal tensor, usable by autograd
        return self.student_loss(images, labels, teacher_logits)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear from 1/warmup_steps to 1 over the warmup, then cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                   device: torch.device) -> torch.optim.SGD:
    """SGD with momentum: the fused kernel on CUDA, the foreach one elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           fused=fused, foreach=None if fused else True)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps))


class StopRequested(Exception):
    """Raised inside the epoch when SIGINT/SIGTERM asked the run to stop."""


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the epoch's updates are not saved."""


def train_step(objective: Objective, optimizer, scheduler, scaler, autocast,
               images: torch.Tensor, labels: torch.Tensor):
    """One optimisation step; returns (loss, logits, extra loss terms), all still on the device."""
    with autocast():
        loss, logits, terms = objective(images, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss, logits, terms


def train_epoch(objective: Objective, loader, optimizer, scheduler, scaler, autocast,
                epoch: int, should_stop: Callable[[], bool] = lambda: False,
                show_progress: bool = True, refresh_every: int = 25) -> dict:
    """Train for one epoch; return the last step's lr, mean loss, top-1 (%), extra loss terms,
    time and images/s."""
    objective.model.train()
    device = loader.device
    sums = torch.zeros(2 + len(objective.term_names), device=device)
    first_bad_step = torch.tensor(-1, device=device)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not show_progress)
    start = time.perf_counter()
    for step, (images, labels, _) in enumerate(bar):
        if should_stop():
            raise StopRequested
        lr = optimizer.param_groups[0]["lr"]
        loss, logits, terms = train_step(objective, optimizer, scheduler, scaler, autocast,
                                         images, labels)
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).float().mean()
            sums += torch.stack([loss.detach(), correct, *[t.detach() for t in terms]])
            bad_now = ~torch.isfinite(loss.detach()) & (first_bad_step < 0)
            first_bad_step = torch.where(bad_now, step, first_bad_step)
        if step % refresh_every == refresh_every - 1:
            _check_finite(first_bad_step, epoch)
            seen = (step + 1) * len(labels)
            bar.set_postfix(loss=f"{sums[0].item() / (step + 1):.3f}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")
    _check_finite(first_bad_step, epoch)
    means = [s / len(loader) for s in average_across_ranks(sums).tolist()]  # the one sync
    elapsed = time.perf_counter() - start
    bar.close()
    stats = {"lr": lr, "train_loss": means[0], "train_top1": 100 * means[1],
             "epoch_time_s": elapsed,
             "train_img_per_s": len(loader) * loader.global_batch_size / elapsed}
    stats.update({f"train_{name}": v for name, v in zip(objective.term_names, means[2:])})
    return stats


def _check_finite(first_bad_step: torch.Tensor, epoch: int) -> None:
    bad = int(max_across_ranks(first_bad_step).item())  # all ranks stop together
    if bad >= 0:
        raise NonFiniteLoss(f"loss became NaN or infinite at epoch {epoch}, step {bad + 1}")


@torch.inference_mode()
def predict(model: nn.Module, loader, autocast) -> torch.Tensor:
    """float32 logits [N, classes], on the device, for every image of the loader's split in order.

    The last, smaller batch is zero-padded to the full batch size so that a compiled model
    sees one static shape; the padded rows are dropped.
    """
    model.eval()
    chunks = []
    for images, labels, _ in loader:
        with autocast():
            chunks.append(model(pad_batch(images, loader.batch_size))[:len(labels)].float())
    return torch.cat(chunks) if chunks else torch.zeros(0, NUM_CLASSES, device=loader.device)


def pad_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    if len(images) == size:
        return images
    padding = images.new_zeros((size - len(images), *images.shape[1:]))
    return torch.cat([images, padding]).contiguous(memory_format=torch.channels_last)

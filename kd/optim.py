"""The optimizer every script trains with, and what travels with it (Optimization): SGD with
momentum, the per-step warm-up and cosine schedule, the fp16 gradient scaler, the autocast."""
import argparse
import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from kd.inference import make_autocast


@dataclass
class Optimization:
    """What turns a loss into an update, travelling together: SGD, its per-step learning-rate
    schedule, the gradient scaler (active only with fp16 autocast) and the autocast context."""

    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run was saved without fp16 scaling
            self.scaler.load_state_dict(state["scaler"])


def make_optimization(args: argparse.Namespace, model: nn.Module, steps_per_epoch: int,
                      device: torch.device) -> Optimization:
    """SGD with momentum, linear warmup then cosine decay to 0 stepped every iteration, autocast
    and loss scaling as --amp and --amp_dtype say.

    The fused SGD kernel runs on CUDA only without the fp16 gradient scaler: when the scaler skips
    the first step (an overflow at its initial scale), fused SGD leaves its momentum buffers
    uninitialised (empty_like) and the next step reads that memory as momentum.
    """
    fp16 = device.type == "cuda" and args.amp and args.amp_dtype == "fp16"
    fused = device.type == "cuda" and not fp16
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, fused=fused,
                                foreach=None if fused else True)
    warmup, total = round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total))
    return Optimization(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=fp16),
                        make_autocast(device, amp=args.amp, amp_dtype=args.amp_dtype))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear from 1/warmup_steps to 1 over the warmup, then cosine down to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

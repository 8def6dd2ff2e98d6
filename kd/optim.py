"""The optimizer every script trains with, and what travels with it (Optimization): SGD with
momentum, the per-step warm-up and cosine schedule, the fp16 gradient scaler, the autocast; and
distill_student.py's alternative to SGD, DOT (--optimizer dot).

DOT, the Distillation-Oriented Trainer (Zhao et al., ICCV 2023), as mdistiller's engine/dot.py
(DistillationOrientedTrainer) and engine/trainer.py (the DOT trainer) run it: SGD with two
momentum buffers, one for the gradient of the task loss (the weighted hard-label CE), at momentum
m - delta, one for the gradient of the distillation loss, at m + delta (delta 0.075: its
engine/cfg.py), so the distillation gradient is averaged over more steps than the task's. Two
backward passes per step: the distillation loss's (keeping the graph), then the task loss's.
"""
import argparse
import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from kd.errors import UserError
from kd.flags import number
from kd.inference import make_autocast

DOT_DELTA = 0.075  # mdistiller's CFG.SOLVER.DOT.DELTA, which its CIFAR-100 DOT configs keep
# add_optimizer_flags' defaults: what every distilled run made before the flags had in effect
OPTIMIZER_DEFAULTS = {"optimizer": "sgd", "dot_delta": DOT_DELTA}


@dataclass
class Optimization:
    """What turns a loss into an update, travelling together: SGD (or DOT), its per-step
    learning-rate schedule, the gradient scaler (active only with fp16 autocast) and the autocast
    context."""

    optimizer: "torch.optim.SGD | DOT"
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
                      device: torch.device, *, dot_delta: float | None = None) -> Optimization:
    """SGD with momentum (or, given dot_delta, DOT with it: --optimizer dot), linear warmup then
    cosine decay to 0 stepped every iteration, autocast and loss scaling as --amp and --amp_dtype
    say.

    The fused SGD kernel runs on CUDA only without the fp16 gradient scaler: when the scaler skips
    the first step (an overflow at its initial scale), fused SGD leaves its momentum buffers
    uninitialised (empty_like) and the next step reads that memory as momentum. DOT refuses the
    scaler: it would have to unscale, and check for overflow, the distillation gradient DOT keeps
    apart from the parameters' .grad, which GradScaler never sees.
    """
    fp16 = device.type == "cuda" and args.amp and args.amp_dtype == "fp16"
    fused = device.type == "cuda" and not fp16
    if dot_delta is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay, fused=fused,
                                    foreach=None if fused else True)
    elif fp16:
        raise UserError("--optimizer dot cannot train with --amp_dtype fp16: the gradient scaler "
                        "would see only one of its two gradients; use --amp_dtype bf16 (the "
                        "default) or --no-amp")
    else:
        optimizer = DOT(model.parameters(), lr=args.lr, momentum=args.momentum, delta=dot_delta,
                        weight_decay=args.weight_decay)
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


def add_optimizer_flags(p: argparse.ArgumentParser) -> None:
    """distill_student.py's choice of optimizer (the other scripts train with SGD)."""
    p.add_argument("--optimizer", choices=["sgd", "dot"], default=OPTIMIZER_DEFAULTS["optimizer"],
                   help="sgd: SGD with --momentum; dot: DOT (kd.optim.DOT), momentum --momentum "
                        "- --dot_delta for the hard-label CE's gradient and + --dot_delta for "
                        "the distillation's, two backward passes a step (with --compile the loss "
                        "stays eager; one process only, bf16 or float32)")
    p.add_argument("--dot_delta", type=number(float, 0), default=OPTIMIZER_DEFAULTS["dot_delta"],
                   help="dot: the momentum gap (mdistiller's CIFAR-100 setting)")


def split_loss(loss: torch.Tensor, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(task, distillation): the task loss, the hard-label CE's share w * ce of L, and the rest,
    L - w * ce, for a loss L linear in its unweighted CE term ce (every method's L is
    ce_weight * ce + distillation terms; kd's is alpha * ce + ...).

    w = dL/d(ce), read off L's graph (a short backward from L to ce): it is the CE's weight
    exactly because L is linear in ce, and so no method has to say what its weight is (ce_weight,
    kd's alpha, a warm-up...). The distillation part's gradient through ce is then w - w = 0
    exactly, so the two backward passes sum to L's gradient. Its graph still reaches every
    parameter upstream of the CE, with a zero gradient where no distillation term reaches (a
    feature method's layers after its taps, and the classifier): DOT steps those as parameters
    with both gradients (task momentum m - delta), where mdistiller, whose two losses are separate
    graphs, gives them m. A compiled loss is one autograd node, in which L does not pass through
    ce: kd.train.fit leaves the loss eager under DOT (the models stay compiled).
    """
    weight, = torch.autograd.grad(loss, ce, retain_graph=True)
    task = weight * ce
    return task, loss - task


class DOT(torch.optim.Optimizer):
    """DOT (the module's docstring), mdistiller's update rule, with its second momentum in the
    state (state_dict, so last.pt holds it and --resume continues exactly).

    backward(loss, terms) runs the two backward passes and keeps the distillation gradient g_kd
    apart; step() then reads the task gradient g_task from .grad. For each parameter p, with
    momentum m and delta d:

        both gradients:          b_task = (m - d) b_task + g_task + wd p    p -= lr b_task
                                 b_kd   = (m + d) b_kd   + g_kd             p -= lr b_kd
        only g_task (or g_kd):   b = m' b + g + wd p                        p -= lr b

    with m' = ((m - d) + (m + d)) / 2 (= m, computed as the reference does) and a buffer's first
    value its first gradient (torch SGD's rule). Weight decay goes with the task gradient, or with
    the distillation gradient of a parameter that has no task gradient (a connector's, CTKD's
    temperature); as mdistiller's code, such a parameter's first step has none. mdistiller
    subtracts lr b_task from every parameter before it subtracts lr b_kd; so does this (with
    torch._foreach ops, a few kernels a step).
    """

    def __init__(self, params, lr: float, momentum: float, delta: float, weight_decay: float = 0):
        if not 0 <= momentum - delta <= momentum + delta < 1:
            raise ValueError(f"momentum {momentum} -/+ delta {delta} must lie in [0, 1)")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta,
                                      weight_decay=weight_decay))
        self.distillation_grads: dict[torch.Tensor, torch.Tensor] = {}  # within a step only

    def backward(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """The step's two backward passes, as mdistiller's DOT trainer runs them: the
        distillation loss's (retain_graph), whose gradients are taken off .grad (its step_kd),
        then the task loss's (split_loss on terms['ce'], the unweighted hard-label CE)."""
        if "ce" not in terms:
            raise UserError("--optimizer dot splits the loss at its hard-label CE term 'ce', "
                            "which this --method's loss does not return; use --optimizer sgd")
        task, distillation = split_loss(loss, terms["ce"])
        distillation.backward(retain_graph=True)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.distillation_grads[p], p.grad = p.grad, None
        task.backward()

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "DOT takes its gradients from backward(), not a closure"
        kd = self.distillation_grads
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            m_task, m_kd = group["momentum"] - group["delta"], group["momentum"] + group["delta"]
            m_one = (m_task + m_kd) / 2  # a parameter with one kind of gradient
            task = [p for p in group["params"] if p.grad is not None]
            task_grads = torch._foreach_add([p.grad for p in task], task, alpha=wd) if task else []
            for with_kd, m in ((True, m_task), (False, m_one)):  # every task update first
                update(self.state, TASK, [(p, g) for p, g in zip(task, task_grads)
                                          if (p in kd) == with_kd], m, lr)
            update(self.state, DISTILLATION, [(p, kd[p]) for p in task if p in kd], m_kd, lr)
            only_kd = [p for p in group["params"] if p in kd and p.grad is None]
            update(self.state, DISTILLATION, [
                (p, kd[p].add(p, alpha=wd) if DISTILLATION in self.state[p] else kd[p])
                for p in only_kd], m_one, lr)
        self.distillation_grads = {}


TASK, DISTILLATION = "momentum_buffer", "distillation_momentum_buffer"  # DOT's state keys


def update(state: dict, key: str, steps: list[tuple[torch.Tensor, torch.Tensor]],
           momentum: float, lr: float) -> None:
    """One momentum step of each (parameter p, gradient g) on its buffer b = state[p][key]:
    b = momentum * b + g (a new buffer: a copy of g), then p -= lr * b."""
    if not steps:
        return
    old = [(state[p][key], g) for p, g in steps if key in state[p]]
    for p, g in steps:
        if key not in state[p]:
            state[p][key] = torch.clone(g).detach()
    if old:
        buffers, grads = map(list, zip(*old))
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
    torch._foreach_add_([p for p, _ in steps], [state[p][key] for p, _ in steps], alpha=-lr)

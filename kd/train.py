"""The training run shared by the three scripts: run folder, data, loop, checkpoints, log, summary."""
import argparse
import contextlib
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torchvision

from kd.checkpoint import copy_file, load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_json
from kd.data import DeviceLoader, load_split
from kd.engine import Objective, evaluate, make_optimizer, make_scheduler, train_epoch
from kd.errors import UserError
from kd.flags import check_args
from kd.logger import CSVLogger
from kd.signals import stop_requested

RUN_FILES = ("config.json", "log.csv", "last.pt", "best.pt", "summary.json")
# Flags that may differ when resuming: where and how the run executes, not what it computes.
RESUMABLE_CHANGES = {"epochs", "resume", "overwrite", "out_dir", "data_dir", "no_download",
                     "device", "compile", "eval_batch_size", "teacher_ckpt"}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prepare_out_dir(args: argparse.Namespace) -> None:
    """Refuse to touch an existing run unless --resume or --overwrite says what to do with it."""
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(args.out_dir, f))]
    if args.resume:
        if not os.path.exists(os.path.join(args.out_dir, "last.pt")):
            hint = "--overwrite to start it again" if existing else "no --resume to start it"
            raise UserError(f"--resume: no last.pt in {args.out_dir} (no epoch finished); "
                            f"run with {hint}")
        remove_stale_temp_files(args.out_dir)
    elif existing and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds a run ({', '.join(existing)}); "
                        f"pass --resume to continue it, --overwrite to replace it, or another --out_dir")
    elif existing:
        for f in existing:
            os.remove(os.path.join(args.out_dir, f))
    os.makedirs(args.out_dir, exist_ok=True)


def prepare_run(args: argparse.Namespace) -> torch.device:
    """Check the flags, pick the device, claim the run folder and seed the global RNG."""
    check_args(args)
    device = resolve_device(args.device)
    prepare_out_dir(args)
    torch.manual_seed(args.seed)
    return device


def remove_stale_temp_files(folder: str) -> None:
    """Delete what a write killed half-way left behind (kd.checkpoint.atomic_write's temp files)."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))


def make_autocast(args: argparse.Namespace, device: torch.device):
    """A factory of autocast contexts: bf16/fp16 on CUDA with --amp, a no-op otherwise."""
    if device.type != "cuda" or not args.amp:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_config(args: argparse.Namespace, device: torch.device, arch: dict) -> dict:
    """Every resolved flag plus what is needed to rebuild the model and reproduce the run."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {**vars(args), **arch, "command": " ".join(sys.argv), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "device_name": device_name,
            "git_commit": git_commit()}


def check_resumable(saved: dict, config: dict, defining: set) -> None:
    """Refuse to resume when a flag that changes what the run computes differs from the saved run."""
    changed = sorted(k for k in defining if saved.get(k) != config.get(k))
    if changed:
        details = ", ".join(f"--{k} {saved.get(k)} -> {config.get(k)}" for k in changed)
        raise UserError(f"--resume with flags that change the run ({details}); "
                        f"use the original values or start a new --out_dir")


def fit(args: argparse.Namespace, model: nn.Module, device: torch.device, arch: dict,
        teacher: nn.Module | None = None) -> dict:
    """Train model (against teacher when given) as args say; write the run folder; return the summary."""
    config = run_config(args, device, arch)
    train_split = load_split(args.data_dir, train=True, download=not args.no_download)
    test_split = load_split(args.data_dir, train=False, download=not args.no_download)
    if args.batch_size > len(train_split):
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_split)} "
                        f"training images")
    train_loader = DeviceLoader(train_split, args.batch_size, True, device, args.seed)
    test_loader = DeviceLoader(test_split, args.eval_batch_size, False, device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    optimizer = make_optimizer(model, args.lr, args.momentum, args.weight_decay, device)
    steps_per_epoch = len(train_loader)
    scheduler = make_scheduler(optimizer, round(args.warmup_epochs * steps_per_epoch),
                               args.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and args.amp_dtype == "fp16"
                                  and device.type == "cuda")
    autocast = make_autocast(args, device)

    state = {"epoch": 0, "best": {"test_top1": -1.0}, "last": {}, "elapsed_s": 0.0}
    out = lambda name: os.path.join(args.out_dir, name)
    if args.resume:
        ckpt = load_checkpoint(out("last.pt"))
        check_resumable(ckpt["config"], config, (set(vars(args)) | set(arch)) - RESUMABLE_CHANGES)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        state = {k: ckpt[k] for k in state}
    write_json(out("config.json"), config)
    columns = ["epoch", "lr", "train_loss", "train_top1"] + \
        ([] if teacher is None else ["train_ce", "train_kd"]) + \
        ["test_loss", "test_top1", "test_top5", "epoch_time_s", "train_img_per_s"]
    logger = CSVLogger(out("log.csv"), columns, keep_epochs=state["epoch"])

    objective = Objective(model, teacher, getattr(args, "alpha", 1.0), getattr(args, "T", 1.0),
                          compile=args.compile)
    eval_model = torch.compile(model) if args.compile else model
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        train_loader.set_epoch(epoch)
        started = time.perf_counter()
        row = {"epoch": epoch}
        row.update(train_epoch(objective, train_loader, optimizer, scheduler, scaler, autocast,
                               epoch, should_stop=stop_requested))
        row.update(evaluate(eval_model, test_loader, autocast))
        row["lr"] = optimizer.param_groups[0]["lr"]
        logger.log(row)
        state["epoch"] = epoch
        state["elapsed_s"] += time.perf_counter() - started
        is_best = row["test_top1"] > state["best"]["test_top1"]
        state["last"] = {k: row[k] for k in ("epoch", "test_top1", "test_top5", "test_loss")}
        if is_best:
            state["best"] = state["last"]
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "config": config, "rng": rng_state(), **state}
        save_checkpoint(out("last.pt"), ckpt)
        if is_best:
            copy_file(out("last.pt"), out("best.pt"))
        print(f"epoch {epoch}/{args.epochs}  train_loss {row['train_loss']:.4f}  "
              f"test_top1 {row['test_top1']:.2f}  test_top5 {row['test_top5']:.2f}  "
              f"{row['train_img_per_s']:.0f} img/s", flush=True)
    logger.close()
    summary = {"best_test_top1": state["best"]["test_top1"],
               "best_test_top5": state["best"]["test_top5"], "best_epoch": state["best"]["epoch"],
               "last_test_top1": state["last"]["test_top1"],
               "last_test_top5": state["last"]["test_top5"],
               "epochs": state["epoch"], "total_time_s": state["elapsed_s"]}
    write_json(out("summary.json"), summary)
    return summary

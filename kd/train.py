"""The training run shared by the three scripts: data, loop, evaluation, checkpoints, log, summary."""
import argparse
import contextlib
import os
import time

import torch
import torch.nn as nn

from kd.checkpoint import load_checkpoint, save_checkpoint, write_json
from kd.data import DeviceLoader, hold_out, load_split
from kd.distributed import (World, agreed_stop, broadcast_buffers, check_in_sync, gather_rows,
                            init_world, local_main_first, wrap_ddp)
from kd.engine import (NonFiniteLoss, Objective, StopRequested, make_optimizer, make_scheduler,
                       predict, train_epoch)
from kd.errors import UserError
from kd.flags import check_args
from kd.logger import CSVLogger
from kd.metrics import fine_to_coarse, split_metrics
from kd.rundir import check_out_dir, reset_out_dir, resumed_config, run_config, stopped_message
from kd.signals import stop_requested

METRICS = ["loss", "top1", "top5", "ece", "super_top1", "err_in_super"]
KD_METRICS = ["agree", "kl_t_s"]


def prepare_run(args: argparse.Namespace) -> torch.device:
    """Check the flags and the run folder (touching nothing), pick the device (joining torchrun's
    process group when launched by it), seed the RNG."""
    check_args(args)
    world, device = init_world(args.device)
    if args.batch_size % world.size:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) does not divide "
                        f"evenly over {world.size} processes")
    check_out_dir(args)
    torch.manual_seed(args.seed)
    return device


def make_autocast(args: argparse.Namespace, device: torch.device):
    """A factory of autocast contexts: bf16/fp16 on CUDA with --amp, a no-op otherwise."""
    if device.type != "cuda" or not args.amp:
        return contextlib.nullcontext
    if args.amp_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; pass --amp_dtype fp16 or --no-amp")
    dtype = torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the global RNGs (dropout) from seed, epoch and rank alone.

    Every epoch's randomness is then a function of where the run is, not of its history, so a
    resumed run, on any number of processes, needs no saved RNG state to continue exactly, and
    the ranks of a DDP run draw different dropout masks.
    """
    torch.manual_seed(seed * 1_000_003 + epoch * 65_537 + rank)


def load_eval_splits(args: argparse.Namespace, device: torch.device, world: World):
    """Train loader plus the evaluation splits: {'val': ..., 'test': ...} (val only with --val_size)."""
    with local_main_first(world, device):  # one process per machine downloads
        train = load_split(args.data_dir, train=True, download=args.download)
        splits = {"test": load_split(args.data_dir, train=False, download=args.download)}
    if args.val_size:
        train, splits["val"] = hold_out(train, args.val_size, args.seed)
    if args.batch_size > len(train):
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train)} "
                        f"training images")
    class_to_coarse = fine_to_coarse(train.labels, train.coarse_labels).to(device)
    shard = {"rank": world.rank, "world_size": world.size}
    loaders = {name: DeviceLoader(s, args.eval_batch_size, False, device, **shard)
               for name, s in splits.items()}
    train_loader = DeviceLoader(train, args.batch_size, True, device, args.seed, **shard)
    return train_loader, loaders, class_to_coarse


def predict_all(model, loaders: dict, autocast, world: World) -> dict:
    """Logits of every evaluation split; under torchrun each rank predicts a shard, all gather."""
    return {name: gather_rows(predict(model, loader, autocast), len(loader.split), world)
            for name, loader in loaders.items()}


def evaluate_all(model, loaders: dict, autocast, class_to_coarse, teacher_logits: dict,
                 world: World) -> tuple[dict, dict]:
    """Metrics of every evaluation split, prefixed 'val_'/'test_', and the logits they came from."""
    row, logits = {}, predict_all(model, loaders, autocast, world)
    for name, loader in loaders.items():
        split = loader.split
        metrics = split_metrics(logits[name], split.labels, split.coarse_labels, class_to_coarse,
                                teacher_logits.get(name))
        row.update({f"{name}_{k}": v for k, v in metrics.items()})
    return row, logits


def log_columns(eval_loaders: dict, distilling: bool) -> list[str]:
    columns = ["epoch", "lr", "train_loss", "train_top1"] + ["train_ce", "train_kd"] * distilling
    for name in eval_loaders:
        columns += [f"{name}_{m}" for m in METRICS + KD_METRICS * distilling]
    return columns + ["epoch_time_s", "train_img_per_s"]


def logits_record(logits: dict, loaders: dict, epoch: int, teacher_logits: dict) -> dict:
    """Evaluation logits (fp16, CPU) with labels, so any metric can be recomputed without a GPU."""
    blob = {"epoch": epoch}
    for name, loader in loaders.items():
        blob[name] = {"logits": logits[name].half().cpu(), "labels": loader.split.labels.cpu(),
                      "coarse_labels": loader.split.coarse_labels.cpu()}
        if name in teacher_logits:
            blob[name]["teacher_logits"] = teacher_logits[name].half().cpu()
    return blob


def fit(args: argparse.Namespace, model: nn.Module, device: torch.device, arch: dict,
        teacher: nn.Module | None = None) -> dict:
    """Train model (against teacher when given) as args say; write the run folder; return the summary."""
    world = World.from_env()
    torch.backends.cudnn.benchmark = True  # static shapes: the fastest kernels, found once
    config = run_config(args, device, arch, world)
    train_loader, eval_loaders, class_to_coarse = load_eval_splits(args, device, world)
    memory_format = torch.channels_last  # the loader's layout; fastest on CUDA, fine on CPU
    model, trained = wrap_ddp(model.to(device, memory_format=memory_format), world, device,
                              args.sync_bn)
    optimizer = make_optimizer(model, args.lr, args.momentum, args.weight_decay, device)
    steps = len(train_loader)
    scheduler = make_scheduler(optimizer, round(args.warmup_epochs * steps), args.epochs * steps)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and args.amp_dtype == "fp16"
                                  and device.type == "cuda")
    autocast = make_autocast(args, device)
    select = "val_top1" if args.val_size else "test_top1"
    state = {"epoch": 0, "best": {select: -1.0}, "last": {}, "elapsed_s": 0.0}
    out = lambda name: os.path.join(args.out_dir, name)
    if args.resume:
        ckpt = load_checkpoint(out("last.pt"))
        config = resumed_config(ckpt["config"], config, ckpt["epoch"])
        for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
            obj.load_state_dict(ckpt[name])
        if ckpt["scaler"]:  # empty when the run was saved without fp16 scaling
            scaler.load_state_dict(ckpt["scaler"])
        state = {k: ckpt[k] for k in state}
        if state["epoch"] >= args.epochs:
            print(f"{args.out_dir}: the run is already complete at epoch {state['epoch']}")
            return write_summary(out("summary.json"), state, select) if world.is_main else state
    main = world.is_main
    if main:
        reset_out_dir(args)
        write_json(out("config.json"), config)

    distilling = teacher is not None
    teacher_logits = {}
    if distilling:
        teacher.to(device, memory_format=memory_format)
        teacher_logits = predict_all(teacher, eval_loaders, autocast, world)
        top1 = (teacher_logits["test"].argmax(1) == eval_loaders["test"].split.labels).float().mean()
        if main:
            print(f"teacher test_top1 {100 * top1.item():.2f}")
    columns = log_columns(eval_loaders, distilling)
    logger = CSVLogger(out("log.csv"), columns, keep_epochs=state["epoch"]) if main else None
    should_stop = agreed_stop(stop_requested, world, device)
    objective = Objective(trained, teacher, getattr(args, "alpha", 1.0), getattr(args, "T", 1.0),
                          compile=args.compile)
    eval_model = torch.compile(model) if args.compile else model
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        train_loader.set_epoch(epoch)
        seed_epoch(args.seed, epoch, world.rank)
        started = time.perf_counter()
        try:
            row = {"epoch": epoch, **train_epoch(objective, train_loader, optimizer, scheduler,
                                                 scaler, autocast, epoch, should_stop, main)}
        except NonFiniteLoss as e:
            raise UserError(f"{e}; {stopped_message(state['epoch'])}") from None
        except StopRequested:
            raise StopRequested(stopped_message(state["epoch"])) from None
        check_in_sync(model, world)
        broadcast_buffers(model, world)
        metrics, logits = evaluate_all(eval_model, eval_loaders, autocast, class_to_coarse,
                                       teacher_logits, world)
        row.update(metrics)
        state["epoch"] = epoch
        state["elapsed_s"] += time.perf_counter() - started
        state["last"] = {k: v for k, v in row.items() if k == "epoch" or k[:4] in ("val_", "test")}
        is_best = row[select] > state["best"][select]
        if is_best:
            state["best"] = state["last"]
        if not main:
            continue
        logger.log(row)
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "config": config, **state}
        logits_blob = logits_record(logits, eval_loaders, epoch, teacher_logits)
        # best before last: a crash in between redoes this epoch on resume and rewrites both
        for suffix in ("best", "last") if is_best else ("last",):
            save_checkpoint(out(f"logits_{suffix}.pt"), logits_blob)
            save_checkpoint(out(f"{suffix}.pt"), ckpt)
        val = f"val_top1 {row['val_top1']:.2f}  " if args.val_size else ""
        print(f"epoch {epoch}/{args.epochs}  train_loss {row['train_loss']:.4f}  {val}"
              f"test_top1 {row['test_top1']:.2f}  {row['train_img_per_s']:.0f} img/s", flush=True)
    if not main:
        return state
    logger.close()
    return write_summary(out("summary.json"), state, select)


def write_summary(path: str, state: dict, select: str) -> dict:
    best, last = state["best"], state["last"]
    summary = {"selected_by": select, "best_epoch": best["epoch"],
               "best_test_top1": best["test_top1"], "best_test_top5": best["test_top5"],
               "last_test_top1": last["test_top1"], "last_test_top5": last["test_top5"],
               "epochs": state["epoch"], "total_time_s": state["elapsed_s"],
               "best": best, "last": last}
    write_json(path, summary)
    return summary

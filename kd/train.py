"""The training run the three scripts share, in the order it runs: fit (the whole run),
train_one_epoch, train_step, then evaluation. Data, models, losses, metrics, the run folder and
torchrun each live in the kd module named after them.

No host-device synchronisation per step: losses and accuracies are summed on the device and read
once per epoch, and every `refresh_every` steps for the progress bar and the NaN check.
"""
import argparse
import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from kd.checkpoint import load_checkpoint, save_checkpoint, write_json
from kd.data import DeviceLoader, derive_seed, hold_out, load_split
from kd.distributed import (World, agreed_stop, average_across_ranks, broadcast_buffers,
                            check_in_sync, gather_rows, init_world, local_main_first,
                            max_across_ranks, wrap_ddp)
from kd.errors import StopRequested, UserError, stop_requested
from kd.logger import CSVLogger
from kd.metrics import fine_to_coarse, split_metrics
from kd.models import NUM_CLASSES
from kd.rundir import check_out_dir, reset_out_dir, resumed_config, run_config, stopped_message

# Training settings that are not flags; kd.bench measures with the same ones.
MEMORY_FORMAT = torch.channels_last  # the loader's layout; cuDNN's fast depthwise convs need it
CUDNN_BENCHMARK = True  # static shapes: the fastest kernels are searched for once
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]  # see kd.losses
# The teacher's logits of a training batch from (images, view keys): the live teacher's forward,
# or a kd.cache.TeacherCache lookup
TeacherLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prepare_run(args: argparse.Namespace, keep: tuple[str, ...] = ()) -> torch.device:
    """Check the run folder (touching nothing; `keep`: input files --overwrite must not delete),
    pick the device (joining torchrun's process group when launched by it), seed the RNG."""
    world, device = init_world(args.device)
    if args.batch_size % world.size:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) does not divide "
                        f"evenly over {world.size} processes")
    check_out_dir(args, keep)
    torch.manual_seed(args.seed)
    return device


def fit(args: argparse.Namespace, model: nn.Module, device: torch.device,
        loss_at: Callable[[int], LossFn], run_info: dict, teacher: nn.Module | None = None,
        teacher_cache: TeacherLogits | None = None) -> dict:
    """Train model as args say, write the run folder, return the summary.

    loss_at(epoch): the loss function minimised in that epoch (a new one each epoch only for
    DKD's warm-up), called as loss_fn(logits, labels), or with a frozen teacher as
    loss_fn(logits, teacher_logits, labels) (kd.losses). run_info: what the config records
    beyond the flags (arch, teacher hash).
    teacher_cache: the training views' teacher logits come from it and the teacher runs only on
    the evaluation splits, once.
    """
    world = World.from_env()
    main = world.is_main
    torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
    config = run_config(args, device, run_info, world)
    train_loader, eval_loaders, class_to_coarse = load_data(args, device, world)
    model, trained = wrap_ddp(model.to(device, memory_format=MEMORY_FORMAT), world, device,
                              sync_bn=args.sync_bn)  # trained: the DDP wrapper under torchrun
    opt = make_optimization(args, model, len(train_loader), device)
    select = "val_top1" if args.val_size else "test_top1"
    state = {"epoch": 0, "best": {select: -1.0}, "last": {}, "elapsed_s": 0.0}
    out = lambda name: os.path.join(args.out_dir, name)
    if args.resume:
        ckpt = load_checkpoint(out("last.pt"))
        config = resumed_config(ckpt["config"], config, ckpt["epoch"])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt)
        state = {k: ckpt[k] for k in state}
        if state["epoch"] >= args.epochs:
            if main:
                print(f"{args.out_dir}: the run is already complete at epoch {state['epoch']}")
            return write_summary(out("summary.json"), state, select, config) if main else state
    if main:
        reset_out_dir(args)
        write_json(out("config.json"), config)

    teacher_logits = {}
    if teacher is not None:
        teacher.to(device, memory_format=MEMORY_FORMAT)
        teacher_logits = predict_splits(teacher, eval_loaders, opt.autocast, world)
        top1 = (teacher_logits["test"].argmax(1) == eval_loaders["test"].split.labels).float()
        if main:
            print(f"teacher test_top1 {100 * top1.mean().item():.2f}")
    logger = CSVLogger(out("log.csv"), keep_epochs=state["epoch"]) if main else None
    eval_model = model
    if args.compile:  # graphs for the trained model, the loss, the teacher, the eval model
        trained, eval_model = torch.compile(trained), torch.compile(model)
    training_teacher = teacher_cache  # where the training views' teacher logits come from
    if teacher is not None and teacher_cache is None:
        online = torch.compile(teacher) if args.compile else teacher
        training_teacher = lambda images, views: online(images)
    should_stop = agreed_stop(stop_requested, world, device)
    saved_epoch, clock = state["epoch"], time.perf_counter()  # the epoch last.pt holds
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        train_loader.set_epoch(epoch)
        torch.manual_seed(derive_seed(args.seed, epoch, world.rank))  # dropout, per process
        loss_fn = torch.compile(loss_at(epoch)) if args.compile else loss_at(epoch)
        try:
            stats = train_one_epoch(trained, training_teacher, loss_fn, opt, train_loader, epoch,
                                    should_stop, show_progress=main)
        except UserError as e:  # a NaN loss: nothing of this epoch is saved
            raise UserError(f"{e}; {stopped_message(saved_epoch)}") from None
        except StopRequested:
            raise StopRequested(stopped_message(saved_epoch)) from None
        check_in_sync(model, world)
        broadcast_buffers(model, world)
        logits = predict_splits(eval_model, eval_loaders, opt.autocast, world)
        metrics = eval_metrics(logits, eval_loaders, class_to_coarse, teacher_logits)
        timing = {k: stats.pop(k) for k in ("epoch_time_s", "train_img_per_s")}
        row = {"epoch": epoch, **stats, **metrics, **timing}  # log.csv's column order
        state["epoch"] = epoch
        # wall time: training, evaluation and the previous epoch's checkpoint writes
        state["elapsed_s"] += time.perf_counter() - clock
        clock = time.perf_counter()
        state["last"] = {"epoch": epoch, **metrics}
        is_best = row[select] > state["best"][select]
        if is_best:
            state["best"] = state["last"]
        save_last = epoch % args.save_every == 0 or epoch == args.epochs
        saved_epoch = epoch if save_last else saved_epoch
        if not main:
            continue
        logger.log(row)
        ckpt = {"model": model.state_dict(), **opt.state_dict(), "config": config, **state}
        logits_blob = logits_record(logits, eval_loaders, epoch, teacher_logits)
        # best before last: a crash in between redoes this epoch on resume and rewrites both
        for suffix in ("best",) * is_best + ("last",) * save_last:
            save_checkpoint(out(f"logits_{suffix}.pt"), logits_blob)
            save_checkpoint(out(f"{suffix}.pt"), ckpt)
        val = f"val_top1 {row['val_top1']:.2f}  " if args.val_size else ""
        print(f"epoch {epoch}/{args.epochs}  train_loss {row['train_loss']:.4f}  {val}"
              f"test_top1 {row['test_top1']:.2f}  {row['train_img_per_s']:.0f} img/s", flush=True)
    state["elapsed_s"] += time.perf_counter() - clock  # the last checkpoint writes
    return write_summary(out("summary.json"), state, select, config) if main else state


def train_one_epoch(model: nn.Module, teacher: TeacherLogits | None, loss_fn: LossFn,
                    opt: "Optimization", loader: DeviceLoader, epoch: int,
                    should_stop: Callable[[], bool] = lambda: False, *, show_progress: bool = True,
                    refresh_every: int = 25) -> dict:
    """One epoch; returns the last step's lr, the epoch's mean loss, top-1 (%) and named loss
    terms (train_<name>), its time and images/s. A NaN or infinite loss raises UserError."""
    model.train()
    sums = 0
    first_bad_step = torch.tensor(-1, device=loader.device)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not show_progress)
    start = time.perf_counter()
    for step, (images, labels, views) in enumerate(bar):
        if should_stop():
            raise StopRequested
        lr = opt.optimizer.param_groups[0]["lr"]
        loss, logits, terms = train_step(model, teacher, loss_fn, opt, images, labels, views)
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).float().mean()
            sums = sums + torch.stack([loss, correct, *terms.values()])
            bad_now = ~torch.isfinite(loss) & (first_bad_step < 0)
            first_bad_step = torch.where(bad_now, step, first_bad_step)
        if step % refresh_every == refresh_every - 1:
            check_finite(first_bad_step, epoch)
            seen = (step + 1) * len(labels)
            bar.set_postfix(loss=f"{sums[0].item() / (step + 1):.3f}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")
    check_finite(first_bad_step, epoch)
    means = [s / len(loader) for s in average_across_ranks(sums).tolist()]  # the one sync
    elapsed = time.perf_counter() - start
    bar.close()
    names = ["train_loss", "train_top1", *(f"train_{name}" for name in terms)]
    stats = {"lr": lr, **dict(zip(names, means))}
    stats["train_top1"] *= 100
    return {**stats, "epoch_time_s": elapsed,
            "train_img_per_s": len(loader) * loader.global_batch_size / elapsed}


def check_finite(first_bad_step: torch.Tensor, epoch: int) -> None:
    bad = int(max_across_ranks(first_bad_step).item())  # all ranks stop together
    if bad >= 0:
        raise UserError(f"loss became NaN or infinite at epoch {epoch}, step {bad + 1}")


def train_step(model: nn.Module, teacher: TeacherLogits | None, loss_fn: LossFn,
               opt: "Optimization", images: torch.Tensor, labels: torch.Tensor,
               views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One SGD step; returns the loss, the logits and the named loss terms, still on the device.
    views: the loader's view keys of the batch, for a teacher cache."""
    with opt.autocast():
        logits = model(images)
        if teacher is None:
            loss, terms = loss_fn(logits, labels)
        else:
            with torch.inference_mode():
                teacher_logits = teacher(images, views)
            loss, terms = loss_fn(logits, teacher_logits.clone(), labels)  # clone: autograd-usable
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return loss, logits, terms


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


def make_autocast(device: torch.device, *, amp: bool, amp_dtype: str
                  ) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts: bf16/fp16 on CUDA with amp, a no-op otherwise."""
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext
    if amp_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; pass --amp_dtype fp16 or --no-amp")
    dtype = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
    return functools.partial(torch.autocast, "cuda", dtype=dtype)


def load_data(args: argparse.Namespace, device: torch.device, world: World
              ) -> tuple[DeviceLoader, dict[str, DeviceLoader], torch.Tensor]:
    """The train loader, the evaluation loaders {'test', 'val' (with --val_size)} and the map
    from fine class to superclass."""
    with local_main_first(world, device):  # one process per machine downloads
        train = load_split(args.data_dir, train=True, download=args.download)
        splits = {"test": load_split(args.data_dir, train=False, download=args.download)}
    if args.val_size:
        train, splits["val"] = hold_out(train, args.val_size, args.seed)
    if args.batch_size > len(train):
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train)} "
                        f"training images")
    shard = {"rank": world.rank, "world_size": world.size}
    train_loader = DeviceLoader(train, args.batch_size, device, train=True, seed=args.seed, **shard)
    eval_loaders = {name: DeviceLoader(split, args.eval_batch_size, device, train=False, **shard)
                    for name, split in splits.items()}
    return train_loader, eval_loaders, fine_to_coarse(train.labels, train.coarse_labels).to(device)


@torch.inference_mode()
def predict(model: nn.Module, loader: DeviceLoader, autocast) -> torch.Tensor:
    """float32 logits [N, classes], on the device, for every image of the loader's shard in order.

    The last, smaller batch is zero-padded to the full batch size so that a compiled model
    sees one static shape; the padded rows are dropped.
    """
    model.eval()
    chunks = []
    for images, labels, _ in loader:
        if len(images) < loader.batch_size:
            padding = images.new_zeros((loader.batch_size - len(images), *images.shape[1:]))
            images = torch.cat([images, padding]).contiguous(memory_format=MEMORY_FORMAT)
        with autocast():
            chunks.append(model(images)[:len(labels)].float())
    return torch.cat(chunks) if chunks else torch.zeros(0, NUM_CLASSES, device=loader.device)


def predict_splits(model: nn.Module, loaders: dict[str, DeviceLoader], autocast, world: World
                   ) -> dict[str, torch.Tensor]:
    """Logits of every evaluation split; under torchrun each rank predicts a shard, all gather."""
    return {name: gather_rows(predict(model, loader, autocast), len(loader.split), world)
            for name, loader in loaders.items()}


def eval_metrics(logits: dict[str, torch.Tensor], loaders: dict[str, DeviceLoader],
               class_to_coarse: torch.Tensor, teacher_logits: dict[str, torch.Tensor]) -> dict:
    """The metrics of every evaluation split, as log columns 'test_top1', 'val_ece', ..."""
    row = {}
    for name, loader in loaders.items():
        split = loader.split
        metrics = split_metrics(logits[name], split.labels, split.coarse_labels, class_to_coarse,
                                teacher_logits.get(name))
        row.update({f"{name}_{k}": v for k, v in metrics.items()})
    return row


def logits_record(logits: dict, loaders: dict, epoch: int, teacher_logits: dict) -> dict:
    """Evaluation logits (float32, CPU: they reproduce the logged metrics) with the labels, so
    any metric can be recomputed later without a GPU."""
    blob = {"epoch": epoch}
    for name, loader in loaders.items():
        blob[name] = {"logits": logits[name].cpu(), "labels": loader.split.labels.cpu(),
                      "coarse_labels": loader.split.coarse_labels.cpu()}
        if name in teacher_logits:
            blob[name]["teacher_logits"] = teacher_logits[name].cpu()
    return blob


def write_summary(path: str, state: dict, select: str, config: dict) -> dict:
    best, last = state["best"], state["last"]
    teacher = {k: config[k] for k in ("teacher_logits", "teacher_cache_sha256") if k in config}
    summary = {"selected_by": select, **teacher, "best_epoch": best["epoch"],
               "best_test_top1": best["test_top1"], "best_test_top5": best["test_top5"],
               "last_test_top1": last["test_top1"], "last_test_top5": last["test_top5"],
               "epochs": state["epoch"], "total_time_s": state["elapsed_s"],
               "best": best, "last": last}
    write_json(path, summary)
    return summary

"""The training run the three scripts share, in the order it runs: fit (the whole run),
train_one_epoch, train_step, then evaluation. Data, models, losses, metrics, the optimizer
(kd.optim), the run folder (kd.rundir, kd.record), inference and torchrun each live in the kd
module named after them.

No host-device synchronisation per step: losses and accuracies are summed on the device and read
once per epoch, and every `refresh_every` steps for the progress bar and the NaN check.
"""
import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from kd.checkpoint import load_checkpoint
from kd.data import DeviceLoader, derive_seed, hold_out, load_split
from kd.distributed import (World, agreed_stop, average_across_ranks, average_gradients,
                            broadcast_buffers, check_in_sync, init_world, local_main_first,
                            max_across_ranks, sync_batch_norm, wrap_ddp)
from kd.errors import StopRequested, UserError, stop_requested
from kd.inference import MEMORY_FORMAT, predict_splits
from kd.logger import CSVLogger
from kd.record import Record, logits_record
from kd.losses import LossFn
from kd.metrics import split_metrics, superclass_map
from kd.optim import DOT, Optimization, make_optimization
from kd.rundir import check_out_dir, resumed_config, run_config, stopped_message

# Training settings that are not flags; kd.bench measures with the same ones.
CUDNN_BENCHMARK = True  # static shapes: the fastest kernels are searched for once
# The teacher's logits of a training batch from (images, view keys): the live teacher's forward,
# or a kd.cache.TeacherCache lookup (distill_student.py picks)
TeacherLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Start:
    """Where a run starts: its device, its processes (torchrun), and on --resume the last.pt it
    continues from (loaded once, before any model is built)."""

    device: torch.device
    world: World
    checkpoint: dict | None


def prepare_run(args: argparse.Namespace, keep: tuple[str, ...] = ()) -> Start:
    """Check the run folder (touching nothing; `keep`: input files --overwrite must not delete),
    pick the device (joining torchrun's process group when launched by it), seed the RNG, and
    on --resume load last.pt."""
    processes = World.from_env().size  # refused before the ranks join: each says so alike
    if args.batch_size % processes:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) does not divide "
                        f"evenly over {processes} processes")
    world, device = init_world(args.device)
    check_out_dir(args, keep)
    torch.manual_seed(args.seed)
    checkpoint = load_checkpoint(os.path.join(args.out_dir, "last.pt")) if args.resume else None
    return Start(device, world, checkpoint)


@dataclass
class Teacher:
    """The frozen teacher of a distilled run, as fit uses it, and the trainable connector a
    feature method adds (kd.features; it is trained with the student and saved apart from it)."""

    module: nn.Module  # on the device; gives the evaluation splits' logits, once per run
    train_logits: TeacherLogits  # a training batch's logits: the module's forward or a cache
    connector: nn.Module | None = None  # connector(keys, labels) -> the feature loss's inputs
    init: "InitStage | None" = None  # a stage before the first epoch (--init_epochs)


@dataclass(frozen=True)
class InitStage:
    """A method's initialisation stage (RepDistiller's helper/pretrain.py), --init_epochs epochs
    before the first: only parameters(model, connector) train, by an SGD of their own at the
    fixed --init_lr (--momentum, --weight_decay), on loss(args), called as
    (logits, teacher_logits, labels, connect(connector, keys, labels)); the other modules keep
    their weights and, outside training(model, connector), their BatchNorm statistics."""

    parameters: Callable[[nn.Module, nn.Module], list[nn.Parameter]]
    loss: Callable[[argparse.Namespace], LossFn]
    connect: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple]
    training: Callable[[nn.Module, nn.Module], list[nn.Module]]  # in train mode during it


def fit(args: argparse.Namespace, model: nn.Module, start: Start,
        loss_at: Callable[[argparse.Namespace, int], LossFn], run_info: dict,
        teacher: Teacher | None = None, *, dot_delta: float | None = None) -> dict:
    """Train model as args say, write the run folder, return the summary.

    loss_at(args, epoch): the loss minimised in that epoch (kd.losses), called as
    loss_fn(logits, labels), or with a teacher as loss_fn(logits, teacher_logits, labels).
    run_info: what config.json records beyond the flags (arch, teacher hash). dot_delta: train
    with kd.optim.DOT at this delta instead of SGD (distill_student.py's --optimizer dot).
    """
    device, world = start.device, start.world
    torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
    train_loader, eval_loaders, class_to_coarse = load_data(args, device, world)
    model_without_ddp = sync_batch_norm(model.to(device, memory_format=MEMORY_FORMAT), world,
                                        device, args.sync_bn)
    model = wrap_ddp(model_without_ddp, world, device)
    connector = None
    if teacher and teacher.connector:  # its own DDP wrapper (below), if it has weights to train
        connector = sync_batch_norm(teacher.connector.to(device), world, device, args.sync_bn)
    trained = nn.ModuleList([model_without_ddp, connector]) if connector else model_without_ddp
    opt = make_optimization(args, trained, len(train_loader), device, dot_delta=dot_delta)
    record = restore(args, start, model_without_ddp, connector, opt, run_info)
    if record.epoch >= args.epochs:
        record.say(f"{args.out_dir}: the run is already complete at epoch {record.epoch}")
        return record.finished()
    teacher_logits = evaluate_teacher(teacher, eval_loaders, opt.autocast, world, record)
    record.begin()
    eval_model = model_without_ddp
    if args.compile:  # graphs for the trained model, the eval model and each epoch's loss
        model, eval_model = torch.compile(model), torch.compile(model_without_ddp)
    should_stop = agreed_stop(stop_requested, world, device)
    if teacher and teacher.init and record.epoch == 0:  # a finished epoch: the stage is done
        initialize(args, teacher, model_without_ddp, connector, opt, train_loader, record,
                   should_stop, world)
    train_connector = wrap_ddp(connector, world, device, static_graph=True) if connector else None
    for epoch in range(record.epoch + 1, args.epochs + 1):
        train_loader.set_epoch(epoch)
        torch.manual_seed(derive_seed(args.seed, epoch, world.rank))  # dropout, per process
        loss_fn = loss_at(args, epoch)
        if args.compile and dot_delta is None:  # DOT reads dL/d(ce) off an eager loss's graph
            loss_fn = torch.compile(loss_fn)
        step = Step(model, teacher.train_logits if teacher else None, loss_fn, opt,
                    train_connector)
        with resume_hint(record.saved_epoch, record.init.get("epoch", 0)):
            stats = train_one_epoch(step, train_loader, epoch, should_stop,
                                    show_progress=world.is_main)
        check_in_sync(trained, world)
        broadcast_buffers(trained, world)
        logits = predict_splits(eval_model, eval_loaders, opt.autocast, world)
        metrics = eval_metrics(logits, eval_loaders, class_to_coarse, teacher_logits)
        blob = logits_record(logits, eval_loaders, epoch, teacher_logits) if world.is_main else None
        state = training_state(model_without_ddp, connector, opt)
        record.end_epoch({"epoch": epoch, **stats, **metrics}, state, blob)
    return record.finish()


def initialize(args: argparse.Namespace, teacher: Teacher, model: nn.Module, connector: nn.Module,
               opt: Optimization, loader: DeviceLoader, record: Record,
               should_stop: Callable[[], bool], world: World) -> None:
    """Run the rest of teacher.init's epochs (InitStage), each with the data order of its own
    epoch (numbered -1, -2, ...). After each, init_log.csv gets its mean loss and terms, and
    last.pt the stage's progress, so a stopped run resumes inside the stage. Under torchrun
    the stage trains the unwrapped modules, its gradients averaged over the ranks at each step
    (kd.distributed.average_gradients), and the ranks are checked in sync after each epoch."""
    stage = teacher.init
    parameters = stage.parameters(model, connector)
    trained = nn.ModuleList([model, connector])  # what the ranks must agree on after each epoch
    optimizer = torch.optim.SGD(parameters, lr=args.init_lr,
                                momentum=args.momentum, weight_decay=args.weight_decay,
                                foreach=True)
    init_opt = Optimization(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1),
                            torch.amp.GradScaler(enabled=opt.scaler.is_enabled()), opt.autocast)
    if record.init:
        init_opt.load_state_dict(record.init["optimization"])
    logger = CSVLogger(record.path("init_log.csv"), keep_epochs=record.init.get("epoch", 0)) \
        if record.is_main else None
    step = Step(model, teacher.train_logits, stage.loss(args), init_opt,
                lambda keys, labels: stage.connect(connector, keys, labels),
                lambda: average_gradients(parameters, world))
    for epoch in range(record.init.get("epoch", 0) + 1, args.init_epochs + 1):
        model.eval(), connector.eval()
        for module in stage.training(model, connector):
            module.train()
        loader.set_epoch(-epoch)
        torch.manual_seed(derive_seed(args.seed, -epoch, world.rank))  # as fit's epochs
        sums, start = 0, time.perf_counter()
        with resume_hint(0, record.init.get("epoch", 0)):
            for images, labels, keys in tqdm(loader, desc=f"init epoch {epoch}", leave=False,
                                             disable=not record.is_main):
                if should_stop():
                    raise StopRequested
                loss, _, terms = train_step(step, images, labels, keys)
                sums = sums + torch.stack([loss.detach().float(),
                                           *(t.detach().float() for t in terms.values())])
            means = (average_across_ranks(sums) / len(loader)).tolist()  # one read an epoch
            if not math.isfinite(means[0]):
                raise UserError(f"the loss became NaN or infinite in init epoch {epoch}")
        check_in_sync(trained, world)
        broadcast_buffers(trained, world)
        row = {"epoch": epoch, "init_loss": means[0],
               **{f"init_{name}": v for name, v in zip(terms, means[1:])},
               "epoch_time_s": time.perf_counter() - start}
        record.init = {"epoch": epoch, "optimization": init_opt.state_dict()}
        record.save_init(row, training_state(model, connector, opt), logger)


def training_state(model_without_ddp: nn.Module, connector: nn.Module | None,
                   opt: Optimization) -> dict:
    """What last.pt holds to continue training: the student's (or teacher's) weights as a plain
    model ('model', what every loader of best.pt reads), the optimizer's state, and a feature
    method's connector ('connector')."""
    state = {"model": model_without_ddp.state_dict(), **opt.state_dict()}
    if connector is not None:
        state["connector"] = connector.state_dict()
    return state


def restore(args: argparse.Namespace, start: Start, model_without_ddp: nn.Module,
            connector: nn.Module | None, opt: Optimization, run_info: dict) -> Record:
    """A new run's record, or on --resume last.pt's, with its weights, connector and optimizer
    state loaded once the settings agree (kd.rundir.resumed_config)."""
    record = Record(args, run_config(args, start.device, run_info, start.world),
                    start.world.is_main)
    ckpt = start.checkpoint
    if ckpt is not None:
        record.config = resumed_config(ckpt["config"], record.config, ckpt["epoch"])
        model_without_ddp.load_state_dict(ckpt["model"])
        if connector is not None:
            try:
                connector.load_state_dict(ckpt["connector"])
            except (KeyError, RuntimeError) as e:  # missing, or shapes of other data or flags
                reason = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
                raise UserError(f"--resume: last.pt's connector does not fit this run "
                                f"({reason[:200]}); resume with the --data_dir and flags it was "
                                f"made with") from None
        opt.load_state_dict(ckpt)
        record.epoch, record.best, record.last = ckpt["epoch"], ckpt["best"], ckpt["last"]
        record.elapsed_s, record.saved_epoch = ckpt["elapsed_s"], ckpt["epoch"]
        record.blown_up = ckpt.get("blown_up", [])  # absent from runs saved before it
        record.init = ckpt.get("init", {})
    return record


def evaluate_teacher(teacher: Teacher | None, loaders: dict[str, DeviceLoader], autocast,
                     world: World, record: Record) -> dict[str, torch.Tensor]:
    """The teacher's logits of every evaluation split ({} without a teacher), its test top-1
    printed: they are the same every epoch."""
    if teacher is None:
        return {}
    logits = predict_splits(teacher.module, loaders, autocast, world)
    top1 = (logits["test"].argmax(1) == loaders["test"].split.labels).float().mean()
    record.say(f"teacher test_top1 {100 * top1.item():.2f}")
    return logits


@contextlib.contextmanager
def resume_hint(saved_epoch: int, saved_init_epoch: int = 0):
    """A NaN loss or a stop signal inside the block ends the run with how to go on from the
    epoch (or init epoch) last.pt holds; nothing of the unfinished epoch is saved."""
    try:
        yield
    except UserError as e:
        raise UserError(f"{e}; {stopped_message(saved_epoch, saved_init_epoch)}") from None
    except StopRequested:
        raise StopRequested(stopped_message(saved_epoch, saved_init_epoch)) from None


@dataclass
class Step:
    """What a training step uses, travelling together: the model trained through (the DDP
    wrapper under torchrun, compiled with --compile), where a batch's teacher logits come from
    (None without a teacher), the epoch's loss function, the optimization, a feature
    method's connector, and what syncs the gradients between backward and the optimizer's step
    where no DDP wrapper does (an init stage under torchrun)."""

    model: nn.Module
    teacher_logits: TeacherLogits | None
    loss_fn: LossFn
    opt: Optimization
    connector: nn.Module | None = None
    sync_gradients: Callable[[], None] = lambda: None


def train_one_epoch(step: Step, loader: DeviceLoader, epoch: int,
                    should_stop: Callable[[], bool] = lambda: False, *, show_progress: bool = True,
                    refresh_every: int = 25) -> dict:
    """One epoch; returns the last step's lr, the epoch's mean loss, top-1 (%) and named loss
    terms (train_<name>), its time and images/s. A NaN or infinite loss raises UserError."""
    step.model.train()
    if step.connector is not None:
        step.connector.train()
    sums = 0
    first_bad_step = torch.tensor(-1, device=loader.device)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
               disable=not show_progress)
    start = time.perf_counter()
    for i, (images, labels, keys) in enumerate(bar):
        if should_stop():
            raise StopRequested
        lr = step.opt.optimizer.param_groups[0]["lr"]
        loss, logits, terms = train_step(step, images, labels, keys)
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).float().mean()
            sums = sums + torch.stack([loss, correct, *terms.values()])
            bad_now = ~torch.isfinite(loss) & (first_bad_step < 0)
            first_bad_step = torch.where(bad_now, i, first_bad_step)
        if i % refresh_every == refresh_every - 1:
            check_finite(first_bad_step, epoch)
            seen = (i + 1) * len(labels)
            bar.set_postfix(loss=f"{sums[0].item() / (i + 1):.3f}",
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


def train_step(step: Step, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step; returns the loss, the logits and the named loss terms, still on the
    device.
    keys: the loader's view keys of the batch, which a teacher cache looks the logits up by."""
    opt = step.opt
    with opt.autocast():
        logits = step.model(images)
        if step.teacher_logits is None:
            loss, terms = step.loss_fn(logits, labels)
        else:
            with torch.inference_mode():
                teacher_logits = step.teacher_logits(images, keys)
            # clone: an inference tensor cannot be saved for backward
            inputs = [logits, teacher_logits.clone(), labels]
            if step.connector is not None:  # a feature method: both forwards' taps, connected
                inputs.append(step.connector(keys, labels))
            loss, terms = step.loss_fn(*inputs)
    opt.optimizer.zero_grad(set_to_none=True)
    if isinstance(opt.optimizer, DOT):  # two backward passes: distillation, then hard-label CE
        opt.optimizer.backward(loss, terms)
    else:
        opt.scaler.scale(loss).backward()
    step.sync_gradients()
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return loss, logits, terms


def load_data(args: argparse.Namespace, device: torch.device, world: World
              ) -> tuple[DeviceLoader, dict[str, DeviceLoader], torch.Tensor]:
    """The train loader, the evaluation loaders {'test', 'val' (with --val_size)} and the map
    from fine class to superclass."""
    with local_main_first(world, device):  # one process per machine downloads
        train = load_split(args.data_dir, train=True, download=args.download)
        splits = {"test": load_split(args.data_dir, train=False, download=args.download)}
    class_to_coarse = superclass_map(train, splits["test"]).to(device)
    if args.val_size:
        train, splits["val"] = hold_out(train, args.val_size, args.seed)
    if args.batch_size > len(train):
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train)} "
                        f"training images")
    train_loader = DeviceLoader(train, args.batch_size, device, train=True, seed=args.seed,
                                world=world)
    eval_loaders = {name: DeviceLoader(split, args.eval_batch_size, device, train=False,
                                       world=world)
                    for name, split in splits.items()}
    return train_loader, eval_loaders, class_to_coarse


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

"""Throughput of every stage of a training run, measured in one process so that ratios are fair.

  data     kd.data.DeviceLoader against the usual torchvision pipeline (PIL crop and flip in
           DataLoader workers) on the same images: one epoch, augmentation on
  cache    kd.cache.build: the teacher's logits of every view of a few images
  train    kd.train.train_step for the teacher, the CE student and the KD student (online teacher,
           or its logits from a kd.cache.TeacherCache) on a batch already on the device, and, for
           the students, the same steps fed by the DeviceLoader: "input cost" is how much longer a
           step takes with the loader
  eval     kd.inference.predict and kd.metrics.split_metrics over an eval-mode DeviceLoader

The defaults are what training runs: distill_student.py's settings, built from the package
(kd.flags.STUDENT_RECIPE's batch size and SGD, the default --method with its flags' defaults,
each method's loss_at from the registry), kd.inference's memory format (channels_last) and
cuDNN autotuning, the scripts' default autocast (bf16 on CUDA, float32 on CPU); eager, and on CUDA
also compiled, to show what --compile gains. A grid of variants, dtype (fp16 with a GradScaler)
x channels_last x torch.compile, is asked for with --dtypes, --channels_last both. Images are
random uint8, not CIFAR-100: throughput does not depend on pixel values. Times come from
kd.timing.measure: CUDA events around blocks of steps (synchronised only at block ends),
perf_counter on the CPU; each number is the median of --repeats blocks after untimed warm-up.
"compile s" is the first step minus a steady one.

  python -m kd.bench                            # the training settings, every config
  python -m kd.bench --compile off              # eager only
  python -m kd.bench --dtypes bf16,fp16,fp32 --channels_last both --compile both  # 96 rows (long)
  python -m kd.bench --quick --device cpu       # smoke run, under 3 minutes on 2 cores
"""
import argparse
import itertools
import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from kd.checkpoint import write_json
from kd.cache import TeacherCache
from kd.bench_stages import bench_cache_build, bench_data, print_data, random_split
from kd.data import NUM_VIEWS, DeviceLoader, Split
from kd.distributed import resolve_device
from kd.errors import UserError, run_script
from kd.flags import STUDENT_RECIPE, Parser, add_device_flag, base_parser, positive_int
from kd.inference import MEMORY_FORMAT, make_autocast, predict
from kd.losses import ce_loss
from kd.methods import DEFAULT, METHODS, add_flags as add_method_flags
from kd.metrics import fine_to_coarse, split_metrics
from kd.models import NUM_CLASSES, build_student, build_teacher
from kd.optim import DOT_DELTA, make_optimization
from kd.timing import device_name, measure
from kd.train import CUDNN_BENCHMARK, Step, train_step

DTYPES = ["bf16", "fp16", "fp32"]
TRAIN_IMAGES = 50_000  # in CIFAR-100's training set

@dataclass(frozen=True)
class Config:
    """What one row trains or evaluates."""

    name: str
    student: bool  # the MobileNetV3-Small student; else the ResNet-50 teacher alone
    img_size: int = 32  # the teacher's input size, whether it trains or teaches
    kd: bool = False  # the student learns from a frozen teacher that runs every step
    cached: bool = False  # KD: the teacher's logits come from a kd.cache.TeacherCache lookup
    train: bool = True  # False: evaluation passes
    method: str = DEFAULT  # distill_student.py's --method, with its defaults (and connector)
    optimizer: str = "sgd"  # distill_student.py's --optimizer (dot: at its default --dot_delta)


CONFIGS = {c.name: c for c in [
    Config("teacher_32", student=False, img_size=32),
    Config("teacher_128", student=False, img_size=128),
    Config("teacher_224", student=False, img_size=224),
    Config("student_ce", student=True),
    Config("kd_t224", student=True, img_size=224, kd=True),
    Config("kd_t128", student=True, img_size=128, kd=True),
    Config("kd_t32", student=True, img_size=32, kd=True),
    Config("kd_cached", student=True, kd=True, cached=True),
    *(Config(f"{name}_t32", student=True, img_size=32, kd=True, method=name)
      for name in METHODS if name != DEFAULT),  # each other method, at its defaults
    Config("kd_dot_t32", student=True, img_size=32, kd=True, optimizer="dot"),
    Config("eval_student", student=True, train=False),
    Config("eval_teacher_224", student=False, img_size=224, train=False),
]}
CUDA_CONFIGS = [name for name in CONFIGS if name != "kd_t32"]
# the rows of another method or optimizer than kd_t32's, each compared with it
METHOD_CONFIGS = [name for name, config in CONFIGS.items()
                  if config.method != DEFAULT or config.optimizer != "sgd"]
SMALL_CONFIGS = ["teacher_32", "student_ce", "kd_t32", "kd_cached", *METHOD_CONFIGS,
                 "eval_student"]


@dataclass(frozen=True)
class Variant:
    """How a config runs: autocast dtype, memory format of model and input, torch.compile."""

    dtype: str
    channels_last: bool
    compile: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return MEMORY_FORMAT if self.channels_last else torch.contiguous_format


def comma_list(choices: list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: pick from {','.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m kd.bench", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_flag(p)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: fewer images, steps and repeats, the small configs, eager only")
    p.add_argument("--json", metavar="PATH",
                   help="write every result, the device, torch version and flags here "
                        "(rewritten after each row, so a cut-off run keeps what it measured)")
    p.add_argument("--batch_size", type=positive_int, metavar="N",
                   help="training batch size (default: distill_student.py's)")
    p.add_argument("--eval_batch_size", type=positive_int, metavar="N",
                   help="evaluation batch size (default 1000, as the training scripts; "
                        "256 with --quick on CPU)")
    p.add_argument("--images", type=positive_int, metavar="N",
                   help="generated training images (default 50,000 on CUDA, 10,000 on CPU, "
                        "4,096 with --quick); the eval split is a fifth of it, in whole eval "
                        "batches")
    p.add_argument("--steps", type=positive_int, metavar="N",
                   help="training steps per timed block (default 20 on CUDA, 5 on CPU; 1 with "
                        "--quick)")
    p.add_argument("--repeats", type=positive_int, metavar="N",
                   help="timed blocks; the median is reported (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=positive_int, metavar="N",
                   help="untimed warm-up training steps, compilation included (default 5; 1 with "
                        "--quick); data epochs and eval passes always warm up with one")
    p.add_argument("--configs", metavar="LIST", type=comma_list(list(CONFIGS)),
                   help=f"comma-separated, from {','.join(CONFIGS)} (default on CUDA: all but "
                        f"kd_t32; on CPU or with --quick: {','.join(SMALL_CONFIGS)})")
    p.add_argument("--dtypes", metavar="LIST", type=comma_list(DTYPES),
                   help="autocast dtypes, comma-separated (default: bf16 on CUDA, fp32 on CPU, "
                        "the only one kd.inference.make_autocast gives there: the scripts' "
                        "defaults)")
    p.add_argument("--compile", choices=["off", "on", "both"],
                   help="torch.compile variants (default on CUDA: both, to show what --compile "
                        "gains; on CPU: off, as the scripts without --compile)")
    p.add_argument("--channels_last", choices=["off", "on", "both"], default="on",
                   help="model and input memory format (default: on, kd.inference.MEMORY_FORMAT)")
    p.add_argument("--cudnn_benchmark", action=argparse.BooleanOptionalAction,
                   default=CUDNN_BENCHMARK, help="torch.backends.cudnn.benchmark "
                   "(default: kd.train.CUDNN_BENCHMARK, as training sets it)")
    return p.parse_args(argv)


def fill_defaults(args: argparse.Namespace, *, cuda: bool) -> None:
    """Resolve the flags left unset: the full grid on CUDA, small and eager on CPU or with
    --quick."""
    quick, small_cpu = args.quick, args.quick and not cuda
    defaults = {
        "batch_size": STUDENT_RECIPE["batch_size"],
        "eval_batch_size": 256 if small_cpu else 1000,
        "images": 4_096 if quick else 50_000 if cuda else 10_000,
        "steps": 1 if quick else 20 if cuda else 5,
        "repeats": 3 if quick else 5,
        "warmup": 1 if quick else 5,
        "configs": CUDA_CONFIGS if cuda and not quick else SMALL_CONFIGS,
        "dtypes": ["bf16"] if cuda else ["fp32"],
        "compile": "both" if cuda else "off",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.images < args.batch_size:
        raise UserError(f"--images {args.images} is fewer than one --batch_size {args.batch_size}")
    if not cuda and args.dtypes != ["fp32"]:
        raise UserError("on CPU only --dtypes fp32 applies: kd.inference.make_autocast "
                        "autocasts on CUDA only")


def variants(args: argparse.Namespace) -> list[Variant]:
    """Eager before compiled, so a run cut short still holds the whole eager grid."""
    both = {"off": [False], "on": [True], "both": [False, True]}
    return [Variant(dtype, cl, comp) for comp in both[args.compile] for dtype in args.dtypes
            for cl in reversed(both[args.channels_last])]


def build(config: Config, variant: Variant, device: torch.device
          ) -> tuple[nn.Module, nn.Module | None]:
    """The model that trains or evaluates and, for KD, the frozen teacher, placed as kd.train.fit
    does."""
    model = build_student("cifar") if config.student else build_teacher(config.img_size)
    model.to(device, memory_format=variant.memory_format)
    teacher = None
    if config.kd and not config.cached:
        teacher = build_teacher(config.img_size).to(device, memory_format=variant.memory_format)
        teacher.eval().requires_grad_(False)
    return model, teacher


def autocast_for(variant: Variant, device: torch.device):
    return make_autocast(device, amp=variant.dtype != "fp32", amp_dtype=variant.dtype)


def loader_batches(loader: DeviceLoader, memory_format: torch.memory_format) -> Iterator:
    """The loader's batches epoch after epoch, as kd.train.fit draws them, in the variant's format
    (the loader yields channels_last, so this is a copy only in the channels_last-off variants)."""
    for epoch in itertools.count(1):
        loader.set_epoch(epoch)
        for images, labels, keys in loader:
            yield images.contiguous(memory_format=memory_format), labels, keys


def bench_train(config: Config, variant: Variant, loader: DeviceLoader, args: argparse.Namespace,
                device: torch.device) -> dict:
    """Training steps on one pre-made batch and, for the students, fed by the DeviceLoader."""
    model, teacher = build(config, variant, device)
    model.train()
    train_args = training_args(config.method, args.batch_size)
    train_args.amp, train_args.amp_dtype = variant.dtype != "fp32", variant.dtype
    connector = feature_connector(config, train_args, model, teacher, loader.split)
    trained = nn.ModuleList([model, connector]) if connector else model
    dot = config.optimizer == "dot"
    opt = make_optimization(train_args, trained, 10**6, device,
                            dot_delta=DOT_DELTA if dot else None)
    loss_fn = METHODS[config.method].loss_at(train_args, 1) if config.kd else ce_loss
    if variant.compile:  # as kd.train.fit compiles (DOT's loss stays eager)
        model, loss_fn = torch.compile(model), loss_fn if dot else torch.compile(loss_fn)
        teacher = torch.compile(teacher) if teacher is not None else None
    teacher_logits = None  # as kd.train.fit hands them to train_step
    if config.cached:  # random logits: the lookup costs the same
        table = torch.randn(len(loader.split), NUM_VIEWS, NUM_CLASSES, device=device).half()
        teacher_logits = TeacherCache({}, table, device)
    elif teacher is not None:
        teacher_logits = lambda images, keys: teacher(images)
    step = Step(model, teacher_logits, loss_fn, opt, connector)

    def stepper(batches: Iterator) -> Callable[[], None]:
        return lambda: train_step(step, *next(batches))

    images, labels, keys = next(iter(loader))
    premade = itertools.repeat((images.contiguous(memory_format=variant.memory_format), labels,
                                keys))
    blocks = {"calls_per_block": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "device": device}
    timing = measure(stepper(premade), **blocks)
    row = {"config": config.name, **asdict(variant), "img_per_s": args.batch_size / timing.seconds}
    if variant.compile:
        row["compile_s"] = timing.first_s - timing.seconds
    if connector is not None:
        row["connector_params"] = sum(p.numel() for p in connector.parameters())
        row["nce_k"] = getattr(connector, "nce_k", None)  # a memory bank's negatives
    if config.student:
        fed = measure(stepper(loader_batches(loader, variant.memory_format)), **blocks)
        row["loader_img_per_s"] = args.batch_size / fed.seconds
        row["input_cost_pct"] = 100 * (fed.seconds / timing.seconds - 1)
    return row


def training_args(method: str, batch_size: int) -> argparse.Namespace:
    """The settings distill_student.py trains with (kd.flags' SGD and schedule at the students'
    STUDENT_RECIPE, the method flags at their defaults), at this batch size, without warm-up."""
    p = base_parser("", out_dir="", **STUDENT_RECIPE)
    add_method_flags(p)
    return p.parse_args(["--warmup_epochs", "0", "--batch_size", str(batch_size), "--method",
                         method])


def feature_connector(config: Config, train_args: argparse.Namespace, model: nn.Module,
                      teacher: nn.Module | None, split: Split) -> nn.Module | None:
    """A feature method's connector as distill_student.py builds it at its defaults, on the
    model's device, for a training file of CIFAR-100's 50,000 images (the split's, repeated;
    labels in turn), or the split's size when larger (a memory bank has a row per training
    image)."""
    method = METHODS[config.method]
    if method.connector is None:
        return None
    position = torch.arange(max(TRAIN_IMAGES, len(split)), device=split.images.device)
    labels = position % NUM_CLASSES
    train = Split(split.images[position % len(split)], labels, labels // 5, split.classes)
    device = next(model.parameters()).device
    return method.connector(train_args, model, teacher, train).to(device)


def bench_eval(config: Config, variant: Variant, loader: DeviceLoader, args: argparse.Namespace,
               device: torch.device) -> dict:
    """Evaluation passes as a single-process kd.train.fit runs them after each epoch: predict, then
    the metrics, with the model compiled the same way.

    Their one read of the metrics comes at the end of the pass, i.e. at the end of the timed block.
    The eval loader's batches are channels_last in every variant, as in kd.train.fit; the variant
    sets the model's format.
    """
    model, _ = build(config, variant, device)
    eval_model = torch.compile(model) if variant.compile else model
    autocast = autocast_for(variant, device)
    split = loader.split
    class_to_coarse = fine_to_coarse(split.labels, split.coarse_labels)

    def evaluate() -> None:
        logits = predict(eval_model, loader, autocast)
        split_metrics(logits, split.labels, split.coarse_labels, class_to_coarse)
    timing = measure(evaluate, repeats=args.repeats, device=device)
    row = {"config": config.name, **asdict(variant),
           "img_per_s": len(loader.split) / timing.seconds}
    if variant.compile:
        row["compile_s"] = timing.first_s - timing.seconds
    return row


COLUMNS = f"{'config':<17} {'dtype':<5} {'memory':<6} {'mode':<8} {'img/s':>9} " \
          f"{'loader img/s':>12} {'input cost':>10} {'compile s':>9}"


def format_row(row: dict) -> str:
    loader = f"{row['loader_img_per_s']:,.0f}" if "loader_img_per_s" in row else "-"
    cost = f"{row['input_cost_pct']:+.1f}%" if "input_cost_pct" in row else "-"
    compile_s = f"{row['compile_s']:.1f}" if "compile_s" in row else "-"
    return (f"{row['config']:<17} {row['dtype']:<5} {'CL' if row['channels_last'] else 'NCHW':<6} "
            f"{'compiled' if row['compile'] else 'eager':<8} {row['img_per_s']:>9,.1f} "
            f"{loader:>12} {cost:>10} {compile_s:>9}")


def print_header(report: dict, args: argparse.Namespace, device: torch.device) -> None:
    print(f"device: {report['device']}   torch {report['torch']}")
    print(f"host: {os.cpu_count()} cores, load average {report['load_average']:.1f} "
          f"(other work on them slows CPU runs and CUDA kernel launches)")
    print(f"random uint8 images (not CIFAR-100): {args.images:,} train, batch {args.batch_size}, "
          f"eval batch {args.eval_batch_size}; timed blocks of {args.steps} step(s), median of "
          f"{args.repeats}, after {args.warmup} warm-up step(s)")
    print(f"dtypes {','.join(args.dtypes)}, compile {args.compile}, channels_last "
          f"{args.channels_last}, cudnn.benchmark {args.cudnn_benchmark}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    fill_defaults(args, cuda=device.type == "cuda")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    report = {"device": device_name(device), "device_type": device.type,
              "torch": str(torch.__version__), "load_average": os.getloadavg()[0],
              "flags": vars(args), "data": None, "train": [], "eval": []}
    save = (lambda: write_json(args.json, report)) if args.json else (lambda: None)
    print_header(report, args, device)

    split = random_split(args.images)
    train_loader = DeviceLoader(split, args.batch_size, device, train=True, seed=0)
    # no padded batch
    n_eval = max(1, args.images // 5 // args.eval_batch_size) * args.eval_batch_size
    eval_loader = DeviceLoader(random_split(n_eval, seed=1), args.eval_batch_size, device,
                               train=False)
    report["data"] = bench_data(split, train_loader, args, device)
    print_data(report["data"])
    report["cache_build"] = bench_cache_build(split, args, device)
    print(f"\nteacher cache build, teacher at {report['cache_build']['img_size']} px in "
          f"{report['cache_build']['precision']}: "
          f"{report['cache_build']['views_per_s']:,.0f} views/s")
    save()

    print("\nimg/s: training on one pre-made batch, or evaluation passes; loader img/s: the same "
          "steps fed by DeviceLoader;\ninput cost: extra step time with the loader\n" + COLUMNS,
          flush=True)
    for variant in variants(args):
        for config in (CONFIGS[name] for name in args.configs):
            if config.optimizer == "dot" and variant.dtype == "fp16":
                continue  # DOT refuses the fp16 gradient scaler (kd.optim.make_optimization)
            if variant.compile:
                # else each new model recompiles the same code, past dynamo's limit
                torch._dynamo.reset()
            bench = bench_train if config.train else bench_eval
            row = bench(config, variant, train_loader if config.train else eval_loader, args,
                        device)
            report["train" if config.train else "eval"].append(row)
            print(format_row(row), flush=True)
            save()
    print_ratios(report)
    save()


def print_ratios(report: dict) -> None:
    """KD with the cache and each other method (or optimizer) against the CE step (the cache's
    targets: 0.87x on CPU, 0.9x on CUDA), and the other methods against online KD with the same
    teacher, per variant."""
    rows = {(r["config"], r["dtype"], r["channels_last"], r["compile"]): r for r in report["train"]}
    for (name, *variant), row in rows.items():
        for base in ("student_ce", "kd_t32"):
            other = rows.get((base, *variant))
            method = name in METHOD_CONFIGS
            if other and (method or (name, base) == ("kd_cached", "student_ce")):
                row[f"vs_{base}"] = row["img_per_s"] / other["img_per_s"]
                extra = f", connector {row['connector_params'] / 1e6:.2f} M parameters" \
                    if "connector_params" in row else ""
                print(f"{name} / {base} ({'/'.join(map(str, variant))}): "
                      f"{row[f'vs_{base}']:.2f}x its img/s{extra}", flush=True)


if __name__ == "__main__":
    run_script(main)

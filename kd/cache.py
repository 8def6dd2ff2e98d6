"""An exact cache of the teacher's logits for every training view: KD at the cost of plain training.

Training augments each image with one of NUM_VIEWS = 9 x 9 x 2 = 162 views: a 32 px crop at
offset (dy, dx) of the 4-pixel zero-padded 40 x 40 image, then a horizontal flip or not
(kd.data). The cache stores the frozen teacher's logits for all of them, [N, 162, 100] fp16
(float32 if a logit passes fp16's range), indexed by the image's position in the training file,
so a KD run looks up the very view the student trains on; --val_size does not change it.

    python -m kd.cache --teacher_ckpt runs/teacher_resnet50/best.pt --out runs/teacher_cache.pt
    python distill_student.py --teacher_cache runs/teacher_cache.pt ...   # built there if missing

The file's header says what it is valid for (teacher checkpoint and training file SHA-256, the
teacher's input size and precision, normalisation, padding); a cache that does not match the
run, or that disagrees with the live teacher on a sample of views, is refused with one line.
"""
import argparse
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from kd.checkpoint import atomic_write, file_sha256
from kd.data import (CIFAR100_MEAN, CIFAR100_STD, FOLDER, NUM_VIEWS, PAD, Split, load_split,
                     normalize, view_pixels)
from kd.distributed import World, gather_rows, init_world, local_main_first, shard_range
from kd.errors import StopRequested, UserError, run_script, stop_requested
from kd.flags import Parser, add_data_flags, add_device_flag, add_precision_flags
from kd.models import NUM_CLASSES, load_teacher
from kd.inference import MEMORY_FORMAT, make_autocast

FORMAT = 1
FP16_MAX = torch.finfo(torch.float16).max
SPOT_CHECK_VIEWS = 256


@dataclass
class TeacherCache:
    """The teacher's logits of every training view, [images, NUM_VIEWS, classes], and what they
    are valid for. `logits` lives on the training device when it fits there, else in host memory."""

    header: dict
    logits: torch.Tensor
    device: torch.device  # where training needs the looked-up logits

    def __call__(self, images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of a training batch, by the view keys kd.data.DeviceLoader yields
        with it (image index * NUM_VIEWS + view); images are not looked at."""
        table = self.logits.view(-1, self.logits.shape[-1])
        if table.device == keys.device:
            return table.index_select(0, keys)
        rows = table.index_select(0, keys.cpu())  # host memory: one sync per step
        return rows.to(self.device, non_blocking=True)


def view_logits(cache: TeacherCache, index: int, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """float32 logits [classes] of training image `index` (its position in the training file),
    cropped at offset (dy, dx) of the padded 40 x 40 image, then flipped when `flip`."""
    return cache.logits[index, (dy * (2 * PAD + 1) + dx) * 2 + int(flip)].float()


def expected_header(teacher: nn.Module, teacher_ckpt: str, data_dir: str, num_images: int,
                    precision: str) -> dict:
    """What a cache for this teacher, this training file and this precision must say it holds."""
    return {"format": FORMAT, "teacher_sha256": file_sha256(teacher_ckpt),
            "train_sha256": file_sha256(os.path.join(data_dir, FOLDER, "train")),
            "img_size": teacher.img_size, "precision": precision, "mean": list(CIFAR100_MEAN),
            "std": list(CIFAR100_STD), "pad": PAD, "views": NUM_VIEWS, "images": num_images,
            "classes": NUM_CLASSES}


def precision_name(autocast) -> str:
    """'float32', or the autocast dtype ('bfloat16', 'float16') the teacher runs in."""
    if autocast is contextlib.nullcontext:
        return "float32"
    return str(autocast.keywords["dtype"]).removeprefix("torch.")


@torch.inference_mode()
def teacher_view_logits(teacher: nn.Module, pixels: torch.Tensor, views: torch.Tensor,
                        autocast) -> torch.Tensor:
    """float32 logits of the given views of uint8 images [n, 3, 32, 32], as training feeds them."""
    x = normalize(view_pixels(pixels, views)).contiguous(memory_format=MEMORY_FORMAT)
    with autocast():
        return teacher(x).float()


def build(teacher: nn.Module, train: Split, autocast, world: World, *, batch_views: int = 1296,
          show_progress: bool = True) -> torch.Tensor:
    """[images, NUM_VIEWS, classes] logits of every view (fp16, or float32 when a logit passes
    fp16's range), on the device. Under torchrun each rank computes a shard and all gather.
    A stop signal stops a one-process build at the next batch (StopRequested): nothing is
    written, so there is nothing to resume."""
    start, end = shard_range(len(train), world.rank, world.size)
    per_batch = max(1, batch_views // NUM_VIEWS)
    shard = torch.empty(end - start, NUM_VIEWS, NUM_CLASSES, dtype=torch.float16,
                        device=train.images.device)
    views = torch.arange(NUM_VIEWS, device=shard.device)
    bar = tqdm(total=len(shard) * NUM_VIEWS, unit="views", unit_scale=True, desc="teacher cache",
               disable=not (show_progress and world.is_main), dynamic_ncols=True)
    for first in range(0, len(shard), per_batch):
        if world.size == 1 and stop_requested():  # shards differ in batches: ranks can't agree
            raise StopRequested("the teacher cache was not written; the same command builds it")
        images = train.images[start + first:min(start + first + per_batch, end)]
        pixels = images.repeat_interleave(NUM_VIEWS, dim=0)
        logits = teacher_view_logits(teacher, pixels, views.repeat(len(images)), autocast)
        if not torch.isfinite(logits).all():
            raise UserError("the teacher gives non-finite logits on some training views; "
                            "it cannot be cached (nor distilled from)")
        if shard.dtype == torch.float16 and logits.abs().max() > FP16_MAX:
            shard = shard.float()  # exact for what is stored so far
        shard[first:first + len(images)] = logits.view(len(images), NUM_VIEWS, -1)
        bar.update(logits.shape[0])
    bar.close()
    if world.size > 1:  # every rank stores fp16 unless any of them needs float32
        wide = torch.tensor(float(shard.dtype == torch.float32), device=shard.device)
        torch.distributed.all_reduce(wide, op=torch.distributed.ReduceOp.MAX)
        shard = shard.float() if wide.item() else shard
    return gather_rows(shard, len(train), world)


def load_cache(path: str) -> TeacherCache:
    """The cache file at path (header and logits, memory-mapped on the CPU), or a UserError."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"{path} is not a complete teacher cache ({type(e).__name__}); delete it "
                        f"to build it again") from None
    header, logits = (blob.get("header"), blob.get("logits")) if isinstance(blob, dict) else (0, 0)
    if not isinstance(header, dict) or not isinstance(logits, torch.Tensor) or \
            logits.shape != (header.get("images"), NUM_VIEWS, NUM_CLASSES):
        raise UserError(f"{path} is not a teacher cache written by kd.cache")
    return TeacherCache(header, logits, torch.device("cpu"))


def check_header(cache: TeacherCache, expected: dict, path: str) -> None:
    wrong = [f"{k} {cache.header.get(k)!r} (this run: {v!r})" for k, v in expected.items()
             if cache.header.get(k) != v]
    if wrong:
        raise UserError(f"the teacher cache {path} was built for another setting: "
                        f"{'; '.join(wrong)}. Point --teacher_cache to a new file to build one")


def spot_check(cache: TeacherCache, teacher: nn.Module, train: Split, autocast, path: str) -> None:
    """Recompute SPOT_CHECK_VIEWS random views with the live teacher; refuse the cache if any
    logit differs by more than fp16 storage and the teacher's precision explain, relative to the
    largest logit of its row (another view's logits differ on the scale of that row)."""
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, len(train), (SPOT_CHECK_VIEWS,), generator=g)
    views = torch.randint(0, NUM_VIEWS, (SPOT_CHECK_VIEWS,), generator=g)
    live = teacher_view_logits(teacher, train.images[index.to(train.images.device)],
                               views.to(train.images.device), autocast).cpu()
    cached = cache.logits[index, views].cpu().float()
    eps = {"float32": 2 ** -10, "float16": 2 ** -8, "bfloat16": 2 ** -5}[cache.header["precision"]]
    error = (cached - live).abs() / (live.abs().amax(dim=1, keepdim=True) + 1)
    if error.max() > eps:
        bad = int((error > eps).any(dim=1).sum())
        raise UserError(f"the teacher cache {path} disagrees with the live teacher on {bad} of "
                        f"{SPOT_CHECK_VIEWS} views (largest relative error {error.max():.2g}); "
                        f"delete it to build it again")


def open_cache(path: str, teacher: nn.Module, args: argparse.Namespace, device: torch.device
               ) -> TeacherCache:
    """The teacher cache at path for this teacher and training data, built there first when the
    file does not exist; checked against the header the run expects and against the live
    teacher; its logits on `device` when they fit there. The frozen teacher must be on device.
    args: the teacher's --teacher_ckpt, the data's --data_dir and --download, the teacher's
    precision --amp and --amp_dtype (kd.cache's and distill_student.py's flags alike)."""
    world = World.from_env()
    autocast = make_autocast(device, amp=args.amp, amp_dtype=args.amp_dtype)
    with local_main_first(world, device):
        train = load_split(args.data_dir, train=True, download=args.download).to(device)
    expected = expected_header(teacher, args.teacher_ckpt, args.data_dir, len(train),
                               precision_name(autocast))
    if not os.path.exists(path):
        logits = build(teacher, train, autocast, world)
        if world.is_main:
            blob = {"header": expected, "logits": logits.cpu()}
            atomic_write(path, lambda f: torch.save(blob, f))
            print(f"teacher cache written to {path}")
            del blob
        del logits
        if world.size > 1:
            torch.distributed.barrier()
    cache = load_cache(path)
    check_header(cache, expected, path)
    spot_check(cache, teacher, train, autocast, path)
    nbytes = cache.logits.numel() * cache.logits.element_size()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what the build reserved is free for the cache
    fits = device.type == "cpu" or torch.cuda.mem_get_info(device)[0] > nbytes + (4 << 30)
    cache.logits = cache.logits.to(device) if fits else cache.logits.pin_memory()
    cache.device = device
    if world.is_main:
        print(f"teacher cache {path}: {nbytes / 1e9:.2f} GB of {cache.logits.dtype} logits in "
              f"{'the memory of ' + str(device) if fits else 'host memory (one gather per step)'}")
    return cache


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kd.cache", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher_ckpt", default="runs/teacher_resnet50/best.pt",
                   help="checkpoint written by train_teacher.py")
    p.add_argument("--out", required=True, help="the cache file to write (must not exist)")
    add_data_flags(p)
    add_device_flag(p)
    add_precision_flags(p)  # the teacher's, as distill_student.py's same flags: one per cache
    return p


def main() -> None:
    args = build_parser().parse_args()
    if os.path.exists(args.out):
        raise UserError(f"{args.out} exists; delete it or pick another --out")
    _, device = init_world(args.device)
    teacher = load_teacher(args.teacher_ckpt).to(device, memory_format=MEMORY_FORMAT)
    open_cache(args.out, teacher, args, device)


if __name__ == "__main__":
    run_script(main)

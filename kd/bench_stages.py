"""kd.bench's data and cache stages: kd.data.DeviceLoader against the usual torchvision pipeline
(PIL crop and flip in DataLoader workers) on the same random images, one augmented epoch each;
and kd.cache.build's views per second."""
import argparse
import os

import torch
from PIL import Image
from torchvision import transforms

from kd.cache import build as build_cache, precision_name
from kd.data import CIFAR100_MEAN, CIFAR100_STD, NUM_VIEWS, DeviceLoader, Split
from kd.distributed import World
from kd.inference import MEMORY_FORMAT, make_autocast
from kd.models import build_teacher
from kd.timing import measure


def random_split(n: int, seed: int = 0) -> Split:
    """n random uint8 images with random fine labels, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (n,), generator=g)
    return Split(images, labels, labels // 5, [f"class_{i}" for i in range(100)])


class PILDataset(torch.utils.data.Dataset):
    """The usual torchvision CIFAR pipeline: each item becomes a PIL image, then is transformed."""

    def __init__(self, split: Split):
        # HWC, as torchvision's CIFAR100
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = split.labels.tolist()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def bench_data(split: Split, loader: DeviceLoader, args: argparse.Namespace,
               device: torch.device) -> dict:
    """One augmented epoch through each pipeline, ending with the batch on the device.

    The reference keeps its workers between epochs (persistent_workers) and warms up for one
    epoch, so worker start-up is not counted against it; they stop when this returns.
    """
    def device_epoch() -> None:
        for _ in loader:
            pass

    workers = os.cpu_count() or 1
    reference = torch.utils.data.DataLoader(
        PILDataset(split), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=True)

    def reference_epoch(batches: torch.utils.data.DataLoader) -> None:
        for images, labels in batches:
            images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    epoch_images = len(loader) * args.batch_size
    ours = epoch_images / measure(device_epoch, repeats=args.repeats, device=device).seconds
    theirs = epoch_images / measure(lambda: reference_epoch(reference), repeats=args.repeats,
                                    device=device).seconds
    return {"images": len(split), "batch_size": args.batch_size, "device_loader_img_per_s": ours,
            "torchvision_img_per_s": theirs, "torchvision_workers": workers, "ratio": ours / theirs}


def print_data(data: dict) -> None:
    print(f"\ndata: one augmented epoch of {data['images']:,} images, batch {data['batch_size']}")
    print(f"  {'kd.data.DeviceLoader':<44} {data['device_loader_img_per_s']:>12,.0f} img/s")
    name = f"torchvision DataLoader, PIL, {data['torchvision_workers']} workers"
    print(f"  {name:<44} {data['torchvision_img_per_s']:>12,.0f} img/s")
    print(f"  {'ratio':<44} {data['ratio']:>12,.1f} x", flush=True)


def bench_cache_build(split: Split, args: argparse.Namespace, device: torch.device) -> dict:
    """Views/s of kd.cache.build: the teacher on every view of a few images, in the first dtype."""
    img_size = 224 if device.type == "cuda" else 32
    teacher = build_teacher(img_size).to(device, memory_format=MEMORY_FORMAT).eval()
    n = 128 if device.type == "cuda" and not args.quick else 4
    images = Split(split.images[:n], split.labels[:n], split.coarse_labels[:n],
                   split.classes).to(device)
    dtype = args.dtypes[0]
    autocast = make_autocast(device, amp=dtype != "fp32", amp_dtype=dtype)
    timing = measure(lambda: build_cache(teacher, images, autocast, World(), show_progress=False),
                     repeats=args.repeats, device=device)
    return {"img_size": img_size, "precision": precision_name(autocast), "images": n,
            "views_per_s": n * NUM_VIEWS / timing.seconds}

"""CIFAR-100 on the training device: load once, then shuffle, crop, flip and normalise in batches.

The whole split lives on the device as uint8 (50,000 x 3 x 32 x 32 = 154 MB), so there are no
DataLoader workers, no PIL and no host-device copies inside the training loop.
"""
import functools
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from kd.distributed import World, shard_range
from kd.errors import UserError

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
PAD = 4
NUM_VIEWS = (2 * PAD + 1) ** 2 * 2  # 162: a crop at one of 9 x 9 offsets, flipped or not
FOLDER = "cifar-100-python"


@dataclass
class Split:
    """One CIFAR-100 split: uint8 images [N, 3, 32, 32], int64 fine and coarse labels [N], and
    each image's position in its file (what the teacher cache is indexed by)."""

    images: torch.Tensor
    labels: torch.Tensor
    coarse_labels: torch.Tensor
    classes: list[str]
    file_index: torch.Tensor | None = None  # None: 0..N-1

    def __post_init__(self):
        if self.file_index is None:
            self.file_index = torch.arange(len(self.labels), device=self.labels.device)

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device),
                     self.coarse_labels.to(device), self.classes, self.file_index.to(device))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and refuses every other global.

    The CIFAR files are pickles; this keeps a tampered file from running code when it is read.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _read_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read CIFAR-100 file {path} ({e}); "
                        f"delete {os.path.dirname(path)} to download it again")


def download_cifar100(root: str) -> None:
    """Fetch and unpack CIFAR-100 into root with torchvision's checksum-verified download."""
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR100.url, root, filename=CIFAR100.filename,
                                     md5=CIFAR100.tgz_md5)
    except Exception as e:  # urllib, tarfile and checksum failures all land here
        raise UserError(f"could not download CIFAR-100 into {root} ({e}); "
                        f"put cifar-100-python/ there by hand")


def load_cifar100(root: str, *, train: bool, download: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Read one split from root/cifar-100-python: uint8 images [N,3,32,32], fine labels [N],
    coarse labels [N] (int64) and the 100 fine class names. Downloads first when asked and missing.
    """
    folder = os.path.join(root, FOLDER)
    complete = all(os.path.isfile(os.path.join(folder, f)) for f in ("train", "test", "meta"))
    if download and not complete:
        download_cifar100(root)
    elif not complete:
        raise UserError(f"no complete CIFAR-100 in {folder} (train, test, meta); "
                        f"point --data_dir to it, or drop --no-download")
    batch = _read_pickle(os.path.join(folder, "train" if train else "test"))
    meta = _read_pickle(os.path.join(folder, "meta"))
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        labels = torch.tensor(batch["fine_labels"], dtype=torch.int64)
        coarse = torch.tensor(batch["coarse_labels"], dtype=torch.int64)
        classes = list(meta["fine_label_names"])
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"CIFAR-100 files in {folder} are malformed ({e!r}); delete the folder to "
                        f"download them again")
    if not (len(images) == len(labels) == len(coarse)) or len(classes) != 100:
        raise UserError(f"CIFAR-100 files in {folder} are inconsistent; delete the folder to "
                        f"download them again")
    if labels.min() < 0 or labels.max() >= 100 or coarse.min() < 0 or coarse.max() >= 20:
        raise UserError(f"CIFAR-100 labels in {folder} are out of range; delete the folder to "
                        f"download them again")
    return images, labels, coarse, classes


def load_split(root: str, *, train: bool, download: bool = False) -> Split:
    return Split(*load_cifar100(root, train=train, download=download))


def hold_out(split: Split, n: int, seed: int) -> tuple[Split, Split]:
    """Split off a seeded, class-balanced validation set of n images (n/100 per class).

    Returns (train, val); the val images are removed from train.
    """
    num_classes = len(split.classes)
    if n % num_classes:
        raise UserError(f"--val_size must be a multiple of {num_classes} (one share per class)")
    per_class = n // num_classes
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator)
    ranks = torch.zeros(len(split), dtype=torch.int64)  # rank of each image within its class
    for c in range(num_classes):
        members = order[split.labels[order] == c]
        if len(members) <= per_class:
            raise UserError(f"--val_size {n} leaves no training image of class {c}")
        ranks[members] = torch.arange(len(members))
    is_val = ranks < per_class
    pick = lambda mask: Split(split.images[mask], split.labels[mask],
                              split.coarse_labels[mask], split.classes, split.file_index[mask])
    return pick(~is_val), pick(is_val)


def derive_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """The seed of one epoch's random draws, from --seed, the epoch and the process rank alone.

    rank=None: the stream every process shares (data order and augmentation); rank r: that
    process's own stream (dropout). A run's randomness is then a function of where it is, not of
    its history, so a resumed run needs no saved RNG state to continue exactly.
    """
    if rank is None:
        return seed * 1_000_003 + epoch
    return seed * 1_000_003 + epoch * 65_537 + rank


def draw_views(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random view per image: view = (dy * 9 + dx) * 2 + flip, dy and dx in 0..2*PAD."""
    offsets = torch.randint(0, 2 * PAD + 1, (2, n), generator=generator, device=device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device)
    return (offsets[0] * (2 * PAD + 1) + offsets[1]) * 2 + flip


def view_grids(views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column index grids [n, 32] of each view into the padded 40 x 40 image:
    rows = dy + 0..31, cols = dx + 0..31, reversed when the view is flipped."""
    ramp = torch.arange(32, device=views.device)
    offset, flip = views // 2, (views % 2).bool()[:, None]
    rows = (offset // (2 * PAD + 1))[:, None] + ramp
    cols = (offset % (2 * PAD + 1))[:, None] + torch.where(flip, 31 - ramp, ramp)
    return rows, cols


def view_pixels(images: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """The given views of uint8 images [n, 3, 32, 32]: crop of the zero-padded image, then flip."""
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    rows, cols = view_grids(views)
    n = torch.arange(len(images), device=images.device)[:, None, None]
    return padded[n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


@functools.cache
def _scale_and_shift(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(CIFAR100_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CIFAR100_STD, device=device).view(1, 3, 1, 1) * 255
    return 1 / std, -mean / std


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per channel, as one fused multiply-add, float32."""
    scale, shift = _scale_and_shift(images_uint8.device)
    return torch.addcmul(shift, images_uint8.float(), scale)


class DeviceLoader:
    """Batches of one split, already on `device`.

    Train mode: a seeded shuffle per epoch (the permutation of epoch e depends only on seed and e,
    so a resumed run sees the same batches), per-image random crop from the 4-pixel zero-padded
    image and a random horizontal flip, all in one gather; the last partial batch is dropped.
    Eval mode: every image once, in order. Yields (images float [B,3,32,32] normalised,
    channels_last in memory; fine labels [B]; view keys [B]: file_index * NUM_VIEWS + view, which
    name the exact view each image is (kd.cache looks the teacher's logits up by them), None in
    eval mode).

    With world.size > 1 (DistributedDataParallel) batch_size is the global batch: every rank
    draws the same permutation and augmentation and takes its own slice of each global batch, so
    the data seen per step is the same for any number of processes. In eval mode each rank takes
    a contiguous shard (shard_range) and the split stays whole for the metrics.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device | str, *, train: bool,
                 seed: int = 0, world: World = World()):
        self.device = torch.device(device)
        self.split = split.to(self.device)
        self.global_batch_size = batch_size if train else batch_size * world.size
        self.batch_size = batch_size // world.size if train else batch_size
        self.rank = world.rank
        self.shard = shard_range(len(split), world.rank, world.size)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.generator = torch.Generator(device=self.device)
        if train:  # padded once, pixels as rows: a batch is one index_select (shuffle, crop, flip)
            padded = torch.nn.functional.pad(self.split.images, (PAD,) * 4)
            self.pixels = padded.permute(0, 2, 3, 1).reshape(-1, 3)  # [N * 40 * 40, 3]

    def __len__(self) -> int:
        if self.train:
            return len(self.split) // self.global_batch_size
        return -(-(self.shard[1] - self.shard[0]) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return self._train_batches() if self.train else self._eval_batches()

    def _train_batches(self):
        self.generator.manual_seed(derive_seed(self.seed, self.epoch))
        n = len(self.split)
        order = torch.randperm(n, generator=self.generator, device=self.device)
        views = draw_views(n, self.generator, self.device)
        rows, cols = view_grids(views)
        for start in range(0, n - self.global_batch_size + 1, self.global_batch_size):
            first = start + self.rank * self.batch_size
            idx = order[first:first + self.batch_size]
            side = 32 + 2 * PAD
            pixel = ((idx[:, None, None] * side + rows[idx][:, :, None]) * side
                     + cols[idx][:, None, :])
            crops = self.pixels.index_select(0, pixel.view(-1)).view(len(idx), 32, 32, 3)
            keys = self.split.file_index[idx] * NUM_VIEWS + views[idx]
            yield normalize(crops.permute(0, 3, 1, 2)), self.split.labels[idx], keys

    def _eval_batches(self):
        images = self.split.images.contiguous(memory_format=torch.channels_last)
        for start in range(*self.shard, self.batch_size):
            end = min(start + self.batch_size, self.shard[1])
            yield normalize(images[start:end]), self.split.labels[start:end], None

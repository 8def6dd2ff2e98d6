"""A small made-up dataset written in the exact CIFAR-100 file format, for tests and the CPU demo.

It is NOT CIFAR-100: each class is a random 8x8 colour pattern (classes of one superclass share
a base pattern) upsampled to 32x32, plus per-image noise and a random shift, so it is learnable
in a few epochs. Images come in blocks of 100, one of each class in a random order, each block
drawn from its own seed: for one --seed, a smaller training set is the start of a larger one,
and the test split and the class patterns are the same whatever the sizes (the demo's teacher
trains on a superset of its students' images).
Usage: python -m kd.synthetic --out data_demo [--train 5000 --test 1000]
"""
import argparse
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from kd.data import FOLDER

BLOCK = 100  # images per block: one of each class
SPLITS = {"train": 0, "test": 1}  # each split's seeds: [seed, split, block]


def make_prototypes(rng: np.random.Generator) -> np.ndarray:
    """[100, 3, 40, 40] smooth class patterns in [0, 1]; the 5 classes of a superclass look
    alike."""
    superclass_base = rng.uniform(0, 1, (20, 3, 8, 8))
    class_detail = rng.uniform(0, 1, (100, 3, 8, 8))
    prototypes = 0.6 * superclass_base[np.arange(100) // 5] + 0.4 * class_detail
    return F.interpolate(torch.from_numpy(prototypes), size=(40, 40), mode="bilinear").numpy()


def make_images(labels: np.ndarray, big: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 3072] rows (CIFAR's layout: R plane, G plane, B plane, row-major)."""
    shifts = rng.integers(0, 9, (len(labels), 2))
    images = np.stack([big[c, :, dy:dy + 32, dx:dx + 32] for c, (dy, dx) in zip(labels, shifts)])
    images = images + rng.normal(0, 0.15, images.shape)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8).reshape(len(labels), -1)


def make_split(n: int, split: str, prototypes: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """The first n images of a split and their fine labels, block by block."""
    labels, images = [], []
    for block in range(-(-n // BLOCK)):
        rng = np.random.default_rng([seed, SPLITS[split], block])
        fine = rng.permutation(BLOCK)
        keep = n - block * BLOCK  # the whole block is drawn, so its start is the same however cut
        labels.append(fine[:keep])
        images.append(make_images(fine, prototypes, rng)[:keep])
    return np.concatenate(labels), np.concatenate(images)


def write_fake_cifar100(root: str, n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> None:
    """Write root/cifar-100-python/{train,test,meta} as pickles with the real files' keys."""
    folder = os.path.join(root, FOLDER)
    os.makedirs(folder, exist_ok=True)
    prototypes = make_prototypes(np.random.default_rng(seed))
    for name, n in (("train", n_train), ("test", n_test)):
        fine, data = make_split(n, name, prototypes, seed)
        batch = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                 "data": data}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"fine_label_names": [f"class_{i:02d}" for i in range(100)],
            "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)]}
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data_demo", help="folder to write cifar-100-python/ into")
    p.add_argument("--train", type=int, default=5000,
                   help="training images (a smaller set is the start of a larger one)")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the patterns and noise")
    args = p.parse_args()
    write_fake_cifar100(args.out, args.train, args.test, args.seed)
    print(f"wrote a synthetic (not CIFAR-100) dataset to {args.out}/{FOLDER}")


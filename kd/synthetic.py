"""A small made-up dataset written in the exact CIFAR-100 file format, for tests and the CPU demo.

It is NOT CIFAR-100: each class is a random 8x8 colour pattern (classes of one superclass share
a base pattern) upsampled to 32x32, plus per-image noise and a random shift, so it is learnable
in a few epochs. Usage: python -m kd.synthetic --out data_demo [--train 5000 --test 1000]
"""
import argparse
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from kd.data import FOLDER


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


def write_fake_cifar100(root: str, n_train: int = 5000, n_test: int = 1000, seed: int = 0) -> None:
    """Write root/cifar-100-python/{train,test,meta} as pickles with the real files' keys."""
    folder = os.path.join(root, FOLDER)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    prototypes = make_prototypes(rng)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        rng.shuffle(fine)
        batch = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": f"{name} batch",
                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                 "data": make_images(fine, prototypes, rng)}
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
    p.add_argument("--train", type=int, default=5000, help="training images")
    p.add_argument("--test", type=int, default=1000, help="test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the patterns and noise")
    args = p.parse_args()
    write_fake_cifar100(args.out, args.train, args.test, args.seed)
    print(f"wrote a synthetic (not CIFAR-100) dataset to {args.out}/{FOLDER}")


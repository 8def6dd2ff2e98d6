import os
import pickle

import pytest
import torch

from helpers import RunsCode
from kd.data import (CIFAR100_MEAN, CIFAR100_STD, NUM_VIEWS, PAD, DeviceLoader, Split, derive_seed,
                     load_cifar100, load_split, view_pixels)
from kd.errors import UserError
from kd.synthetic import write_fake_cifar100


def test_load_reads_the_cifar_format(fake_data):
    images, labels, coarse, classes = load_cifar100(fake_data, train=True)
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == coarse.shape == (300,)
    assert labels.dtype == coarse.dtype == torch.int64
    assert torch.equal(coarse, labels // 5)  # how the generator assigns superclasses
    assert len(classes) == 100 and classes[3] == "class_03"
    raw = pickle.load(open(os.path.join(fake_data, "cifar-100-python", "train"), "rb"),
                      encoding="latin1")
    assert torch.equal(images[7].reshape(-1), torch.from_numpy(raw["data"][7]))  # CHW plane order


def test_a_smaller_generated_set_is_the_start_of_a_larger_one(fake_data, tmp_path):
    """The demo's teacher trains on a superset of its students' images, tested on the same
    test split: for one seed, the training sets nest and the test split is the same."""
    write_fake_cifar100(str(tmp_path), n_train=450, n_test=100, seed=0)
    small, large = load_split(fake_data, train=True), load_split(str(tmp_path), train=True)
    assert len(small) == 300 and len(large) == 450
    assert torch.equal(large.images[:300], small.images)
    assert torch.equal(large.labels[:300], small.labels)
    write_fake_cifar100(str(tmp_path / "cut"), n_train=250, n_test=10, seed=0)  # a partial block
    cut = load_split(str(tmp_path / "cut"), train=True)
    assert torch.equal(cut.images, large.images[:250])
    assert torch.equal(cut.labels, large.labels[:250])
    assert torch.equal(load_split(str(tmp_path), train=False).images,
                       load_split(fake_data, train=False).images)
    assert sorted(torch.bincount(large.labels, minlength=100).tolist()) == [4] * 50 + [5] * 50
    write_fake_cifar100(str(tmp_path / "other"), n_train=300, n_test=100, seed=1)
    assert not torch.equal(load_split(str(tmp_path / "other"), train=True).images, small.images)


def test_missing_folder_without_download_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no complete CIFAR-100"):
        load_cifar100(str(tmp_path), train=True, download=False)


def test_corrupted_file_is_a_user_error(fake_data, tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("meta", "test"):
        (folder / name).write_bytes((open(os.path.join(fake_data, "cifar-100-python", name),
                                          "rb")).read())
    (folder / "train").write_bytes(b"\x80\x02}q\x00(X\x04")  # truncated pickle
    with pytest.raises(UserError, match="cannot read"):
        load_cifar100(str(tmp_path), train=True)


def test_pickle_that_runs_code_is_refused(fake_data, tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("meta", "test"):
        (folder / name).write_bytes(open(os.path.join(fake_data, "cifar-100-python", name),
                                         "rb").read())
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(pickle.dumps({"data": RunsCode(marker)}, protocol=2))
    with pytest.raises(UserError, match="system is not allowed"):
        load_cifar100(str(tmp_path), train=True)
    assert not marker.exists()


def tiny_split(n=10):
    images = torch.arange(n * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8)
    images = images.reshape(n, 3, 32, 32)
    labels = torch.arange(n)
    return Split(images, labels, labels // 5, [str(i) for i in range(100)])


def unnormalize(loader, x):
    std, mean = torch.tensor(CIFAR100_STD).view(3, 1, 1), torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
    return (x * std * 255 + mean * 255).round().to(torch.uint8)


def test_train_batches_are_crops_and_flips_of_the_padded_image():
    split = tiny_split()
    loader = DeviceLoader(split, batch_size=5, device="cpu", train=True, seed=1)
    padded = torch.nn.functional.pad(split.images, (PAD,) * 4)
    found_flip = False
    for x, y, keys in loader:
        assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(keys // NUM_VIEWS, y)  # tiny_split: label i at file position i
        crops = unnormalize(loader, x)
        assert torch.equal(crops, view_pixels(split.images[y], keys % NUM_VIEWS))
        for crop, label in zip(crops, y):
            windows = [padded[label, :, dy:dy + 32, dx:dx + 32]
                       for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)]
            plain = any(torch.equal(crop, w) for w in windows)
            flipped = any(torch.equal(crop, w.flip(-1)) for w in windows)
            assert plain or flipped
            found_flip |= flipped and not plain
    assert found_flip


def test_augmentation_draws_per_image_and_is_seeded():
    split = Split(torch.zeros(64, 3, 32, 32, dtype=torch.uint8) + 200,
                  torch.zeros(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64), [])
    batches = lambda seed, epoch: _epoch(DeviceLoader(split, 64, "cpu", train=True, seed=seed),
                                         epoch)
    x = batches(0, 1)
    border_rows = (x[:, 0] < 0).sum(dim=(1, 2))  # zero padding shows up as negative values
    assert len(set(border_rows.tolist())) > 3, "every image should get its own crop"
    assert torch.equal(x, batches(0, 1))
    assert not torch.equal(x, batches(0, 2))
    assert not torch.equal(x, batches(1, 1))


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([x for x, _, _ in loader])


def test_train_drops_last_partial_batch_and_shuffles(fake_data):
    split = load_split(fake_data, train=True)
    loader = DeviceLoader(split, 64, "cpu", train=True, seed=0)
    labels = [y for _, y, _ in loader]
    assert len(loader) == len(labels) == 300 // 64
    assert all(len(y) == 64 for y in labels)
    assert not torch.equal(torch.cat(labels), split.labels[:64 * 4])


def test_eval_sees_every_image_once_in_order(fake_data):
    split = load_split(fake_data, train=False)
    loader = DeviceLoader(split, 32, "cpu", train=False)
    xs, ys = zip(*[(x, y) for x, y, _ in loader])
    assert len(loader) == len(xs) == 4 and len(xs[-1]) == 100 - 96
    assert torch.equal(torch.cat(ys), split.labels)
    assert torch.equal(unnormalize(loader, torch.cat(xs)), split.images)


def test_every_seed_epoch_and_rank_gets_its_own_stream():
    seeds = [derive_seed(seed, epoch, rank) for seed in range(3) for epoch in range(1, 50)
             for rank in (None, 0, 1, 2, 7)]
    assert len(set(seeds)) == len(seeds)

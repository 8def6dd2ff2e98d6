"""The teacher cache (kd.cache): every view's logits, exactly the view the loader trains on, and
the refusals. A tiny stand-in teacher keeps the build fast; kd.cache only needs a module with
an img_size. tests/test_pipeline.py runs a KD run on a cache against an online one."""
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn

import kd.cache
from helpers import cache_flags
from kd.cache import TeacherCache, load_cache, open_cache, view_logits
from kd.data import CIFAR100_MEAN, CIFAR100_STD, NUM_VIEWS, DeviceLoader, Split, load_split
from kd.errors import StopRequested, UserError
from kd.synthetic import write_fake_cifar100

CPU = torch.device("cpu")


class TinyTeacher(nn.Module):
    """A small convolutional classifier; img_size as the real teacher records it."""

    def __init__(self, img_size: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.img_size = img_size
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(8 * 15 * 15, 100))

    def forward(self, x):
        return self.net(x) * 3


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("cache_data"))
    write_fake_cifar100(root, n_train=24, n_test=10, seed=3)
    return root


@pytest.fixture(scope="module")
def built(small_data, tmp_path_factory):
    """A cache built by open_cache for the tiny teacher, with the stand-in checkpoint file."""
    folder = tmp_path_factory.mktemp("cache")
    ckpt = folder / "teacher.pt"
    ckpt.write_bytes(b"the teacher checkpoint's bytes")
    path = str(folder / "cache.pt")
    teacher = TinyTeacher().eval()
    cache = open_cache(path, teacher, cache_flags(ckpt, small_data), CPU)
    return {"path": path, "ckpt": str(ckpt), "teacher": teacher, "cache": cache}


def raw_train_images(data_dir: str) -> np.ndarray:
    with open(os.path.join(data_dir, "cifar-100-python", "train"), "rb") as f:
        return pickle.load(f, encoding="latin1")["data"].reshape(-1, 3, 32, 32)


def hand_view(raw: np.ndarray, index: int, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """The view built with numpy from the file: pad 4 with zeros, crop at (dy, dx), flip."""
    padded = np.pad(raw[index], ((0, 0), (4, 4), (4, 4)))
    crop = padded[:, dy:dy + 32, dx:dx + 32]
    crop = crop[:, :, ::-1] if flip else crop
    mean, std = np.array(CIFAR100_MEAN)[:, None, None], np.array(CIFAR100_STD)[:, None, None]
    return torch.tensor((crop / 255.0 - mean) / std, dtype=torch.float32)


def test_view_logits_are_the_teacher_on_the_view_built_by_hand(built, small_data):
    raw, teacher = raw_train_images(small_data), built["teacher"]
    cache = load_cache(built["path"])
    assert cache.logits.shape == (24, NUM_VIEWS, 100) and cache.logits.dtype == torch.float16
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        index, dy, dx, flip = (int(torch.randint(0, n, (), generator=g)) for n in (24, 9, 9, 2))
        with torch.no_grad():
            expected = teacher(hand_view(raw, index, dy, dx, bool(flip))[None])[0]
        got = view_logits(cache, index, dy, dx, bool(flip))
        assert torch.allclose(got, expected, rtol=2 ** -10, atol=1e-3), (index, dy, dx, flip)


def test_loader_views_are_the_images_it_yields(small_data):
    """Each batch's view keys name exactly the crop and flip of the images in the batch, indexed
    by position in the training file even when some images are held out."""
    raw = raw_train_images(small_data)
    split = load_split(small_data, train=True)
    kept = torch.arange(24) % 3 != 1  # as kd.data.hold_out keeps them: file_index goes along
    train = Split(split.images[kept], split.labels[kept], split.coarse_labels[kept],
                  split.classes, split.file_index[kept])
    loader = DeviceLoader(train, 5, CPU, train=True, seed=4)
    loader.set_epoch(2)
    for images, labels, keys in loader:
        for image, key in zip(images, keys.tolist()):
            index, view = divmod(key, NUM_VIEWS)
            (dy, dx), flip = divmod(view // 2, 9), view % 2
            assert torch.allclose(image, hand_view(raw, index, dy, dx, bool(flip)), atol=1e-5)


def test_lookup_by_batch_keys(built):
    cache: TeacherCache = built["cache"]
    keys = torch.tensor([0, 161, 162 * 5 + 7, 162 * 23 + 100])
    rows = cache(torch.empty(0), keys)
    for row, key in zip(rows, keys.tolist()):
        index, view = divmod(key, NUM_VIEWS)
        (dy, dx), flip = divmod(view // 2, 9), view % 2
        assert torch.equal(row.float(), view_logits(cache, index, dy, dx, bool(flip)))


def reopen(built, small_data, teacher=None, ckpt=None, data=None):
    return open_cache(built["path"], teacher or built["teacher"],
                      cache_flags(ckpt or built["ckpt"], data or small_data), CPU)


def test_refusals(built, small_data, tmp_path):
    other_ckpt = tmp_path / "other.pt"
    other_ckpt.write_bytes(b"another teacher")
    with pytest.raises(UserError, match="teacher_sha256"):
        reopen(built, small_data, ckpt=str(other_ckpt))
    with pytest.raises(UserError, match="img_size 32 .this run: 64"):
        reopen(built, small_data, teacher=TinyTeacher(img_size=64))
    other_data = str(tmp_path / "data")
    write_fake_cifar100(other_data, n_train=24, n_test=10, seed=4)
    with pytest.raises(UserError, match="train_sha256"):
        reopen(built, small_data, data=other_data)
    with pytest.raises(UserError, match="disagrees with the live teacher"):
        reopen(built, small_data, teacher=TinyTeacher(seed=1).eval())  # same header, other weights


def test_truncated_or_foreign_file_is_refused(built, tmp_path):
    data = open(built["path"], "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="not a complete teacher cache"):
        load_cache(str(tmp_path / "cut.pt"))
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="not a teacher cache"):
        load_cache(str(tmp_path / "ckpt.pt"))


def test_an_interrupted_build_leaves_no_file(small_data, tmp_path):
    class Interrupted(TinyTeacher):
        def forward(self, x):
            raise KeyboardInterrupt
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(KeyboardInterrupt):
        open_cache(str(tmp_path / "c.pt"), Interrupted(), cache_flags(ckpt, small_data), CPU)
    assert os.listdir(tmp_path) == ["t.pt"]


def test_spot_check_catches_swapped_flips(built, small_data, tmp_path):
    """A cache whose flipped and unflipped views are exchanged (an indexing bug) is refused."""
    blob = torch.load(built["path"], weights_only=True)
    blob["logits"] = (blob["logits"].view(24, NUM_VIEWS // 2, 2, 100).flip(2)
                      .reshape(24, NUM_VIEWS, 100))
    torch.save(blob, tmp_path / "swapped.pt")
    with pytest.raises(UserError, match="disagrees with the live teacher"):
        open_cache(str(tmp_path / "swapped.pt"), built["teacher"],
                   cache_flags(built["ckpt"], small_data), CPU)


def test_ctrl_c_stops_a_build_and_writes_nothing(small_data, tmp_path, monkeypatch):
    monkeypatch.setattr(kd.cache, "stop_requested", lambda: True)
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"the teacher checkpoint's bytes")
    with pytest.raises(StopRequested, match="the teacher cache was not written"):
        open_cache(str(tmp_path / "cache.pt"), TinyTeacher().eval(), cache_flags(ckpt, small_data),
                   CPU)
    assert list(tmp_path.iterdir()) == [ckpt]

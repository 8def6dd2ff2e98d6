import contextlib

import pytest
import torch

from kd.data import DeviceLoader, load_split
from kd.engine import Objective, make_optimizer, make_scheduler, predict, train_epoch, warmup_cosine
from kd.errors import UserError
from kd.models import build_student, build_teacher


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)
    assert warmup_cosine(0, 0, 100) == pytest.approx(1.0)


def one_kd_epoch(fake_data, teacher, student):
    loader = DeviceLoader(load_split(fake_data, train=True), 50, True, "cpu", seed=0)
    optimizer = make_optimizer(student, 0.05, 0.9, 5e-4, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, 2, len(loader))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    objective = Objective(student, teacher.eval().requires_grad_(False), alpha=0.5, T=4.0)
    return train_epoch(objective, loader, optimizer, scheduler, scaler, contextlib.nullcontext, 1)


def test_kd_epoch_trains_the_student_and_never_touches_the_teacher(fake_data):
    teacher, student = build_teacher(32), build_student()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    stats = one_kd_epoch(fake_data, teacher, student)
    for k, v in teacher.state_dict().items():  # weights and BatchNorm running stats alike
        assert torch.equal(v, teacher_before[k]), k
    assert not teacher.training
    bn_mean = "features.0.1.running_mean"
    assert not torch.equal(student.state_dict()[bn_mean], student_before[bn_mean])
    assert set(stats) >= {"train_loss", "train_top1", "train_ce", "train_kd", "train_img_per_s"}
    assert stats["train_loss"] == pytest.approx(0.5 * stats["train_ce"] + 0.5 * stats["train_kd"],
                                                rel=1e-4)


def test_predict_covers_every_image_in_order(fake_data):
    split = load_split(fake_data, train=False)
    model = build_student().eval()
    logits = predict(model, DeviceLoader(split, 30, False, "cpu"), contextlib.nullcontext)
    with torch.no_grad():
        expected = model(DeviceLoader(split, 100, False, "cpu").normalize(split.images))
    assert logits.shape == (100, 100) and logits.dtype == torch.float32
    assert torch.allclose(logits, expected, atol=1e-4)


class NaNAtCall(torch.nn.Module):
    """A linear classifier whose output turns NaN from its nan_from-th call on."""

    def __init__(self, nan_from: int):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 32 * 32, 100)
        self.calls, self.nan_from = 0, nan_from

    def forward(self, x):
        self.calls += 1
        out = self.linear(x.flatten(1))
        return out * float("nan") if self.calls >= self.nan_from else out


def test_nan_loss_stops_with_epoch_and_step(fake_data):
    model = NaNAtCall(nan_from=3)
    loader = DeviceLoader(load_split(fake_data, train=True), 50, True, "cpu", seed=0)
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, 0, len(loader))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(UserError, match="NaN or infinite at epoch 7, step 3"):
        train_epoch(Objective(model), loader, optimizer, scheduler, scaler, contextlib.nullcontext,
                    epoch=7)

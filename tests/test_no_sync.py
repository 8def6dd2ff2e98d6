"""The training loop reads nothing back from the device per step (issue: no host-device syncs).

On CPU the profiler records every tensor-to-Python read (item, bool, int, float) as aten::item;
on a GPU each of these would stall the host. tolist() is counted by wrapping it.
"""
import contextlib

import torch
from torch.profiler import profile

from kd.data import DeviceLoader, load_split
from kd.engine import Objective, make_optimizer, make_scheduler, train_epoch
from kd.models import build_student


def host_reads_in_epoch(fake_data, n_images: int, refresh_every: int, monkeypatch) -> int:
    split = load_split(fake_data, train=True)
    split.images, split.labels = split.images[:n_images], split.labels[:n_images]
    split.coarse_labels = split.coarse_labels[:n_images]
    loader = DeviceLoader(split, 25, True, "cpu", seed=0)
    model = build_student()
    optimizer = make_optimizer(model, 0.05, 0.9, 5e-4, torch.device("cpu"))
    scheduler = make_scheduler(optimizer, 1, len(loader))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    tolist_calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(1) or original(t))
    with profile() as prof:
        train_epoch(Objective(model), loader, optimizer, scheduler, scaler, contextlib.nullcontext,
                    epoch=1, refresh_every=refresh_every)
    items = sum(e.count for e in prof.key_averages() if e.key == "aten::item")
    return items + len(tolist_calls)


def test_host_reads_do_not_grow_with_steps(fake_data, monkeypatch):
    four_steps = host_reads_in_epoch(fake_data, 100, 1000, monkeypatch)
    eight_steps = host_reads_in_epoch(fake_data, 200, 1000, monkeypatch)
    assert four_steps == eight_steps <= 3


def test_progress_bar_is_the_only_periodic_read(fake_data, monkeypatch):
    quiet = host_reads_in_epoch(fake_data, 200, 1000, monkeypatch)
    every_other = host_reads_in_epoch(fake_data, 200, 2, monkeypatch)
    assert every_other - quiet == 4 * 2  # 4 refreshes x (NaN check + loss for the bar)

"""The training loop reads nothing back from the device per step (issue: no host-device syncs).

On CPU the profiler records every tensor-to-Python read (item, bool, int, float) as aten::item;
on a GPU each of these would stall the host. tolist() is counted by wrapping it.
"""
import torch
from torch.profiler import profile

from kd.losses import ce_loss
from kd.models import build_student
from kd.train import Step, train_one_epoch
from helpers import optimization, train_loader


def host_reads_in_epoch(fake_data, n_images: int, refresh_every: int, monkeypatch) -> int:
    loader = train_loader(fake_data, batch_size=5, n_images=n_images)
    model = build_student()
    opt = optimization(model, len(loader), warmup_epochs=1 / len(loader))
    tolist_calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: tolist_calls.append(1) or original(t))
    with profile() as prof:
        train_one_epoch(Step(model, None, ce_loss, opt), loader, epoch=1,
                        refresh_every=refresh_every)
    items = sum(e.count for e in prof.key_averages() if e.key == "aten::item")
    return items + len(tolist_calls)


def test_host_reads_do_not_grow_with_steps_and_only_the_bar_adds_any(fake_data, monkeypatch):
    two_steps = host_reads_in_epoch(fake_data, 10, 1000, monkeypatch)
    four_steps = host_reads_in_epoch(fake_data, 20, 1000, monkeypatch)
    assert two_steps == four_steps <= 3
    every_other = host_reads_in_epoch(fake_data, 20, 2, monkeypatch)
    assert every_other - four_steps == 2 * 2  # 2 refreshes x (NaN check + loss for the bar)

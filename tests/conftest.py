"""Fixtures shared by the test modules: generated data and a teacher trained once per session.
Helper functions and constants are in helpers.py."""
import os
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY_RUN, run_in_process
from kd.synthetic import write_fake_cifar100

# One CPU thread count for this process and the processes tests start (which inherit it): a run
# continues bitwise in another process, or matches one made there, only at the same count.
if os.environ.setdefault("OMP_NUM_THREADS", "2").isdigit():
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> str:
    """A small dataset in the real CIFAR-100 file format (300 train, 100 test images)."""
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar100(str(root), n_train=300, n_test=100, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def runs_root(fake_data, tmp_path_factory) -> Path:
    """A folder holding `teacher`: train_teacher.py's main() as `python train_teacher.py` runs
    it, from scratch at 32 px, trained once per session for every test that needs a teacher
    checkpoint; the pipeline tests add their runs beside it."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        result = run_in_process("train_teacher.py", [
            "--out_dir", root / "teacher", "--pretrained", "none", "--img_size", "32", "--lr",
            "0.02", "--data_dir", fake_data, *TINY_RUN], mp)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(autouse=True)
def no_weight_downloads(monkeypatch, tmp_path):
    """Keep torch's weight cache empty and private, so no test depends on what a machine cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def in_process(monkeypatch, capsys):
    """helpers.run_in_process with this test's monkeypatch and capsys."""
    return lambda script, argv: run_in_process(script, argv, monkeypatch, capsys)

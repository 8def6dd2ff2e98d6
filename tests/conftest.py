import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kd.synthetic import write_fake_cifar100  # noqa: E402


class RunsCode:
    """A pickle payload: unpickling it runs `touch marker` (for the refusal tests)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> str:
    """A small dataset in the real CIFAR-100 file format (300 train, 100 test images)."""
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar100(str(root), n_train=300, n_test=100, seed=0)
    return str(root)


@pytest.fixture(autouse=True)
def no_weight_downloads(monkeypatch, tmp_path):
    """Keep torch's weight cache empty and private, so no test depends on what a machine cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    os.environ.setdefault("OMP_NUM_THREADS", "2")

import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import kd.errors
from kd.synthetic import write_fake_cifar100

REPO = Path(__file__).resolve().parents[1]


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


def run_in_process(script, argv: list[str], monkeypatch, capsys) -> SimpleNamespace:
    """Run a script's main() (a path under the repo, or the function) through
    kd.errors.run_script in this process, as `python script argv` would, without seconds of
    imports; returns its exit code and stderr."""
    main = runpy.run_path(str(REPO / script))["main"] if isinstance(script, str) else script
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, argv)])
    monkeypatch.setattr(kd.errors.signal, "signal", lambda *a: None)  # keep pytest's Ctrl-C
    with pytest.raises(SystemExit) as exit_info:
        kd.errors.run_script(main)
    return SimpleNamespace(returncode=exit_info.value.code, stderr=capsys.readouterr().err)


def assert_one_line_error(result, *phrases) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ")
    for phrase in phrases:
        assert phrase in lines[0], lines[0]

import os
import runpy
import subprocess
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


# A short run of any script on fake_data (the pipeline tests, the teacher below, the study)
TINY_RUN = ["--epochs", "2", "--batch_size", "100", "--eval_batch_size", "64", "--no-download"]


@pytest.fixture(scope="session")
def runs_root(fake_data, tmp_path_factory) -> Path:
    """A folder holding `teacher`: train_teacher.py run as a user runs it, from scratch at 32 px,
    trained once per session for every test that needs a teacher checkpoint; the pipeline tests
    add their runs beside it."""
    root = tmp_path_factory.mktemp("runs")
    result = subprocess.run(
        [sys.executable, str(REPO / "train_teacher.py"), "--out_dir", str(root / "teacher"),
         "--pretrained", "none", "--img_size", "32", "--lr", "0.02", "--data_dir", fake_data,
         *TINY_RUN], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(autouse=True)
def no_weight_downloads(monkeypatch, tmp_path):
    """Keep torch's weight cache empty and private, so no test depends on what a machine cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    os.environ.setdefault("OMP_NUM_THREADS", "2")


def run_in_process(script, argv: list[str], monkeypatch, capsys) -> SimpleNamespace:
    """Run a script's main() (a path under the repo, or the function) through
    kd.errors.run_script in this process, as `python script argv` would, without seconds of
    imports; returns its exit code, stdout and stderr."""
    main = runpy.run_path(str(REPO / script))["main"] if isinstance(script, str) else script
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, argv)])
    monkeypatch.setattr(kd.errors.signal, "signal", lambda *a: None)  # keep pytest's Ctrl-C
    try:
        kd.errors.run_script(main)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def assert_one_line_error(result, *phrases) -> None:
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ")
    for phrase in phrases:
        assert phrase in lines[0], lines[0]

"""Fixtures shared by the test modules: generated data and a teacher trained once per session.
Helper functions and constants are in helpers.py."""
import os
from pathlib import Path

import matplotlib.figure
import pytest
import torch

from helpers import KD, REPO, STUDENT, TEACHER, TINY_RUN, run_in_process, write_run
from kd.synthetic import write_fake_cifar100

# One CPU thread count for this process and the processes tests start (which inherit it): a run
# continues bitwise in another process, or matches one made there, only at the same count. Two,
# unless OMP_NUM_THREADS says otherwise, shared out among pytest-xdist's workers (`-n 2`: one
# each), so that the workers do not oversubscribe a 2-core machine.
THREADS_GIVEN = "OMP_NUM_THREADS" in os.environ
if os.environ.setdefault("OMP_NUM_THREADS", "2").isdigit():
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """With -n (pytest-xdist), unless --dist says otherwise: each test file on one worker, so its
    module fixtures are made once, the files handed out in the order pytest_collection_modifyitems
    gives them. Set here, not in pytest.ini, so that pytest runs without xdist too."""
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False


def pytest_configure(config):
    """In the process that starts xdist's workers, before it starts them: their thread count."""
    workers = getattr(config.option, "numprocesses", None)
    if workers and not THREADS_GIVEN:
        os.environ["OMP_NUM_THREADS"] = str(max(1, 2 // workers))


def pytest_collection_modifyitems(items):
    """In xdist's workers, test files in the order that keeps two workers busy to the end: the
    real-cluster test's first (it waits on the scheduler and its jobs while the other worker
    runs tests), then the files that start processes, then the rest. Left in their own order in
    one process, where `-x` should meet a quick test's failure soon."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    marks: dict[Path, set[str]] = {}
    for item in items:
        marks.setdefault(item.path, set()).update(mark.name for mark in item.iter_markers())
    rank = {path: 0 if "slurm" in names else 1 if "slow" in names else 2
            for path, names in marks.items()}
    items.sort(key=lambda item: rank[item.path])


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


@pytest.fixture
def teacher_file(tmp_path) -> str:
    """A stand-in teacher checkpoint for study.py's plan, which only hashes it."""
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"stand-in teacher: plan() only hashes it")
    return str(path)


@pytest.fixture(autouse=True)
def in_its_tmp_path(monkeypatch, tmp_path):
    """Every test runs in its own tmp_path: a file a test or a script writes by a relative path
    (a default --out_dir, a cache named on the command line) lands there, never in the checkout.
    What must run from the repo says so (helpers.REPO)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def no_weight_downloads(monkeypatch, tmp_path):
    """Keep torch's weight cache empty and private, so no test depends on what a machine cached."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def in_process(monkeypatch, capsys):
    """helpers.run_in_process with this test's monkeypatch and capsys."""
    return lambda script, argv: run_in_process(script, argv, monkeypatch, capsys)


@pytest.fixture
def unrendered(request, monkeypatch):
    """For the report's tests (pytestmark): most read results.md and the warnings, so their
    figures are built (every plotting call runs) and saved as empty files, not rendered (about a
    second a report). The tests that read the PNGs, and those of non-finite and blown-up values,
    ask for `rendered`."""
    if "rendered" not in request.fixturenames:
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                            lambda fig, path, **kwargs: Path(path).write_bytes(b""))


@pytest.fixture
def rendered():
    """The figures rendered as the report renders them (see `unrendered`)."""


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """A teacher, a baseline picked on val, and a KD experiment with seeds 0 and 1 (which also
    differ in how they ran: the teacher's path, --overwrite, the environment, the GPUs)."""
    root = tmp_path / "exp"
    write_run(root / "teacher", TEACHER, [50.0, 60.0, 58.0])
    write_run(root / "baseline", STUDENT, [10.0, 30.0, 25.0], val_top1=[12.0, 20.0, 28.0],
              logits_seed=None)
    write_run(root / "kd" / "seed0", KD, [20.0, 41.0, 40.0], logits_seed=1)
    write_run(root / "kd" / "seed1", {**KD, "seed": 1, "teacher_ckpt": "copy/best.pt",
                                       "overwrite": True, "world_size": 2,
                                       "per_rank_batch_size": 64}, [22.0, 43.0, 44.0],
              logits_seed=2)
    return root

"""Runs that survive: exact resume after a graceful stop or a SIGKILL, refused flag changes."""
import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import study
from helpers import REPO, run_in_process
import kd.job
import kd.train
from kd import launch
from kd.checkpoint import load_checkpoint, save_checkpoint
from kd.errors import UserError

TIMING = {"epoch_time_s", "train_img_per_s"}


def student_cmd(out_dir, data, *extra):
    return [sys.executable, str(REPO / "train_student.py"), "--out_dir", str(out_dir),
            "--data_dir", data, "--no-download", "--epochs", "3", "--batch_size", "20",
            "--eval_batch_size", "50", *extra]


def run_to_end(cmd):
    """Run cmd's script to its end in this process, as the command would from the repo root
    (seconds of imports less; the runs that are stopped or killed are processes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        result = run_in_process(cmd[1], cmd[2:], mp)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def start_and_signal(cmd, sig, delay_s):
    """Start a run, wait until its first epoch is checkpointed, wait delay_s more, send sig."""
    last = os.path.join(cmd[cmd.index("--out_dir") + 1], "last.pt")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    while proc.poll() is None and not os.path.exists(last):
        time.sleep(0.01)
    time.sleep(delay_s)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def rows_in(path):
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max(0, sum(1 for _ in f) - 1)


def log_without_timing(folder):
    with open(folder / "log.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def final_weights(folder):
    return torch.load(folder / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(fake_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(student_cmd(folder, fake_data))
    return folder


def assert_same_run(folder, reference):
    assert log_without_timing(folder) == log_without_timing(reference)
    ours, theirs = final_weights(folder), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), f"{k} differs after resume"


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130)])  # SIGTERM: the preemption test
def test_graceful_stop_then_resume_is_exact(reference, fake_data, tmp_path, sig, code):
    folder = tmp_path / "run"
    returncode, stderr = start_and_signal(student_cmd(folder, fake_data), sig, 0.3)
    assert returncode == code, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    stopped_at = load_checkpoint(str(folder / "last.pt"))["epoch"]
    assert 1 <= stopped_at < 3 and rows_in(folder / "log.csv") == stopped_at
    run_to_end(student_cmd(folder, fake_data, "--resume"))
    assert_same_run(folder, reference)


@pytest.mark.slow
@pytest.mark.parametrize("delay_s", [0.0, 0.4])
def test_sigkill_at_any_point_then_resume_is_exact(reference, fake_data, tmp_path, delay_s):
    folder = tmp_path / "run"
    returncode, _ = start_and_signal(student_cmd(folder, fake_data), signal.SIGKILL, delay_s)
    assert returncode == -signal.SIGKILL
    run_to_end(student_cmd(folder, fake_data, "--resume"))
    assert_same_run(folder, reference)
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]  # a killed write's leftovers


def feature_cmd(method, out_dir, data, teacher, *extra):
    """A run of a feature method whose connector trains or holds state."""
    return [sys.executable, str(REPO / "distill_student.py"), "--out_dir", str(out_dir),
            "--teacher_ckpt", str(teacher), "--method", method, "--data_dir", data,
            "--no-download", "--epochs", "3", "--batch_size", "50", "--eval_batch_size", "50",
            "--lr", "0.02", *extra]  # VID and CC blow up at the default lr on these images


# MLKD's strong views, drawn anew each step (the other connectors resume through the same
# last.pt: the in-process test below; CRD's, the one with the most state, is SIGKILLed on two
# processes in tests/test_distributed.py)
@pytest.mark.slow
@pytest.mark.parametrize("method,extra,state", [
    ("mlkd", ["--epochs", "2", "--batch_size", "100", "--val_size", "200"], set())])  # 1 step each
def test_feature_method_resumes_exactly_after_sigkill(runs_root, fake_data, tmp_path, method,
                                                      extra, state):
    teacher = runs_root / "teacher" / "best.pt"
    reference_run, folder = tmp_path / "reference", tmp_path / "run"
    run_to_end(feature_cmd(method, reference_run, fake_data, teacher, *extra))
    returncode, _ = start_and_signal(feature_cmd(method, folder, fake_data, teacher, *extra),
                                     signal.SIGKILL, 0.2)
    assert returncode == -signal.SIGKILL and load_checkpoint(str(folder / "last.pt"))["epoch"] < 3
    run_to_end(feature_cmd(method, folder, fake_data, teacher, *extra, "--resume"))
    assert_same_run(folder, reference_run)
    ours, theirs = (torch.load(f / "last.pt", weights_only=True)["connector"]
                    for f in (folder, reference_run))
    assert ours.keys() == theirs.keys() and state <= ours.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow  # three runs of a few epochs each, in-process
@pytest.mark.parametrize("method,extra", [("fitnet", []), ("vid", []),
                                          ("cc", ["--cc_weight", "1e-6"])])
def test_other_trainable_connectors_resume_exactly(runs_root, fake_data, tmp_path, monkeypatch,
                                                   method, extra):
    """Connectors with parameters (VID's include a ParameterList of variances) or BatchNorm
    buffers, stopped after epoch 1 in this process (the kill is the test's above): the resumed
    run is the uninterrupted one, connector included.
    ReviewKD's connector (28 M parameters, seconds a step on 2 cores) is left out for time."""
    teacher = runs_root / "teacher" / "best.pt"
    flags = [*extra, "--epochs", "2", "--batch_size", "100", "--val_size", "200"]  # 1 step each
    reference_run, folder = tmp_path / "reference", tmp_path / "run"
    run_to_end(feature_cmd(method, reference_run, fake_data, teacher, *flags))
    with monkeypatch.context() as mp:  # a stop signal, as seen after the first epoch's write
        mp.setattr(kd.train, "stop_requested", lambda: (folder / "last.pt").exists())
        cmd = feature_cmd(method, folder, fake_data, teacher, *flags)
        stopped = run_in_process(cmd[1], cmd[2:], mp)
        assert stopped.returncode != 0 and "--resume" in stopped.stderr
    assert load_checkpoint(str(folder / "last.pt"))["epoch"] == 1
    run_to_end(feature_cmd(method, folder, fake_data, teacher, *flags, "--resume"))
    assert_same_run(folder, reference_run)
    ours, theirs = (torch.load(f / "last.pt", weights_only=True)["connector"]
                    for f in (folder, reference_run))
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.slow
def test_save_every_sets_the_resume_point(reference, fake_data, tmp_path):
    folder = tmp_path / "run"
    returncode, stderr = start_and_signal(student_cmd(folder, fake_data, "--save_every", "2"),
                                          signal.SIGINT, 0.0)
    assert returncode == 130 and "last.pt holds epoch 2" in stderr, stderr
    assert load_checkpoint(str(folder / "last.pt"))["epoch"] == 2
    run_to_end(student_cmd(folder, fake_data, "--resume", "--save_every", "2"))
    assert_same_run(folder, reference)


@pytest.mark.slow
def test_resume_with_changed_flags_is_refused(reference, fake_data, tmp_path, in_process):
    before = (reference / "last.pt").read_bytes()
    cmd = student_cmd(reference, fake_data, "--resume", "--lr", "0.5", "--seed", "3")
    result = in_process(cmd[1], cmd[2:])
    assert result.returncode == 2
    assert "--lr 0.2 -> 0.5" in result.stderr and "--seed 0 -> 3" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (reference / "last.pt").read_bytes() == before


@pytest.mark.slow
def test_resume_with_more_epochs_continues(reference, fake_data, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("last.pt", "log.csv", "config.json"):
        (folder / name).write_bytes((reference / name).read_bytes())
    cmd = student_cmd(folder, fake_data, "--resume")
    cmd[cmd.index("--epochs") + 1] = "4"
    run_to_end(cmd)
    assert [r["epoch"] for r in log_without_timing(folder)] == ["1", "2", "3", "4"]
    assert load_checkpoint(str(folder / "last.pt"))["epoch"] == 4


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, {"model": {}, "config": {"epoch": 1}})

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="disk full"):
        save_checkpoint(path, {"model": {}, "config": {"epoch": 2}})
    assert load_checkpoint(path)["config"] == {"epoch": 1}
    assert os.listdir(tmp_path) == ["last.pt"]


def task_of(controller: int) -> int | None:
    """The process id of the task a submitit local job's controller runs (its child)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == controller:
            return int(stat.parent.name)
    return None


@pytest.mark.slow
def test_a_preempted_submitit_job_is_requeued_and_resumes_exactly(reference, fake_data, tmp_path):
    """A run submitted as study.py --launcher submitit_local submits it gets SIGUSR2 after its
    first epoch, the warning SLURM (and the local executor, at the time limit) sends a job:
    RunJob stops the run, submitit requeues the job, the run resumes from last.pt and ends with
    the weights of an uninterrupted run."""
    folder = tmp_path / "run"
    args = study.build_parser().parse_args(["--launcher", "submitit_local"])
    executor = launch.cluster.executor(args, str(tmp_path))
    job = executor.submit(kd.job.RunJob(student_cmd(folder, fake_data), {},
                                        str(folder / study.OUTPUT_FILE), out_dir=str(folder)))
    deadline = time.monotonic() + 120
    while not (folder / "last.pt").exists():
        assert not job.done() and time.monotonic() < deadline, job.stderr()
        time.sleep(0.02)
    assert not (folder / "summary.json").exists()  # mid-run: 2 of its 3 epochs are to come
    os.kill(task_of(int(job.job_id)), signal.SIGUSR2)
    deadline = time.monotonic() + 300
    while not job.done():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert job.result() == "done", job.stderr()
    starts = [line for line in (folder / study.OUTPUT_FILE).read_text().splitlines()
              if line.startswith("$ ")]
    assert len(starts) == 2 and starts[1].endswith(" --resume") and "SIGTERM" in \
        (folder / study.OUTPUT_FILE).read_text()
    assert_same_run(folder, reference)

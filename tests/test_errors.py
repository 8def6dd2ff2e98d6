"""kd.errors.run_script: one line and an exit code, from rank 0 only under torchrun."""
import os
import pty
import signal
import sys
import time

import pytest

import kd.errors
from kd.errors import StopRequested, UserError, run_script
from helpers import REPO, assert_one_line_error, run_in_process


def ends(raised: Exception, rank: str, monkeypatch, capsys, world_size: str | None = "2"
         ) -> tuple[int, list[str]]:
    monkeypatch.setenv("RANK", rank)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(kd.errors.signal, "signal", lambda *a: None)  # keep pytest's Ctrl-C

    def main():
        raise raised
    with pytest.raises(SystemExit) as exit_info:
        run_script(main)
    captured = capsys.readouterr()
    assert captured.out == ""
    return exit_info.value.code, captured.err.strip().splitlines()


@pytest.mark.parametrize("raised,code,line", [
    (UserError("bad flag"), 2, "error: bad flag"),
    (StopRequested("last.pt holds epoch 3"), 128 + signal.SIGTERM,
     "stopped: last.pt holds epoch 3"),
])
def test_rank_0_says_why_once_and_the_others_stay_silent(raised, code, line, monkeypatch, capsys):
    assert ends(raised, "0", monkeypatch, capsys) == (code, [line])
    assert ends(raised, "1", monkeypatch, capsys) == (code, [])


def test_a_stray_rank_variable_outside_torchrun_silences_nothing(monkeypatch, capsys):
    assert ends(UserError("bad flag"), "3", monkeypatch, capsys, world_size=None) == \
        (2, ["error: bad flag"])


HANGS_UP = """
import sys, time
from kd.errors import StopRequested, run_script, stop_requested

def main():  # a run: a progress line every step, on the terminal
    print("ready", flush=True)
    while not stop_requested():
        print("step", file=sys.stderr, flush=True)
        time.sleep(0.01)
    print("stopping: the terminal is gone", file=sys.stderr, flush=True)
    raise StopRequested("resume with --resume")

run_script(main)
"""


@pytest.mark.slow
def test_a_closed_terminal_stops_a_run_at_its_next_step():
    pid, terminal = pty.fork()  # the child leads a session on a new terminal
    if pid == 0:
        os.chdir(REPO)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, whatever runs the tests
        os.execv(sys.executable, [sys.executable, "-c", HANGS_UP])
    done = 0
    try:
        shown = b""
        while b"step" not in shown:
            shown += os.read(terminal, 1024)
        os.close(terminal)  # the terminal closes: SIGHUP, and writing to it fails (EIO)
        for _ in range(600):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        assert done, "the run went on after its terminal closed"
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGHUP  # not a traceback's 1
    finally:
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_a_global_batch_the_processes_cannot_share_is_refused_before_they_join(
        fake_data, tmp_path, monkeypatch, capsys):
    """As torchrun's rank 0 of 2 would start (no MASTER_ADDR: joining the group would fail)."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(REPO)
    result = run_in_process("train_student.py", ["--out_dir", tmp_path / "x", "--data_dir",
                                                 fake_data, "--batch_size", "51", "--epochs",
                                                 "1", "--no-download"], monkeypatch, capsys)
    assert_one_line_error(result, "--batch_size 51 (the global batch) does not divide evenly "
                                  "over 2 processes")
    assert not (tmp_path / "x").exists()

"""The study folder as the launchers keep it: one study.py at a time (a lock), the record of its
commands (study.json), and what a finished or failed study prints. study.py plans; kd.launch's
launchers call these whichever of them runs the jobs."""
import contextlib
import fcntl
import json
import os
import shlex
import sys
from pathlib import Path

from kd.checkpoint import write_json
from kd.errors import UserError
from kd.rundir import STUDY_FILE

REPO = Path(__file__).resolve().parents[2]
LOCK_FILE = ".study.lock"  # locked while a study.py runs in the folder; holds its process id


def shown_path(path: Path) -> str:
    """path relative to the current folder when it lies below it, else absolute."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def record_command(out_dir: str, launcher: dict | None = None) -> None:
    """Add this command to OUT_DIR/study.json, which marks the folder as a study, and the
    settings of a submitit launcher (kd.launch.settings) to its launchers."""
    path = os.path.join(out_dir, STUDY_FILE)
    record = {"commands": []}
    try:
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
        commands = record["commands"]
        if not isinstance(commands, list):
            raise TypeError("its commands are not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path} ({e}); move it away") from None
    command = shlex.join([sys.executable, *sys.argv])
    if command not in commands:
        commands.append(command)
    if launcher is not None and launcher not in record.setdefault("launchers", []):
        record["launchers"].append(launcher)
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_json(path, record)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None


@contextlib.contextmanager
def only_study_running(out_dir: str):
    """Refuse to start while another study.py runs in out_dir: both would train, and restart,
    the same runs. The lock is an flock on OUT_DIR/.study.lock, which the system releases when
    its process ends, however it ends; the file holds the owner's process id, for the message,
    and stays (removing it would let a third study lock a new file beside a held one)."""
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(path, "a+", errors="replace")
    except OSError as e:
        raise UserError(f"cannot write to --out_dir {out_dir}: {e}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip()
            raise UserError(f"another study.py (process {owner or 'starting'}) is running in "
                            f"{out_dir}; wait for it or stop it") from None
        except OSError as e:
            raise UserError(f"cannot lock {path}: {e}") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)


def result_line(job) -> str:
    """', val_top1 x' at the run's last epoch, from its summary.json (the test numbers wait for
    the report, after the selection)."""
    try:
        with open(os.path.join(job.out_dir, "summary.json")) as f:
            return f", val_top1 {json.load(f)['last']['val_top1']:.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def failure_report(failed: list[tuple], total: int) -> str:
    lines = [f"{len(failed)} of {total} study jobs failed or were not started:"]
    for job, why in failed:
        lines += [f"- {job.name}: {why}", f"  {shlex.join(job.command())}"]
        try:
            with open(job.output_log) as f:
                output = f.read().replace("\r", "\n").splitlines()
        except OSError:
            output = []
        lines += [f"  | {line}" for line in [ln for ln in output if ln.strip()][-8:]]
    return "\n".join(lines)


def print_report_command(out_dir: str) -> None:
    plot = shown_path(REPO / "plots" / "plot_runs.py")
    report = shlex.join([sys.executable, plot, out_dir, "--out", os.path.join(out_dir, "report")])
    print(f"study complete. Report: {report}")

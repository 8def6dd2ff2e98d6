"""How a command ends: one line on stderr and an exit code, never a traceback.

UserError: bad input or an environment problem the user can fix (exit 2). SIGINT/SIGTERM, and
SIGHUP (a closed terminal) unless nohup ignores it: the first asks the run to stop at the next
step (StopRequested, exit 128 + the signal), the second exits at once. Under torchrun every
process fails or stops alike, so only rank 0 says why.
"""
import contextlib
import os
import signal
import stat
import sys
from typing import Callable


class UserError(Exception):
    """Bad input or an environment problem the user can fix; the message says how."""


class StopRequested(Exception):
    """Raised inside the epoch when a stop signal asked the run to stop; the message says how
    to resume."""


_received: list[int] = []


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a process not launched by torchrun (kd.distributed.World's
    is_main, which this module cannot import)."""
    return "WORLD_SIZE" not in os.environ or os.environ.get("RANK") == "0"


def say(message: str) -> None:
    """A line on stderr, from rank 0 only; a line nobody can read (a closed terminal) is dropped,
    not raised."""
    if is_main_process():
        with contextlib.suppress(OSError):
            print(message, file=sys.stderr, flush=True)


def stop_signals() -> list[signal.Signals]:
    """The signals that stop a command: SIGINT, SIGTERM, and SIGHUP where it is not ignored."""
    hangup = [signal.SIGHUP] if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN else []
    return [signal.SIGINT, signal.SIGTERM, *hangup]


def on_signal(signum, frame) -> None:
    """The handler of stop_signals(): the first asks for a stop, the second exits at once."""
    if _received:
        os._exit(128 + signum)
    _received.append(signum)
    say(f"\n{signal.Signals(signum).name}: stopping at the next step "
        f"(send it again to quit at once)")
    if signum == signal.SIGHUP:
        _away_from_the_closed_terminal()


def _away_from_the_closed_terminal() -> None:
    """Send stdout and stderr to /dev/null where they are a terminal (a character device: a
    hung-up one no longer passes isatty). Writing to a closed terminal fails (EIO): without this
    a run would stop at its next progress bar with a traceback, not at its next step."""
    with open(os.devnull, "w") as devnull:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # closed, or not a file
                if stat.S_ISCHR(os.fstat(stream.fileno()).st_mode):
                    os.dup2(devnull.fileno(), stream.fileno())


def stop_requested() -> bool:
    return bool(_received)


@contextlib.contextmanager
def stops_deferred():
    """Within the block a stop signal is only recorded (stop_requested() says so after it), even
    a second one: for steps that must end together, such as submitting a job and recording its
    id. A handler, unlike a blocked signal mask, is not inherited by the processes started here."""
    record = lambda signum, frame: _received.append(signum)
    previous = {sig: signal.signal(sig, record) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_script(main: Callable[[], object]) -> None:
    """Run a command's main(): UserError and stop signals become one line and an exit code."""
    import torch.distributed as dist  # here: kd.job's processes import this module without torch
    for sig in stop_signals():
        signal.signal(sig, on_signal)
    try:
        main()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing; leave together, not mid-teardown
            dist.destroy_process_group()
    except UserError as e:
        say(f"error: {e}")
        sys.exit(2)
    except StopRequested as e:
        say(f"stopped: {e}")
        sys.exit(128 + (_received[0] if _received else signal.SIGTERM))  # a rank told by others

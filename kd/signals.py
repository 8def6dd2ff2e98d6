"""SIGINT/SIGTERM: the first asks the run to stop at the next step, the second exits at once."""
import os
import signal
import sys

_received: list[int] = []


def _handle(signum, frame):
    if _received:
        os._exit(128 + signum)
    _received.append(signum)
    print(f"\n{signal.Signals(signum).name}: stopping at the next step "
          f"(send it again to quit at once)", file=sys.stderr, flush=True)


def install_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handle)


def stop_requested() -> bool:
    return bool(_received)


def received_signal() -> int | None:
    return _received[0] if _received else None

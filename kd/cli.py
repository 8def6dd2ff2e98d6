"""Script entry point: bad input and stop signals become one line on stderr and an exit code."""
import sys
from typing import Callable

from kd.engine import StopRequested
from kd.errors import UserError
from kd.signals import install_handlers, received_signal


def run_script(main: Callable[[], object]) -> None:
    install_handlers()
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StopRequested:
        command = " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv)
        print(f"stopped; last.pt holds the last finished epoch. Resume with:\n  {command} --resume",
              file=sys.stderr)
        sys.exit(128 + received_signal())

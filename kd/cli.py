"""Script entry point: bad input and stop signals become one line on stderr and an exit code."""
import signal
import sys
from typing import Callable

import torch.distributed as dist

from kd.distributed import World
from kd.engine import StopRequested
from kd.errors import UserError
from kd.signals import install_handlers, received_signal


def run_script(main: Callable[[], object]) -> None:
    install_handlers()
    try:
        main()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing; leave together, not mid-teardown
            dist.destroy_process_group()
    except UserError as e:
        if World.from_env().is_main:  # under torchrun every rank fails alike; one says why
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except StopRequested as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(128 + (received_signal() or signal.SIGTERM))  # a rank told by the others

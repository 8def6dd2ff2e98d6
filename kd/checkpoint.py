"""Crash-safe files: every write goes to a temporary file in the same folder, is fsynced, then
renamed.

A crash at any moment leaves either the previous good file or the new one, never half of one.
Checkpoints are loaded with weights_only=True, so a tampered file cannot run code.
"""
import errno
import hashlib
import json
import os
import tempfile
from typing import Callable

import torch

from kd.errors import UserError


def atomic_write(path: str, write: Callable) -> None:
    """Call write(file) on a temporary file beside path, fsync it, and rename it over path."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder_fd = os.open(folder, os.O_RDONLY)  # make the rename itself survive a power loss
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}; the previous file is "
                            f"untouched") from e
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def current_umask() -> int:
    """The process umask (read by setting it, then set back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str, obj: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def file_sha256(path: str) -> str:
    """The file's SHA-256, recorded so that a resumed KD run can check it has the same teacher."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint written by this repo, refusing anything that is not plain tensors and
    data."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} "
                        f"{'is not a file' if os.path.exists(path) else 'does not exist'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "global" in line.lower()), lines[0]).strip()
        raise UserError(f"{path} is not a loadable checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this repo (no model/config "
                        f"entries)")
    return ckpt

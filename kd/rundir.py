"""The run folder: who may write to it, what config it records, how a stopped run is resumed.

Nothing in an existing run folder is touched until every input has been checked: the folder is
only checked by `check_out_dir` (before models and data load) and only emptied by
`reset_out_dir` (right before the first write).
"""
import argparse
import os
import shlex
import subprocess
import sys

import torch
import torchvision

from kd.errors import UserError

RUN_FILES = ("config.json", "log.csv", "last.pt", "best.pt", "summary.json", "logits_last.pt",
             "logits_best.pt")
# Config keys that record where and how a run executed, not what it computed: they may change on
# --resume, and runs that differ only in these and the seed are seeds of one experiment (plots/).
EXECUTION_KEYS = {"command", "torch", "torchvision", "device_name", "git_commit", "world_size",
                  "per_rank_batch_size", "resume", "overwrite", "out_dir", "data_dir", "download",
                  "device", "compile", "eval_batch_size", "save_every", "teacher_ckpt",
                  "teacher_cache"}


def existing_run_files(out_dir: str) -> list[str]:
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def check_out_dir(args: argparse.Namespace, keep: tuple[str, ...] = ()) -> None:
    """Refuse to start where a run exists unless --resume or --overwrite says what to do with it,
    and refuse an --overwrite that would delete one of the input files `keep`."""
    existing = existing_run_files(args.out_dir)
    if args.resume and "last.pt" not in existing:
        hint = "--overwrite instead of --resume to start it again" if existing else "no --resume"
        raise UserError(f"--resume: no last.pt in {args.out_dir} (no epoch finished); run with {hint}")
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"{args.out_dir} already holds a run ({', '.join(existing)}); "
                        f"pass --resume to continue it, --overwrite to replace it, or another --out_dir")
    deleted = {os.path.abspath(os.path.join(args.out_dir, name)) for name in existing}
    for path in keep:
        if args.overwrite and os.path.abspath(path) in deleted:
            raise UserError(f"--overwrite would delete {path}; pick another --out_dir")


def reset_out_dir(args: argparse.Namespace) -> None:
    """Create the folder; with --overwrite delete the old run's files; on resume drop the temp
    files a write killed half-way left behind."""
    os.makedirs(args.out_dir, exist_ok=True)
    if args.overwrite:
        for name in existing_run_files(args.out_dir):
            os.remove(os.path.join(args.out_dir, name))
    for name in os.listdir(args.out_dir):
        if name.startswith(".") and name.endswith(".tmp"):  # kd.checkpoint.atomic_write's
            os.remove(os.path.join(args.out_dir, name))


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_config(args: argparse.Namespace, device: torch.device, arch: dict, world) -> dict:
    """Every resolved flag plus what is needed to rebuild the model and reproduce the run."""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {**vars(args), **arch, "command": shlex.join(sys.argv), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "device_name": device_name,
            "git_commit": git_commit(), "world_size": world.size,
            "per_rank_batch_size": args.batch_size // world.size}


# Settings added since runs were first written, with the value such older runs had in effect
LATER_DEFAULTS = {"method": "kd", "logit_std": False, "ce_weight": 1.0, "dkd_alpha": 1.0,
                  "dkd_beta": 8.0, "dkd_warmup": 20, "dist_beta": 2.0, "dist_gamma": 2.0,
                  "teacher_logits": "online", "teacher_cache_sha256": None}


def changed_settings(saved: dict, config: dict, keys) -> list[str]:
    """'--key saved -> config' for each of keys, execution keys aside, where the two differ."""
    return [f"--{k} {saved.get(k)} -> {config.get(k)}"
            for k in sorted(set(keys) - EXECUTION_KEYS) if saved.get(k) != config.get(k)]


def resumed_config(saved: dict, config: dict, epochs_done: int) -> dict:
    """The saved run's config updated with where and how it runs now (epochs, device, processes,
    command, versions), once nothing that changes what it computes differs.

    Refuses any difference in a flag that changes what the run computes (lr, batch size, seed,
    model, alpha, T, the teacher's weights...), and fewer epochs than already done.
    """
    if "teacher_sha256" in saved:  # a KD run from before its later settings existed
        saved = {**{k: v for k, v in LATER_DEFAULTS.items() if k in config}, **saved}
    changed = changed_settings(saved, config, (set(saved) | set(config)) - {"epochs"})
    if changed:
        details = ", ".join(changed)
        raise UserError(f"--resume with settings that change the run ({details}); "
                        f"use the original values or start a new --out_dir")
    if config["epochs"] < epochs_done:
        raise UserError(f"--resume --epochs {config['epochs']}: the run already finished "
                        f"{epochs_done} epochs")
    now = {k: v for k, v in config.items() if k in EXECUTION_KEYS | {"epochs"}}
    return {**saved, **now}


def rerun_command(flag: str) -> str:
    """This script's command line without --resume/--overwrite, plus `flag`."""
    argv = [a for a in sys.argv if a not in ("--resume", "--overwrite")]
    return shlex.join([os.path.basename(sys.executable), *argv, flag])


def stopped_message(epochs_done: int) -> str:
    if epochs_done == 0:
        return f"no epoch finished, so nothing was saved. Start again with:\n  {rerun_command('--overwrite')}"
    return f"last.pt holds epoch {epochs_done}. Resume with:\n  {rerun_command('--resume')}"

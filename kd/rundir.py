"""The run folder: who may write to it, what config it records, how a stopped run is resumed,
and what its config means (which script made it, what it computes, which folders are seeds of one
experiment). study.py and the report ask this module; nothing else decides.

Nothing in an existing run folder is touched until every input has been checked: the folder is
only checked by `check_out_dir` (before models and data load) and only emptied by
`reset_out_dir` (right before the first write).

It imports neither torch nor torchvision at import time (run_config and made_by do, when called):
kd.job's job processes ask it how to start a run and must start in a fraction of a second.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys

from kd.errors import UserError

STUDY_FILE = "study.json"  # marks a study folder (study.py's --out_dir) and records its commands
EXPORT_DIR = "export"  # kd.export's default --out inside a run folder, where the report looks
VALIDATION_FILE = "validation.json"  # kd.export's record of what it exported and measured
EXPORT_FILE = os.path.join(EXPORT_DIR, VALIDATION_FILE)
RUN_FILES = ("config.json", "log.csv", "last.pt", "best.pt", "summary.json", "logits_last.pt",
             "logits_best.pt", "init_log.csv")
# Config keys that record where and how a run executed, not what it computed: they may change on
# --resume, and runs that differ only in these and the seed are seeds of one experiment.
EXECUTION_KEYS = {"command", "torch", "torchvision", "device_name", "git_commit", "world_size",
                  "per_rank_batch_size", "resume", "overwrite", "out_dir", "data_dir", "download",
                  "device", "compile", "eval_batch_size", "save_every", "teacher_ckpt",
                  "teacher_cache", "cpu_threads"}


def existing_run_files(out_dir: str) -> list[str]:
    return [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]


def verdict(out_dir: str, planned: dict | None = None) -> str:
    """What to do with the run folder out_dir, the one rule study.py, kd.job and kd.launch ask:
    'run' (it holds no run file), 'restart' (it holds files but nothing a run computed to go on
    from or to report: no last.pt and no log.csv, or a log.csv without last.pt and summary.json),
    'resume' (last.pt, no summary.json) or 'done' (summary.json beside last.pt or log.csv).

    With `planned`, the config the run would record, a folder that holds a computed run (last.pt
    or log.csv) whose config.json cannot be read or differs from it in a setting is refused
    (UserError): its run is not the planned one."""
    files = existing_run_files(out_dir)
    if not files:
        return "run"
    if "last.pt" not in files and "log.csv" not in files:
        return "restart"  # nothing was computed there yet
    if planned is not None:
        try:
            with open(os.path.join(out_dir, "config.json")) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            saved = f"{type(e).__name__}: {e}"
        if not isinstance(saved, dict):
            raise UserError(f"{out_dir} holds {', '.join(files)} but no readable config.json "
                            f"({saved}); move it away or pick another --out_dir")
        changed = changed_settings(saved, planned, planned)
        if changed:
            raise UserError(f"{out_dir} holds a run with other settings ({', '.join(changed)}); "
                            f"run the study with the flags it was made with, or another --out_dir")
    if "summary.json" in files:
        return "done"
    return "resume" if "last.pt" in files else "restart"


# The flags that start a run again as verdict() says (None: it is done)
RERUN_FLAGS = {"run": [], "restart": ["--overwrite"], "resume": ["--resume"], "done": None}


def check_out_dir(args: argparse.Namespace, keep: tuple[str, ...] = ()) -> None:
    """Refuse to start where a run exists unless --resume or --overwrite says what to do with it,
    and refuse an --overwrite that would delete one of the input files `keep`."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out_dir {args.out_dir} is a file, not a folder; pick another --out_dir")
    existing = existing_run_files(args.out_dir)
    if args.resume and "last.pt" not in existing:
        hint = "--overwrite instead of --resume to start it again" if existing else "no --resume"
        raise UserError(f"--resume: no last.pt in {args.out_dir} (no epoch finished); "
                        f"run with {hint}")
    if existing and not (args.resume or args.overwrite):
        raise UserError(f"{args.out_dir} already holds a run ({', '.join(existing)}); "
                        f"pass --resume to continue it, --overwrite to replace it, or another "
                        f"--out_dir")
    deleted = {os.path.abspath(os.path.join(args.out_dir, name)) for name in existing}
    for path in keep:
        if args.overwrite and os.path.abspath(path) in deleted:
            raise UserError(f"--overwrite would delete {path}; pick another --out_dir")


def reset_out_dir(args: argparse.Namespace) -> None:
    """Create the folder; with --overwrite delete the old run's files; on resume drop the temp
    files a write killed half-way left behind."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:  # a file on the path, no permission, a read-only disk
        raise UserError(f"cannot create --out_dir {args.out_dir}: {e.strerror}") from None
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


def run_config(args: argparse.Namespace, device, arch: dict, world) -> dict:
    """Every resolved flag plus what is needed to rebuild the model and reproduce the run (on the
    CPU, the thread count too: other counts sum in another order, equal to float rounding)."""
    import torch  # here, not at the top (see the module docstring)
    import torchvision
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {**vars(args), **arch, "command": shlex.join(sys.argv), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "device_name": device_name,
            "cpu_threads": torch.get_num_threads(), "git_commit": git_commit(),
            "world_size": world.size,
            "per_rank_batch_size": args.batch_size // world.size}


def later_defaults() -> dict:
    """Settings added since runs were first written, with the value that distilled runs written
    before them had in effect: every method flag's default (kd.methods), --method's included,
    the optimizer's (SGD), and the teacher's logits online."""
    from kd.methods import flag_defaults  # here: kd.job reads this module without torch
    from kd.optim import OPTIMIZER_DEFAULTS
    return {**flag_defaults(), **OPTIMIZER_DEFAULTS, "teacher_logits": "online",
            "teacher_cache_sha256": None}


def is_distilled(config: dict, log_columns=()) -> bool:
    """Whether the run was made by distill_student.py: its config names a teacher; a folder
    whose config.json cannot be read is known by its log.csv columns, where only a distilled
    run has named terms (train_ce, train_kd, ...: the CE runs log train_loss alone)."""
    terms = set(c for c in log_columns if c.startswith("train_")) - {
        "train_loss", "train_top1", "train_img_per_s"}
    return "teacher_ckpt" in config or "teacher_sha256" in config or bool(terms)


def made_by(config: dict) -> str:
    """The script that made a run with this config."""
    from kd.models import TEACHER_ARCH  # here: kd.models imports torchvision (module docstring)
    if is_distilled(config):
        return "distill_student.py"
    return "train_teacher.py" if config.get("arch") == TEACHER_ARCH else "train_student.py"


def settings(config: dict) -> dict:
    """What a run computes: its config without EXECUTION_KEYS, a distilled run's completed
    with the later_defaults() it predates."""
    if is_distilled(config):
        config = {**later_defaults(), **config}
    return {k: v for k, v in config.items() if k not in EXECUTION_KEYS}


def changed_settings(saved: dict, planned: dict, keys=None) -> list[str]:
    """How the run `saved` describes differs from the one `planned` describes: 'made by X, not
    Y' when different scripts make them, else '--key saved -> planned' for each setting of
    `keys` (default: all of both) that differs."""
    if made_by(saved) != made_by(planned):
        return [f"made by {made_by(saved)}, not {made_by(planned)}"]
    old, new = settings(saved), settings(planned)
    keys = set(old) | set(new) if keys is None else set(keys) - EXECUTION_KEYS
    return [f"--{k} {old.get(k)} -> {new.get(k)}" for k in sorted(keys) if old.get(k) != new.get(k)]


def experiment_key(config: dict) -> str | None:
    """What a run computes but its seed: two run folders with the same key are seeds of one
    experiment. None for a config without a seed (unreadable or foreign), never grouped."""
    if "seed" not in config:
        return None
    experiment = {k: v for k, v in settings(config).items() if k != "seed"}
    return json.dumps(experiment, sort_keys=True, default=str)


def resumed_config(saved: dict, config: dict, epochs_done: int) -> dict:
    """The saved run's config updated with where and how it runs now (epochs, device, processes,
    command, versions), once nothing that changes what it computes differs.

    Refuses a run another script made, any difference in a flag that changes what the run
    computes (lr, batch size, seed, model, alpha, T, the teacher's weights...), and fewer epochs
    than already done.
    """
    changed = changed_settings(saved, config, (set(saved) | set(config)) - {"epochs"})
    if changed and changed[0].startswith("made by"):
        raise UserError(f"--resume: the folder holds a run {changed[0]}; resume it with "
                        f"{made_by(saved)} or start a new --out_dir")
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
    return shlex.join([sys.executable, *argv, flag])


def stopped_message(epochs_done: int, init_epochs_done: int = 0) -> str:
    if epochs_done == 0 and init_epochs_done:
        return (f"last.pt holds init epoch {init_epochs_done}. Resume with:\n"
                f"  {rerun_command('--resume')}")
    if epochs_done == 0:
        return (f"no epoch finished, so nothing was saved. Start again with:\n"
                f"  {rerun_command('--overwrite')}")
    return f"last.pt holds epoch {epochs_done}. Resume with:\n  {rerun_command('--resume')}"

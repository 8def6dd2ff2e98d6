"""study.py's jobs through submitit: on a SLURM cluster, or on this machine with submitit's local
executor. study.py plans the runs and decides which are left to do; this module submits them,
records their job ids, and asks the scheduler how they are.

Each job runs one command of the study, the same command line the local launcher runs, in a child
process (kd.job.RunJob). SLURM warns a job before its time limit, and submitit's local executor
does the same, with SIGUSR2 to the job's process; submitit then calls RunJob.checkpoint(), which
asks the run to stop (SIGTERM: it stops at its next step, keeping the last.pt of its last saved
epoch) and hands back the job to requeue. Every start of a job looks at its run folder
(kd.rundir) and resumes from last.pt when there is one, so a requeue, a job SLURM requeued by
itself and a job study.py resubmits all continue the run exactly as an uninterrupted one.
"""
import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit
import torch
from submitit.core.utils import FailedJobError, FailedSubmissionError, JobPaths

from kd.checkpoint import write_json
from kd.errors import UserError, stop_requested, stop_signals, stops_deferred
from kd.flags import number, positive_int
from kd.job import RunJob
from kd.timing import allowed_cpus

LAUNCHERS = ("local", "submitit_local", "slurm")
JOBS_FILE = "jobs.json"  # in the study folder: the job id of each run submitted
LOG_DIR = "submitit"  # below the study folder: submitit's pickles and each job's own log
# scheduler states (sacct) of a job that may still run; submitit's own list of unfinished ones
QUEUED = {"PENDING", "READY", "REQUEUED", "PREEMPTED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"}


def add_flags(p: argparse.ArgumentParser) -> None:
    """The launcher's flags, on study.py's parser."""
    g = p.add_argument_group("launcher (see README, Studies on a cluster)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: the runs as processes of this command, --jobs at a time; slurm: "
                        "every run a SLURM job through submitit, one job array; submitit_local: "
                        "the same through submitit's local executor (every run at once, here)")
    g.add_argument("--wait", action="store_true",
                   help="submitit launchers: wait until every job has ended and print the summary, "
                        "instead of returning once they are submitted")
    g.add_argument("--status", action="store_true",
                   help="print each run's state (done, queued, running, failed with its last "
                        "output lines, to do) from its folder and the scheduler; submit nothing")
    g.add_argument("--partition", default=None,
                   help="SLURM partition; default: the cluster's default partition")
    g.add_argument("--timeout_min", type=positive_int, default=240,
                   help="time limit of each job in minutes; a run that reaches it is requeued "
                        "and resumes from its last.pt")
    g.add_argument("--gpus_per_run", type=positive_int, default=1,
                   help="GPUs of each run on each of its nodes: one task per GPU, DDP as "
                        "under torchrun")
    g.add_argument("--nodes_per_run", type=positive_int, default=1, help="nodes of each run")
    g.add_argument("--gpus_per_node", type=positive_int, default=8,
                   help="GPUs of the partition's nodes (checks --gpus_per_run)")
    g.add_argument("--cpus_per_gpu", type=positive_int, default=8,
                   help="CPU cores of each task (data loading runs in the training process)")
    g.add_argument("--mem_gb_per_gpu", type=positive_int, default=32,
                   help="memory of each task, GB")
    g.add_argument("--array_parallelism", type=positive_int, default=64,
                   help="runs of the job array running at once at most")
    g.add_argument("--max_requeues", type=number(int, 0), default=3,
                   help="times a job is requeued after a preemption or its time limit")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra #SBATCH option, e.g. --sbatch account=vision --sbatch "
                        "qos=high --sbatch constraint=a100 (KEY alone: a switch); repeatable")


def settings(args: argparse.Namespace) -> dict:
    """The launcher's flags as study.json records them."""
    names = ["launcher", "partition", "timeout_min", "gpus_per_run", "nodes_per_run",
             "gpus_per_node", "cpus_per_gpu", "mem_gb_per_gpu", "array_parallelism",
             "max_requeues", "sbatch"]
    return {name: getattr(args, name) for name in names}


def sbatch_options(pairs: list[str]) -> dict:
    """--sbatch account=vision qos -> {'account': 'vision', 'qos': True}."""
    options = {}
    for pair in pairs:
        key, is_pair, value = pair.partition("=")
        key = key.strip().lstrip("-")
        if not key or " " in key:
            raise UserError(f"--sbatch {pair}: give an #SBATCH option as KEY=VALUE, e.g. "
                            f"--sbatch account=vision")
        options[key] = value if is_pair else True
    return options


def check(args: argparse.Namespace) -> None:
    """Refuse, in one line and before anything is written, a launch that cannot go: no SLURM
    here, a run larger than a node, an unknown partition (a time limit of 0 and other counts
    below 1 are refused by their flags' types)."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if args.launcher == "slurm" and missing:
        raise UserError(f"--launcher slurm: no {' or '.join(missing)} on PATH, so no SLURM "
                        f"cluster is reachable from here (run study.py on a login node); "
                        f"--launcher local runs the study on this machine, --launcher "
                        f"submitit_local through submitit's local executor")
    if args.launcher == "slurm" and args.wait and shutil.which("sacct") is None:
        raise UserError("--wait: no sacct on PATH, so the jobs' states cannot be read and the "
                        "wait would not end; submit without --wait and use --status")
    if args.gpus_per_run > args.gpus_per_node:
        raise UserError(f"--gpus_per_run {args.gpus_per_run} is more than a node has "
                        f"(--gpus_per_node {args.gpus_per_node}); use --nodes_per_run to span "
                        f"nodes")
    if args.launcher == "submitit_local" and args.nodes_per_run > 1:
        raise UserError("--nodes_per_run: submitit's local executor has one node, this one")
    sbatch_options(args.sbatch)
    if args.launcher == "slurm" and args.partition and shutil.which("sinfo"):
        known = partitions()
        if known and args.partition not in known:
            raise UserError(f"--partition {args.partition}: no such partition (sinfo lists "
                            f"{', '.join(known)})")


def partitions() -> list[str]:
    """The cluster's partitions, as sinfo lists them (the default one is starred)."""
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return sorted({line.strip().rstrip("*") for line in out.splitlines() if line.strip()})


def threads_per_run(n_at_once: int) -> str:
    """OMP_NUM_THREADS for each of n_at_once runs side by side on this machine's CPU: an equal
    share of the cores this process may use, and never more than an OMP_NUM_THREADS already set
    asks for."""
    share = max(1, len(allowed_cpus()) // max(1, n_at_once))
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return str(min(share, max(1, int(asked))) if asked.isdigit() else share)


def executor(args: argparse.Namespace, out_dir: str) -> submitit.AutoExecutor:
    """submitit's executor for the study's jobs, their logs below OUT_DIR/submitit (in a folder
    per job on SLURM).

    The jobs' Python is this one, with this repository first on its path (the job unpickles
    RunJob from kd.job). Local jobs all start at once; each run gets the threads the study
    gives it (study.run_env), as under the local launcher."""
    path = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                            *filter(None, [os.environ.get("PYTHONPATH")])])
    local = args.launcher == "submitit_local"
    python = shlex.join(["env", f"PYTHONPATH={path}", sys.executable])
    folder = os.path.join(out_dir, LOG_DIR, "" if local else "%j")  # local: one folder
    ex = submitit.AutoExecutor(folder=folder,
                               cluster="local" if local else "slurm",
                               slurm_max_num_timeout=args.max_requeues,
                               local_max_num_timeout=args.max_requeues,
                               slurm_python=python, local_python=python)
    gpus = min(args.gpus_per_run, torch.cuda.device_count()) if local else args.gpus_per_run
    ex.update_parameters(name="study", timeout_min=args.timeout_min, nodes=args.nodes_per_run,
                         tasks_per_node=args.gpus_per_run, gpus_per_node=gpus,
                         cpus_per_task=args.cpus_per_gpu,
                         mem_gb=args.mem_gb_per_gpu * args.gpus_per_run,
                         slurm_partition=args.partition, slurm_signal_delay_s=120,
                         slurm_array_parallelism=args.array_parallelism,
                         slurm_additional_parameters=sbatch_options(args.sbatch) or None)
    return ex


def read_jobs(out_dir: str) -> dict[str, dict]:
    """OUT_DIR/jobs.json: {run name: {'job_id', 'launcher'}} of the jobs submitted last."""
    path = os.path.join(out_dir, JOBS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            jobs = json.load(f)["runs"]
        if not isinstance(jobs, dict):
            raise TypeError("its runs are not a mapping")
        broken = [name for name, entry in jobs.items()
                  if not (isinstance(entry, dict) and {"job_id", "folder"} <= set(entry))]
        if broken:
            raise TypeError(f"the entry of {broken[0]} lacks its job_id or folder")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path} ({e}); move it away") from None
    return jobs


def write_jobs(out_dir: str, jobs: dict[str, dict]) -> None:
    try:
        write_json(os.path.join(out_dir, JOBS_FILE), {"runs": jobs})
    except OSError as e:
        raise UserError(f"cannot write {os.path.join(out_dir, JOBS_FILE)}: {e}") from None


def scheduler_states(records: dict[str, dict]) -> dict[str, str]:
    """Each recorded job's state, by name: 'queued', 'running', 'unknown' (the scheduler has no
    record of it: it may still run) or 'ended: STATE'. A local job is a process of this
    machine, running while its controller process lives; SLURM's jobs are asked in one sacct."""
    slurm = {name: entry for name, entry in records.items() if entry.get("launcher") == "slurm"}
    states = {name: local_state(entry) for name, entry in records.items() if name not in slurm}
    if slurm and shutil.which("sacct") is None:
        return {**states, **{name: "unknown" for name in slurm}}
    jobs = {name: submitit.SlurmJob(entry["folder"], str(entry["job_id"]))
            for name, entry in slurm.items()}  # each registers with submitit's sacct watcher
    if jobs:
        submitit.SlurmJob.watcher.update()
    for name, job in jobs.items():
        state = job.watcher.get_state(job.job_id, mode="cache").split()[0].upper()
        if state == "UNKNOWN":  # "CANCELLED by 123" above: the first word
            states[name] = "unknown"
        elif state in QUEUED:
            states[name] = "queued"
        else:
            states[name] = "running" if state in RUNNING else f"ended: {state}"
    return states


def local_state(entry: dict) -> str:
    try:
        pid = int(entry["job_id"])
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return "ended: no process"
    alive = stat.rsplit(") ", 1)[1][0] not in "ZX" and b"submitit" in cmdline  # a reused pid?
    return "running" if alive else "ended: no process"


def alive(state: str) -> bool:
    return not state.startswith("ended")


def submit(todo: list, args: argparse.Namespace, out_dir: str, states: dict[str, str]
           ) -> dict[str, dict]:
    """Submit the study's jobs `todo` (study.Job, the cache build first if any) whose job is not
    alive (states: scheduler_states of the recorded jobs); returns the new records.

    The runs of a SLURM study start once the cache build has succeeded (afterok; the runs go as
    one array, so the baseline waits for the build too); the local executor has no dependencies,
    so there the cache is built before the runs are submitted, and they are not submitted if
    the build failed. Every job id is recorded in OUT_DIR/jobs.json as it is submitted."""
    records = read_jobs(out_dir)
    todo = [job for job in todo if not alive(states.get(job.name, "ended"))]
    runs = [job for job in todo if not job.builds_cache]
    building = alive(states.get("teacher cache", "ended"))
    submitted = {}
    for job in todo:
        if job.builds_cache:
            submitted.update(submit_jobs(executor(args, out_dir), [job], args, out_dir,
                                         records))
            building = True
    after = records["teacher cache"]["job_id"] if building and runs else None
    if after is not None and args.launcher == "submitit_local":
        print(f"waiting for the teacher cache build (job {after}): the local executor has no "
              f"job dependencies", flush=True)
        while alive(local_state(records["teacher cache"])) and not stop_requested():
            time.sleep(0.5)
        cache_file = next((job.config["teacher_cache"] for job in runs if job.reads_cache), None)
        if stop_requested() or (cache_file and not os.path.exists(cache_file)):
            return submitted  # the caller names the runs left unsubmitted
        after = None
    if runs:
        ex = executor(args, out_dir)
        if after is not None:
            ex.update_parameters(slurm_dependency=f"afterok:{after}",
                                 slurm_additional_parameters={**sbatch_options(args.sbatch),
                                                              "kill-on-invalid-dep": "yes"})
        submitted.update(submit_jobs(ex, runs, args, out_dir, records))
    return submitted


def submit_jobs(ex: submitit.AutoExecutor, jobs: list, args: argparse.Namespace, out_dir: str,
                records: dict[str, dict]) -> dict[str, dict]:
    """Submit jobs (several: one job array) and record their ids in jobs.json; a stop signal
    meanwhile acts once they are recorded. On SLURM the stop signals are also blocked while
    sbatch runs: it inherits the mask, so a Ctrl-C in the terminal cannot kill it after the
    cluster accepted the jobs and before their ids are recorded (local jobs, started here, keep
    theirs so that Ctrl-C still reaches them)."""
    with stops_deferred():
        try:  # submitit also prints sbatch's refusal: the error below says it once
            with contextlib.redirect_stderr(io.StringIO()), \
                    stop_signals_blocked(args.launcher == "slurm"), ex.batch():
                handles = [ex.submit(run_job(job, args.max_requeues)) for job in jobs]
        except (FailedJobError, FailedSubmissionError, subprocess.SubprocessError, OSError,
                ValueError) as e:
            lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            raise UserError(f"submitting {len(jobs)} job(s) failed, none of them was submitted: "
                            f"{lines[-1].strip()[:300]}") from None
        new = {job.name: {"job_id": handle.job_id, "launcher": args.launcher,
                          "folder": str(handle.paths.folder)}
               for job, handle in zip(jobs, handles)}
        records.update(new)
        write_jobs(out_dir, records)
    for job, handle in zip(jobs, handles):
        print(f"submitted {job.name}: job {handle.job_id}", flush=True)
    return new


@contextlib.contextmanager
def stop_signals_blocked(block: bool):
    """Block the stop signals in the block (and the processes started there) when block is
    true; pending ones are delivered when it ends."""
    if not block:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_job(job, max_requeues: int) -> RunJob:
    """The RunJob of a study.Job: its command as the local launcher runs it, the flags that
    resume it left for each start to decide."""
    command = [t for t in job.command(shown=False) if t not in ("--resume", "--overwrite")]
    if job.builds_cache:
        return RunJob(command, job.env, job.output_log, done_file=job.cache_file,
                      max_requeues=max_requeues)
    return RunJob(command, job.env, job.output_log, out_dir=job.out_dir,
                  max_requeues=max_requeues)


def log_tail(entry: dict, lines: int = 8) -> list[str]:
    """The last lines of a job's own log (rank 0's stdout, then its stderr, where an error
    goes), for a job that failed before its run wrote any output."""
    paths = JobPaths(entry["folder"], job_id=str(entry["job_id"]), task_id=0)
    out = []
    for path in (paths.stdout, paths.stderr):
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            out += [line.rstrip() for line in f if line.strip()]
    return out[-lines:]

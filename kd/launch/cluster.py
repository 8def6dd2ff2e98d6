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
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import submitit
import torch
from submitit.core.utils import FailedJobError, FailedSubmissionError

from kd.errors import StopRequested, UserError, say, stop_requested, stop_signals, stops_deferred
from kd.flags import number, positive_int
from kd.job import RunJob
from kd.launch.folder import (REPO, failure_report, print_report_command, record_command,
                              result_line)
from kd.launch.records import (JOBS_FILE, LOG_DIR, alive, local_state, read_jobs, recorded_states,
                               status_lines, with_job_log, write_jobs)
from kd.rundir import verdict

LAUNCHERS = ("local", "submitit_local", "slurm")


def add_flags(p: argparse.ArgumentParser) -> None:
    """The launcher's flags, on study.py's parser."""
    g = p.add_argument_group("launcher (see docs/clusters.md)")
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
    g.add_argument("--gpus_per_run", type=number(int, 0), default=1,
                   help="GPUs of each run on each of its nodes: one task per GPU, DDP as "
                        "under torchrun; 0: one task on CPUs alone (a cluster without GPUs)")
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


def executor(args: argparse.Namespace, out_dir: str) -> submitit.AutoExecutor:
    """submitit's executor for the study's jobs, their logs below OUT_DIR/submitit (in a folder
    per job on SLURM).

    The jobs' Python is this one, with this repository first on its path (the job unpickles
    RunJob from kd.job). Local jobs all start at once; each run gets the threads the study
    gives it (kd.launch.local.run_env), as under the local launcher."""
    path = os.pathsep.join([str(REPO),
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
    tasks = max(1, args.gpus_per_run)  # --gpus_per_run 0: one task, on CPUs
    ex.update_parameters(name="study", timeout_min=args.timeout_min, nodes=args.nodes_per_run,
                         tasks_per_node=tasks, gpus_per_node=gpus,
                         cpus_per_task=args.cpus_per_gpu, mem_gb=args.mem_gb_per_gpu * tasks,
                         slurm_partition=args.partition, slurm_signal_delay_s=120,
                         slurm_array_parallelism=args.array_parallelism,
                         slurm_additional_parameters=sbatch_options(args.sbatch) or None)
    return ex


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


def run_study(args: argparse.Namespace, jobs: list, todo: list) -> None:
    """--launcher slurm or submitit_local, in the study's lock: submit the jobs of todo (study.Job,
    left to do) that are not alive in the scheduler, then return, or with --wait wait for them
    and end as the local launcher does."""
    states = recorded_states(jobs, args.out_dir)
    print("\n".join(status_lines(jobs, todo, states, args.out_dir)[0]), flush=True)
    record_command(args.out_dir, settings(args))
    submitted = submit(todo, args, args.out_dir, states)
    unsent = [job for job in todo if job.name not in submitted
              and not alive(states.get(job.name, "ended"))]
    if stop_requested():
        raise StopRequested(f"{len(submitted)} jobs were submitted and recorded in "
                            f"{os.path.join(args.out_dir, JOBS_FILE)}; the same "
                            f"command submits the rest")
    if unsent:
        failed = [(job, "not submitted: the teacher cache build failed") for job in unsent]
        cache = [job for job in jobs if job.builds_cache]
        say(failure_report(with_job_log(
            [(job, "job ended, no cache written") for job in cache] + failed, args.out_dir),
            len(todo)))
        sys.exit(1)
    if not args.wait:
        print(f"{len(submitted)} jobs submitted, logs in "
              f"{os.path.join(args.out_dir, LOG_DIR)}; the same command with --status "
              f"shows how they are, and without it resubmits the failed ones", flush=True)
        return
    wait_for_jobs(todo, args)  # those submitted now and those alive from before
    records = read_jobs(args.out_dir)
    failed = []
    for job in todo:
        if os.path.exists(job.cache_file) if job.builds_cache else verdict(job.out_dir) == "done":
            print(f"done  {job.name}{result_line(job)}", flush=True)
        else:
            failed.append((job, f"job {records.get(job.name, {}).get('job_id', '?')} ended, "
                                f"the run did not finish"))
    if failed:
        say(failure_report(with_job_log(failed, args.out_dir), len(todo)))
        sys.exit(1)
    print_report_command(args.out_dir)


def wait_for_jobs(todo: list, args: argparse.Namespace) -> None:
    """Wait until no job of todo is queued or running; a stop signal stops the waiting."""
    poll_s = 0.5 if args.launcher == "submitit_local" else 30  # sacct is the cluster's to share
    while any(alive(state) for state in recorded_states(todo, args.out_dir).values()):
        if stop_requested():
            where = ("the local jobs share this terminal: they stop too, keeping their last.pt"
                     if args.launcher == "submitit_local" else "the jobs go on on the cluster")
            raise StopRequested(f"stopped waiting; {where}; --status shows how they are, the "
                                f"same command resubmits failed ones")
        polled = time.monotonic()
        while time.monotonic() - polled < poll_s and not stop_requested():  # Ctrl-C acts now
            time.sleep(0.5)

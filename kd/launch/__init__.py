"""Launching a study's jobs, which study.py plans (study.Job: a command, its run folder, its
settings). One interface for the three launchers: `launcher(args, jobs)` checks, before anything
is written, that the launch can go and returns what runs the jobs left to do, which study.py
calls in the study's lock (folder.only_study_running):

    local            processes of study.py on this machine, --jobs at a time (kd.launch.local)
    submitit_local   submitit jobs on this machine                          (kd.launch.cluster)
    slurm            submitit jobs on a SLURM cluster, one job array         (kd.launch.cluster)

kd.launch.folder keeps the study folder (its lock, study.json, the final report line),
kd.launch.records the submitted jobs (jobs.json) and what the scheduler says of them.
"""
import argparse
from typing import Callable

from kd.launch import cluster, local
from kd.launch.cluster import LAUNCHERS, add_flags, settings
from kd.launch.folder import (LOCK_FILE, failure_report, only_study_running, record_command,
                              shown_path)
from kd.launch.local import run_env, threads_per_run
from kd.launch.records import JOBS_FILE, LOG_DIR, read_jobs, recorded_states, status_lines, \
    with_job_log

__all__ = ["LAUNCHERS", "JOBS_FILE", "LOCK_FILE", "LOG_DIR", "add_flags", "failure_report",
           "launcher", "only_study_running", "read_jobs", "record_command", "recorded_states",
           "run_env", "settings", "shown_path", "status_lines", "threads_per_run",
           "with_job_log"]


def launcher(args: argparse.Namespace, jobs: list) -> Callable[[list], None]:
    """args.launcher's, checked before anything is written (no GPU for --device cuda, no SLURM
    here, a run larger than a node...): a function of the jobs left to do that runs them, or
    submits them, and ends as that launcher does."""
    if args.launcher == "local":
        slots = local.gpu_slots(jobs[-1].config["device"], args.jobs)
        return lambda todo: local.run_study(args, jobs, todo, slots)
    cluster.check(args)
    return lambda todo: cluster.run_study(args, jobs, todo)

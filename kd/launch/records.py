"""The jobs.json of a study submitted through submitit, and what the scheduler says of its jobs:
queued, running, or ended (with the end of a job's own log), as study.py --status shows them."""
import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths

from kd.checkpoint import write_json
from kd.errors import UserError

JOBS_FILE = "jobs.json"  # in the study folder: the job id of each run submitted
LOG_DIR = "submitit"  # below the study folder: submitit's pickles and each job's own log
# scheduler states (sacct) of a job that may still run; submitit's own list of unfinished ones
QUEUED = {"PENDING", "READY", "REQUEUED", "PREEMPTED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED"}
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"}


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
    machine, running while its controller process lives; SLURM's jobs are asked in one sacct,
    and those sacct has no record of in one squeue: an array's element cancelled while it
    waited has no accounting record of its own, ever, and is ended once the queue has it no
    more."""
    slurm = {name: entry for name, entry in records.items() if entry.get("launcher") == "slurm"}
    states = {name: local_state(entry) for name, entry in records.items() if name not in slurm}
    if slurm and shutil.which("sacct") is None:
        return {**states, **{name: "unknown" for name in slurm}}
    jobs = {name: submitit.SlurmJob(entry["folder"], str(entry["job_id"]))
            for name, entry in slurm.items()}  # each registers with submitit's sacct watcher
    if jobs:
        submitit.SlurmJob.watcher.update()
    sacct = {name: job.watcher.get_state(job.job_id, mode="cache").split()[0].upper()
             for name, job in jobs.items()}  # "CANCELLED by 123": the first word
    unrecorded = [str(slurm[name]["job_id"]) for name, state in sacct.items() if state == "UNKNOWN"]
    queue = in_queue(unrecorded) if unrecorded else set()
    for name, state in sacct.items():
        if state == "UNKNOWN":
            gone = queue is not None and str(slurm[name]["job_id"]) not in queue
            states[name] = "ended: no record (cancelled before it started?)" if gone else "unknown"
        elif state in QUEUED:
            states[name] = "queued"
        else:
            states[name] = "running" if state in RUNNING else f"ended: {state}"
    return states


def in_queue(job_ids: list[str]) -> set[str] | None:
    """Which of these SLURM jobs (array elements by their own ids, 1002_3) the queue holds; None
    when squeue cannot say."""
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", "--jobs",
                              ",".join(job_ids)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # none of them is known to the controller any more
        return set() if "Invalid job id" in out.stderr else None
    return set(out.stdout.split())


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


def log_tail(entry: dict, lines: int = 8) -> list[str]:
    """The last lines of a job's own log (rank 0's stdout, then its stderr, where an error
    goes), for a job that failed before its run wrote any output."""
    paths = JobPaths(entry["folder"], job_id=str(entry["job_id"]), task_id=0)
    out = []
    for path in (paths.stdout, paths.stderr):
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            out += [line.rstrip() for line in f if line.strip()]
    return out[-lines:]


def recorded_states(jobs: list, out_dir: str) -> dict[str, str]:
    """The scheduler's state (scheduler_states) of the job last submitted for each
    planned job that OUT_DIR/jobs.json records."""
    records = read_jobs(out_dir)
    return scheduler_states({job.name: records[job.name] for job in jobs if job.name in records})


def status_lines(jobs: list, todo: list, states: dict[str, str], out_dir: str
                 ) -> tuple[list[str], list[tuple]]:
    """One line per planned job: done, queued, running, failed (its job ended, its run not
    finished: with its last output lines) or to do; and the failed jobs with why."""
    records = read_jobs(out_dir)
    left = {job.name for job in todo}
    lines, failed, counts = [], [], {}
    for job in jobs:
        state, detail = states.get(job.name), ""
        if job.name not in left:
            word = "done"
        elif state and alive(state):
            word, detail = state, f"job {records[job.name]['job_id']}"
            if state == "unknown":
                detail += " (the scheduler has no record of it: it is left alone; remove its " \
                          "entry from jobs.json to resubmit it)"
        elif state:
            word, detail = "failed", f"job {records[job.name]['job_id']} {state}"
            failed.append((job, detail))
        else:
            word = "to do" + (" (resume)" if "--resume" in job.argv else "")
        kind = word.split(" (")[0]
        counts[kind] = counts.get(kind, 0) + 1
        lines.append(f"{word:<8} {job.name}" + (f"  {detail}" if detail else ""))
    summary = ", ".join(f"{n} {word}" for word, n in counts.items())
    return [f"study {out_dir}: {len(jobs)} jobs: {summary}", *lines], failed


def with_job_log(failed: list[tuple], out_dir: str) -> list[tuple]:
    """Each failure's why, with the end of its job's own log when its run wrote no output (it
    failed before the run started)."""
    records = read_jobs(out_dir)
    out = []
    for job, why in failed:
        if job.name in records and not os.path.exists(job.output_log):
            tail = log_tail(records[job.name])
            why += "".join(f"\n  | {line}" for line in tail)
        out.append((job, why))
    return out

"""The local launcher: the study's runs as processes of study.py on this machine, --jobs at a
time, one per GPU slot, the runs that read the teacher cache after its build; and the variables
every run of the study gets on this machine, whichever launcher starts it."""
import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

import torch

from kd.distributed import resolve_device
from kd.errors import StopRequested, UserError, on_signal, say, stop_requested, stop_signals
from kd.launch.folder import failure_report, print_report_command, record_command, result_line
from kd.launch.records import alive, recorded_states
from kd.timing import allowed_cpus

PROGRESS_EVERY_S = 60  # how often the console names the epoch of each run in flight


def threads_per_run(n_at_once: int) -> str:
    """OMP_NUM_THREADS for each of n_at_once runs side by side on this machine's CPU: an equal
    share of the cores this process may use, and never more than an OMP_NUM_THREADS already set
    asks for."""
    share = max(1, len(allowed_cpus()) // max(1, n_at_once))
    asked = os.environ.get("OMP_NUM_THREADS", "")
    return str(min(share, max(1, int(asked))) if asked.isdigit() else share)


def run_env(device: str, jobs: int | None) -> dict[str, str]:
    """The variables every job of the study runs with on this machine, whichever launcher starts
    it or prints its command: on the CPU, when --jobs runs go side by side, its share of the cores
    (threads_per_run). A CPU run's sums come out differently, at float rounding, with
    another thread count, so a run's thread count is the study's to set, not the launcher's.
    Nothing for one run at a time (it takes the threads torch gives it) or on GPUs."""
    if device == "cuda" or resolve_device(device).type != "cpu" or (jobs or 1) == 1:
        return {}
    return {"OMP_NUM_THREADS": threads_per_run(jobs)}


def gpu_slots(device: str, jobs: int | None) -> list[str | None]:
    """One entry per run at a time: the CUDA_VISIBLE_DEVICES of its runs, None on the CPU."""
    gpus = []
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to this process")
    if device != "cpu" and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        names = [v.strip() for v in visible.split(",")] if visible else []
        gpus = [names[i] if i < len(names) else str(i) for i in range(torch.cuda.device_count())]
    count = jobs or max(1, len(gpus))
    return [gpus[i % len(gpus)] if gpus else None for i in range(count)]


def run_all(jobs: list, slots: list[str | None]) -> list[tuple]:
    """Run the jobs in order, at most one per slot at a time, the runs that read the teacher
    cache after its build; returns each failed job with why. On a stop signal (Ctrl-C, SIGTERM,
    a closed terminal), or any error here, the running ones are asked to stop (a run keeps its
    last.pt) before this returns or raises; a second stop signal kills them and quits at once."""
    pending, running, failed, finished = list(jobs), {}, [], 0
    progress_shown = time.perf_counter()

    def quit_runs_too(signum, frame) -> None:  # the second stop signal quits the runs at once
        if stop_requested():
            for _, process, _, _ in running.values():
                process.kill()
        on_signal(signum, frame)

    previous_handlers = {sig: signal.signal(sig, quit_runs_too) for sig in stop_signals()}
    try:
        while pending or running:
            if stop_requested():
                break
            building = any(j.builds_cache for j in pending + [r[0] for r in running.values()])
            for slot in [s for s in range(len(slots)) if s not in running]:
                job = next((j for j in pending if not (j.reads_cache and building)), None)
                if job is None or stop_requested():
                    break
                pending.remove(job)
                running[slot] = start(job, slots[slot])
            time.sleep(0.2)
            if running and time.perf_counter() - progress_shown > PROGRESS_EVERY_S:
                print("running: " + ", ".join(progress(r[0]) for r in running.values()), flush=True)
                progress_shown = time.perf_counter()
            for slot, (job, process, log, began) in list(running.items()):
                if process.poll() is None:
                    continue
                log.close()
                del running[slot]
                minutes = (time.perf_counter() - began) / 60
                if process.returncode == 0:
                    finished += 1
                    print(f"done  {job.name} in {minutes:.1f} min{result_line(job)} "
                          f"[{finished}/{len(jobs)}]", flush=True)
                    continue
                failed.append((job, f"exit code {process.returncode} after {minutes:.1f} min"))
                if finished == 0:  # nothing has worked yet: likely the setup, not this run
                    print(f"fail  {job.name}: no run has finished yet, so no new one starts; "
                          f"the failures are listed at the end", flush=True)
                    failed += [(j, "not started: an earlier run failed first") for j in pending]
                    pending = []
                elif job.builds_cache:
                    failed += [(j, "not run: the teacher cache build failed")
                               for j in pending if j.reads_cache]
                    pending = [j for j in pending if not j.reads_cache]
    finally:
        for job, process, log, _ in running.values():  # started in their own sessions: no
            process.send_signal(signal.SIGTERM)        # Ctrl-C reached them
        for job, process, log, _ in running.values():
            process.wait()
            log.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if stop_requested():
        raise StopRequested("the runs that were going keep their last.pt; the same command "
                            "resumes the study")
    return failed


def progress(job) -> str:
    """'name epoch k/n' from the rows of the run's log.csv so far ('name' for the cache build)."""
    if job.builds_cache:
        return job.name
    try:
        with open(os.path.join(job.out_dir, "log.csv")) as f:
            done = max(0, sum(1 for _ in f) - 1)
    except OSError:
        done = 0
    return f"{job.name} epoch {done}/{job.config.get('epochs', '?')}"


def start(job, gpu: str | None) -> tuple:
    """Start the job on gpu (None: the CPU), its output appended to its folder's log."""
    try:
        os.makedirs(job.out_dir, exist_ok=True)
        log = open(job.output_log, "a")
        log.write(f"$ {shlex.join(job.command())}\n")
        log.flush()
        visible = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
        process = subprocess.Popen(job.command(shown=False), stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **job.env, **visible},
                                   start_new_session=True)
    except OSError as e:
        raise UserError(f"cannot start {job.name} in {job.out_dir}: {e}") from None
    print(f"start {job.name}" + (f" (GPU {gpu})" if visible else ""), flush=True)
    return job, process, log, time.perf_counter()


def run_study(args: argparse.Namespace, jobs: list, todo: list, slots: list[str | None]) -> None:
    """--launcher local, in the study's lock: run the jobs of todo (study.Job, left to do) as
    processes here, one per slot at a time (gpu_slots), unless jobs of this study submitted
    through submitit are still alive; ends with the failures or the report's command."""
    going = [name for name, state in recorded_states(todo, args.out_dir).items() if alive(state)]
    if going:
        raise UserError(f"{len(going)} jobs of this study are still queued or running "
                        f"({', '.join(going[:3])}{', ...' if len(going) > 3 else ''}; "
                        f"--status shows them): wait for them or cancel them first")
    record_command(args.out_dir)
    runs = [job for job in todo if not job.builds_cache]
    print(f"study {args.out_dir}: {len(runs)} of {len(jobs) - jobs[0].builds_cache} runs to "
          f"do ({sum('--resume' in job.argv for job in runs)} to resume)"
          f"{', after the teacher cache build' if len(runs) < len(todo) else ''}; "
          f"{len(slots)} at a time on {'GPU ' + ','.join(slots) if slots[0] else 'the CPU'}",
          flush=True)
    failed = run_all(todo, slots)
    if failed:
        say(failure_report(failed, len(todo)))
        sys.exit(1)
    print_report_command(args.out_dir)

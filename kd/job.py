"""What a submitit job of study.py runs (RunJob): one command of the study in a child process.

The job's own process (submitit's, on the cluster node or here) unpickles RunJob from this module,
which imports neither torch nor torchvision: the run's process imports them, and a job of a
study with many runs starts in a fraction of a second, not in seconds (kd.launch submits them).
"""
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time

import submitit
from submitit.helpers import DelayedSubmission

from kd.rundir import RERUN_FLAGS, verdict

STOP_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGHUP}  # kd.errors
PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
STOP_WAIT_S = 600  # how long a stopping run may take to reach its next step and exit
REQUEUE_WAIT_S = 180  # how long a job whose run was stopped by a signal waits for the requeue


class RunJob:
    """What one submitit job runs: a command of the study in a child process, its output appended
    to `log` (the run folder's study_output.log, as with the local launcher).

    `out_dir` is the run folder: each start adds --resume or --overwrite as kd.rundir says, and a
    finished run is not run again. `done_file`, for the teacher cache build: the file whose
    existence means it is done. With several tasks (GPUs), each task runs the command as one
    torchrun process would (ddp_env)."""

    def __init__(self, command: list[str], env: dict[str, str], log: str, *,
                 out_dir: str | None = None, done_file: str | None = None, max_requeues: int = 3):
        self.command, self.env, self.log = command, env, log
        self.out_dir, self.done_file = out_dir, done_file
        self.max_requeues, self.requeues = max_requeues, 0
        self._process = None

    def __call__(self) -> str:
        if self.done_file and os.path.exists(self.done_file):
            return "done before"
        flags = [] if self.out_dir is None else RERUN_FLAGS[verdict(self.out_dir)]
        if flags is None:
            return "done before"
        environment = submitit.JobEnvironment()
        env = {**os.environ, **self.env, **ddp_env(environment)}
        command = [*self.command, *flags]
        preempt = signal.Signals["SIG" + environment.USR_SIG]
        os.makedirs(os.path.dirname(self.log), exist_ok=True)
        with open(self.log, "a") as log:
            if environment.global_rank == 0:
                variables = [f"{name}={value}" for name, value in self.env.items()]
                log.write(f"$ {shlex.join([*variables, *command])}\n")
                log.flush()
            # SLURM may signal every process of the job: the run must not die of the warning
            # meant for this process; its own session keeps a terminal's Ctrl-C away from it
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=lambda: run_preexec(preempt))
            try:
                while (code := self._process.poll()) is None:
                    time.sleep(0.2)
            finally:
                self.stop()
        if code in STOP_CODES:  # stopped by a signal sent to the whole job: requeue on its way?
            deadline = time.monotonic() + REQUEUE_WAIT_S
            while time.monotonic() < deadline:  # checkpoint() requeues from here, if it comes
                time.sleep(1)
        if code != 0:
            raise RuntimeError(f"{shlex.join(command)} exited with code {code}; its output is in "
                               f"{self.log}")
        return "done"

    def stop(self) -> None:
        """Ask the run to stop at its next step (it keeps its last.pt) and wait for it."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def checkpoint(self) -> DelayedSubmission | None:
        """submitit's preemption and time-limit hook: stop the run, and requeue this job (which
        resumes it) unless it was requeued --max_requeues times already (None: not requeued)."""
        self.stop()
        self.requeues += 1
        return DelayedSubmission(self) if self.requeues <= self.max_requeues else None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": None}  # the process is this start's only


def run_preexec(preempt: signal.Signals) -> None:
    """In the run's process before it starts: ignore the job's preemption warning (meant for
    RunJob, which stops the run itself), and on Linux get SIGTERM, a clean stop, if RunJob dies
    (killed by the local executor or the OOM killer), so no orphan trains on in the folder."""
    signal.signal(preempt, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def ddp_env(environment: submitit.JobEnvironment) -> dict[str, str]:
    """The variables torchrun gives each process (kd.distributed reads them), from submitit's job
    environment: one task per GPU, rank 0's node the rendezvous; none for a single task."""
    if environment.num_tasks == 1:
        return {}
    job_digits = "".join(c for c in environment.raw_job_id if c.isdigit()) or "0"
    return {"RANK": str(environment.global_rank), "LOCAL_RANK": str(environment.local_rank),
            "WORLD_SIZE": str(environment.num_tasks),
            "LOCAL_WORLD_SIZE": str(environment.num_tasks // environment.num_nodes),
            "MASTER_ADDR": environment.hostnames[0],
            "MASTER_PORT": str(20000 + int(job_digits) % 20000)}  # one per job on a shared node

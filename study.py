"""A study: does distillation help the student, by how much, and with which settings?

    python study.py --teacher_ckpt runs/teacher_resnet50/best.pt --out_dir runs/study \\
        --seeds 0 1 2 --method kd --T 1 2 4 8 --alpha 0 0.5 0.9

runs the cross-entropy baseline (train_student.py) once per seed and every grid point
(distill_student.py) once per seed, each an ordinary run folder that can be opened, resumed and
plotted on its own:

    runs/study/ce/seed0    runs/study/kd-T1-alpha0/seed0    ...    runs/study/kd-T8-alpha0.9/seed2

Every flag that study.py does not own goes to the runs. A flag of every run (--epochs, --lr,
--batch_size...) takes one value, the same for the baseline and every grid point. A method's
setting (--T, --alpha, --dkd_beta...) is a grid axis, with one value or several, of each --method
that reads it (--method a b runs both methods), named in the folder names; one that no
--method of the study reads is refused. The grid is the product of a method's axes.
Every run holds out --val_size training images. `python plots/plot_runs.py runs/study` then picks
each method's grid point by its mean validation top-1 at the last epoch, and only then reports
that point's test top-1 against the baseline's, with a confidence interval paired by seed.

The same command again skips finished runs, resumes stopped ones, and refuses a run folder made
with other settings, naming it and them. The runs of logit methods read the teacher's
logits from --teacher_cache, which is built once, before the first of them, when the file is
missing; those of feature methods (a connector in kd/methods/<name>.py) run the teacher online.
Runs go one at a time on the CPU or one GPU, one per GPU at a time on several (--jobs sets how
many); each run's output goes to study_output.log in its folder. A failed run is reported at the
end, with its command and last output lines, and the others go on (none starts after a failure
when no run has finished yet: the setup, not the run, is then the likely cause).

--launcher slurm submits the same commands as SLURM jobs through submitit (kd.launch) and
returns; the same command again, or --status, says how each run is and resubmits the failed ones.
"""
import argparse
import contextlib
import fcntl
import glob
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import distill_student
import train_student
from kd import cache, launch
from kd.checkpoint import file_sha256, write_json
from kd.errors import (StopRequested, UserError, on_signal, run_script, say, stop_requested,
                       stop_signals)
from kd.flags import HelpFormatter, Parser, number
from kd.distributed import resolve_device
from kd.methods import DEFAULT, METHOD_FLAGS, METHODS
from kd.rundir import STUDY_FILE, changed_settings, existing_run_files

REPO = Path(__file__).resolve().parent
OUTPUT_FILE = "study_output.log"  # a run's stdout and stderr, in its folder
LOCK_FILE = ".study.lock"  # locked while a study.py runs in the folder; holds its process id
PROGRESS_EVERY_S = 60  # how often the console names the epoch of each run in flight


@dataclass
class Job:
    """One process of the study: a training run, or the teacher cache build."""
    name: str  # the run folder below --out_dir, or "teacher cache"
    script: str  # train_student.py, distill_student.py, or kd.cache (run as a module)
    argv: list[str]
    out_dir: str  # the run folder, where its output log goes too
    config: dict = field(default_factory=dict)  # the settings its run folder must have
    env: dict = field(default_factory=dict)  # variables it runs with, whichever launcher (run_env)

    @property
    def builds_cache(self) -> bool:
        return self.script == "kd.cache"

    @property
    def distills(self) -> bool:
        return self.script == "distill_student.py"

    @property
    def reads_cache(self) -> bool:
        """A distilled run of a logit method that reads the teacher cache."""
        return bool(self.config.get("teacher_cache"))

    @property
    def cache_file(self) -> str | None:
        """The teacher cache a cache build writes (None for a run)."""
        return self.argv[self.argv.index("--out") + 1] if self.builds_cache else None

    @property
    def output_log(self) -> str:
        """Where its output goes, whichever launcher runs it."""
        return os.path.join(self.out_dir, OUTPUT_FILE)

    def command(self, *, shown: bool = True) -> list[str]:
        """The command line, with the interpreter that runs the study; shown: as a shell runs
        it, its variables first and the script's path relative to the current folder when it
        lies below it (else the argv of a process started with env=self.env)."""
        if self.builds_cache:
            target = ["-m", self.script]
        else:
            target = [shown_path(REPO / self.script) if shown else str(REPO / self.script)]
        variables = [f"{name}={value}" for name, value in self.env.items()] if shown else []
        return [*variables, sys.executable, *target, *self.argv]  # the study's interpreter


def shown_path(path: Path) -> str:
    """path relative to the current folder when it lies below it, else absolute."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def run_flags_epilog() -> str:
    """Which flags go to which runs, read from the scripts' parsers."""
    student = option_strings(train_student.build_parser())
    every = sorted(student - {"-h", "--help", "--out_dir", "--seed", "--val_size", "--resume",
                              "--overwrite"})
    method_flags = {f"--{name}" for names in METHOD_FLAGS.values()
                    for name in names}
    distilled = sorted(option_strings(distill_student.build_parser()) - student - method_flags
                       - {"--teacher_cache"})
    fill = lambda text: textwrap.fill(text, 100, subsequent_indent="    ")
    lines = ["The runs' flags (see train_student.py --help and distill_student.py --help):",
             fill("every run, one value: " + " ".join(every)),
             fill("every distilled run: " + " ".join(distilled) + " (--method: one or more)"),
             "each --method's settings, grid axes of one value or more:"]
    lines += [fill(f"  {method}: " + " ".join(f"--{name}" for name in names))
              for method, names in METHOD_FLAGS.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False,
               epilog=run_flags_epilog())
    p.add_argument("--out_dir", default="runs/study", help="the study folder: one run folder per "
                   "grid point and seed, study.json, the teacher cache")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="every run once per seed; the gain's interval pairs runs by seed")
    p.add_argument("--val_size", type=number(int, 100), default=5000,
                   help="training images every run holds out (a multiple of 100: class-balanced; "
                        "the same for one seed): the grid point is picked on them, never on the "
                        "test set")
    p.add_argument("--teacher_cache", default=None,
                   help="the teacher cache the runs of logit methods read (built first when "
                        "missing); "
                        "default: OUT_DIR/teacher_cache.pt; none: the teacher runs online")
    p.add_argument("--jobs", type=number(int, 1), default=None,
                   help="runs at a time (more than the GPUs share them in turn); default: one "
                        "per visible GPU, or 1 without a GPU")
    p.add_argument("--dry_run", action="store_true",
                   help="print the command of every run still to do, one per line (the cache "
                        "build first; run them from this folder), and run nothing, for a job "
                        "array or another scheduler; writes only OUT_DIR/study.json")
    launch.add_flags(p)
    return p


def flag_values(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """The run flags as given: ['--T', '1', '2', '--logit_std', '--lr=0.1'] ->
    [('--T', ['1', '2']), ('--logit_std', []), ('--lr', ['0.1'])]."""
    groups: list[tuple[str, list[str]]] = []
    for token in tokens:
        if token.startswith("--"):
            flag, is_pair, value = token.partition("=")
            if any(flag == seen for seen, _ in groups):
                raise UserError(f"{flag} is given twice; give all its values after it once")
            groups.append((flag, [value] if is_pair else []))
        elif groups:
            groups[-1][1].append(token)
        else:
            raise UserError(f"unrecognized argument {token} (see study.py --help)")
    return groups


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)  # argparse's table of the flags a parser takes


def route(groups: list[tuple[str, list[str]]]) -> tuple[list[str], list[str], dict, list[str]]:
    """Where each run flag goes: (the flags of every run, the flags of every distilled run, the
    grid axes {name: [tokens of each value]}, the methods)."""
    student_flags = option_strings(train_student.build_parser())
    distill_flags = option_strings(distill_student.build_parser())
    method_names = {name for names in METHOD_FLAGS.values() for name in names}
    shared, distilled, axes, methods = [], [], {}, [DEFAULT]
    for flag, values in groups:
        name = flag[2:]
        if flag in ("--seed", "--resume", "--overwrite"):
            raise UserError(f"{flag} is the study's to set (see --seeds); the same command again "
                            f"resumes stopped runs")
        if flag not in distill_flags:
            raise UserError(f"{flag} is a flag of neither train_student.py nor distill_student.py")
        if flag == "--method":
            if not values:
                raise UserError("--method needs one method or more (see distill_student.py --help)")
            methods = list(dict.fromkeys(values))
        elif name in method_names:  # a grid axis, with one value or more; [[]]: a switch
            axes[name] = [[value] for value in dict.fromkeys(values)] or [[]]
        elif len(values) > 1:
            raise UserError(f"{flag} {' '.join(values)}: only the settings of a --method can take "
                            f"several values ({', '.join(sorted(method_names))}); the baseline "
                            f"must match every run")
        else:
            (shared if flag in student_flags else distilled).extend([flag, *values])
    for name in axes:
        if not any(name in METHOD_FLAGS.get(m, ()) for m in methods):
            raise UserError(f"--{name} is read by no --method of the study ({' '.join(methods)})")
    return shared, distilled, axes, methods


def plan(args: argparse.Namespace, groups: list[tuple[str, list[str]]]) -> list[Job]:
    """Every run of the study, seed by seed (the baseline, then each method's grid), with the
    settings its script's parser makes of its command; the cache build first when the cache
    file is missing and a logit method reads it (a feature method's teacher runs online)."""
    shared, distilled, axes, methods = route(groups)
    cache_path = args.teacher_cache or os.path.join(args.out_dir, "teacher_cache.pt")
    online = cache_path == "none"
    jobs = []
    for seed in dict.fromkeys(args.seeds):
        run = ["--seed", str(seed), "--val_size", str(args.val_size), *shared]
        folder = os.path.join(args.out_dir, "ce", f"seed{seed}")
        jobs.append(Job(f"ce/seed{seed}", "train_student.py", ["--out_dir", folder, *run], folder))
        for method in methods:
            own = [name for name in axes if name in METHOD_FLAGS.get(method, ())]
            for point in itertools.product(*(axes[name] for name in own)):
                name = "-".join([method, *(n + "".join(v) for n, v in zip(own, point))])
                folder = os.path.join(args.out_dir, name, f"seed{seed}")
                settings = [token for n, v in zip(own, point) for token in (f"--{n}", *v)]
                known = METHODS.get(method)  # unknown: the parser says so below
                feature = known is not None and known.connector is not None
                teacher = [] if online or feature else ["--teacher_cache", cache_path]
                argv = ["--out_dir", folder, *run, *distilled, "--method", method, *settings,
                        *teacher]
                jobs.append(Job(f"{name}/seed{seed}", "distill_student.py", argv, folder))
    parsers = {"train_student.py": train_student.build_parser(),
               "distill_student.py": distill_student.build_parser()}
    for script, parser in parsers.items():
        parser.prog = script  # its errors name the script they are about
    teacher_sha256, seen = None, {}
    for job in jobs:
        job.config = vars(parsers[job.script].parse_args(job.argv))  # bad values: one line, exit 2
        same = json.dumps({k: v for k, v in job.config.items() if k != "out_dir"}, sort_keys=True)
        if same in seen:
            raise UserError(f"{seen[same]} and {job.name} would be the same run (a value given "
                            f"twice, as 4 and 4.0?)")
        seen[same] = job.name
        if job.distills:
            teacher = job.config["teacher_ckpt"]
            if not os.path.isfile(teacher):
                raise UserError(f"--teacher_ckpt {teacher}: no such file (train_teacher.py writes "
                                f"it)")
            teacher_sha256 = teacher_sha256 or file_sha256(teacher)
            job.config.update(teacher_sha256=teacher_sha256,
                              teacher_logits="cache" if job.reads_cache else "online")
    if any(job.reads_cache for job in jobs) and not os.path.exists(cache_path):
        takes = option_strings(cache.build_parser())
        flags = [token for flag, values in groups if flag in takes and flag != "--teacher_ckpt"
                 for token in (flag, *values)]
        teacher = next(job for job in jobs if job.reads_cache).config["teacher_ckpt"]
        jobs.insert(0, Job("teacher cache", "kd.cache",
                           ["--teacher_ckpt", teacher, "--out", cache_path, *flags], args.out_dir))
    return jobs


def differences(saved: dict, job: Job) -> list[str]:
    """How the config of a run folder differs from the job's settings (kd.rundir decides),
    compared on the settings the job's command gives."""
    return changed_settings(saved, job.config, job.config)


def to_do(job: Job) -> str:
    """'run', 'resume', 'restart' (the folder holds no saved epoch) or 'done' for the job's run
    folder. Refuses a folder holding a run with other settings than the job's."""
    files = existing_run_files(job.out_dir) if not job.builds_cache else []
    if "last.pt" not in files and "log.csv" not in files:
        return "restart" if files else "run"  # nothing was computed there yet
    try:
        with open(os.path.join(job.out_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        saved = f"{type(e).__name__}: {e}"
    if not isinstance(saved, dict):
        raise UserError(f"{job.out_dir} holds {', '.join(files)} but no readable config.json "
                        f"({saved}); move it away or pick another --out_dir")
    changed = differences(saved, job)
    if changed:
        raise UserError(f"{job.out_dir} holds a run with other settings ({', '.join(changed)}); "
                        f"run the study with the flags it was made with, or another --out_dir")
    if "summary.json" in files:
        return "done"
    return "resume" if "last.pt" in files else "restart"


def refuse_runs_named_otherwise(jobs: list[Job]) -> None:
    """Refuse a planned run that a folder of the study already holds under another name (the
    folder names list the settings given, so giving a default or leaving one out renames)."""
    planned = {os.path.abspath(job.out_dir) for job in jobs}
    runs = [job for job in jobs if not job.builds_cache]
    study_dir = os.path.dirname(os.path.dirname(jobs[-1].out_dir))
    for path in sorted(glob.glob(os.path.join(glob.escape(study_dir), "*", "*", "config.json"))):
        folder = os.path.dirname(path)
        if os.path.abspath(folder) in planned:
            continue
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(saved, dict):
            continue
        for job in runs:
            if not differences(saved, job):
                raise UserError(f"{folder} already holds the run planned as {job.name} (a default "
                                f"given or left out renames it): give the flags as before")


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


def run_env(device: str, jobs: int | None) -> dict[str, str]:
    """The variables every job of the study runs with on this machine, whichever launcher starts
    it or prints its command: on the CPU, when --jobs runs go side by side, its share of the cores
    (kd.launch.threads_per_run). A CPU run's sums come out differently, at float rounding, with
    another thread count, so a run's thread count is the study's to set, not the launcher's.
    Nothing for one run at a time (it takes the threads torch gives it) or on GPUs."""
    if device == "cuda" or resolve_device(device).type != "cpu" or (jobs or 1) == 1:
        return {}
    return {"OMP_NUM_THREADS": launch.threads_per_run(jobs)}


def run_all(jobs: list[Job], slots: list[str | None]) -> list[tuple[Job, str]]:
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


def progress(job: Job) -> str:
    """'name epoch k/n' from the rows of the run's log.csv so far ('name' for the cache build)."""
    if job.builds_cache:
        return job.name
    try:
        with open(os.path.join(job.out_dir, "log.csv")) as f:
            done = max(0, sum(1 for _ in f) - 1)
    except OSError:
        done = 0
    return f"{job.name} epoch {done}/{job.config.get('epochs', '?')}"


def start(job: Job, gpu: str | None) -> tuple:
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


def result_line(job: Job) -> str:
    """', val_top1 x' at the run's last epoch, from its summary.json (the test numbers wait for
    the report, after the selection)."""
    try:
        with open(os.path.join(job.out_dir, "summary.json")) as f:
            return f", val_top1 {json.load(f)['last']['val_top1']:.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def failure_report(failed: list[tuple[Job, str]], total: int) -> str:
    lines = [f"{len(failed)} of {total} study jobs failed or were not started:"]
    for job, why in failed:
        lines += [f"- {job.name}: {why}", f"  {shlex.join(job.command())}"]
        try:
            with open(job.output_log) as f:
                output = f.read().replace("\r", "\n").splitlines()
        except OSError:
            output = []
        lines += [f"  | {line}" for line in [ln for ln in output if ln.strip()][-8:]]
    return "\n".join(lines)


def record_command(out_dir: str, launcher: dict | None = None) -> None:
    """Add this command to OUT_DIR/study.json, which marks the folder as a study, and the
    settings of a submitit launcher (kd.launch.settings) to its launchers."""
    path = os.path.join(out_dir, STUDY_FILE)
    record = {"commands": []}
    try:
        if os.path.exists(path):
            with open(path) as f:
                record = json.load(f)
        commands = record["commands"]
        if not isinstance(commands, list):
            raise TypeError("its commands are not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path} ({e}); move it away") from None
    command = shlex.join([sys.executable, *sys.argv])
    if command not in commands:
        commands.append(command)
    if launcher is not None and launcher not in record.setdefault("launchers", []):
        record["launchers"].append(launcher)
    try:
        os.makedirs(out_dir, exist_ok=True)
        write_json(path, record)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None


@contextlib.contextmanager
def only_study_running(out_dir: str):
    """Refuse to start while another study.py runs in out_dir: both would train, and restart,
    the same runs. The lock is an flock on OUT_DIR/.study.lock, which the system releases when
    its process ends, however it ends; the file holds the owner's process id, for the message,
    and stays (removing it would let a third study lock a new file beside a held one)."""
    path = os.path.join(out_dir, LOCK_FILE)
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(path, "a+", errors="replace")
    except OSError as e:
        raise UserError(f"cannot write to --out_dir {out_dir}: {e}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip()
            raise UserError(f"another study.py (process {owner or 'starting'}) is running in "
                            f"{out_dir}; wait for it or stop it") from None
        except OSError as e:
            raise UserError(f"cannot lock {path}: {e}") from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)


def still_to_do(jobs: list[Job]) -> list[Job]:
    """The jobs whose runs are not finished, with --resume or --overwrite where their folder
    needs it, and the cache build if a distilled run is left. Refuses folders holding runs with
    other settings (to_do), naming the first."""
    todo, refused = [], []
    for job in jobs:
        try:
            action = to_do(job)
        except UserError as e:
            refused.append(str(e))
            continue
        if action != "done":
            job.argv += {"resume": ["--resume"], "restart": ["--overwrite"]}.get(action, [])
            todo.append(job)
    if refused:
        more = f" ({len(refused) - 1} more run folders too)" if len(refused) > 1 else ""
        raise UserError(refused[0] + more)
    refuse_runs_named_otherwise(jobs)
    cached = any(job.reads_cache for job in todo)
    return [job for job in todo if cached or not job.builds_cache]


def recorded_states(jobs: list[Job], out_dir: str) -> dict[str, str]:
    """The scheduler's state (kd.launch.scheduler_states) of the job last submitted for each
    planned job that OUT_DIR/jobs.json records."""
    records = launch.read_jobs(out_dir)
    return launch.scheduler_states({job.name: records[job.name] for job in jobs
                                    if job.name in records})


def status_lines(jobs: list[Job], todo: list[Job], states: dict[str, str], out_dir: str
                 ) -> tuple[list[str], list[tuple[Job, str]]]:
    """One line per planned job: done, queued, running, failed (its job ended, its run not
    finished: with its last output lines) or to do; and the failed jobs with why."""
    records = launch.read_jobs(out_dir)
    left = {job.name for job in todo}
    lines, failed, counts = [], [], {}
    for job in jobs:
        state, detail = states.get(job.name), ""
        if job.name not in left:
            word = "done"
        elif state and launch.alive(state):
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


def with_job_log(failed: list[tuple[Job, str]], out_dir: str) -> list[tuple[Job, str]]:
    """Each failure's why, with the end of its job's own log when its run wrote no output (it
    failed before the run started)."""
    records = launch.read_jobs(out_dir)
    out = []
    for job, why in failed:
        if job.name in records and not os.path.exists(job.output_log):
            tail = launch.log_tail(records[job.name])
            why += "".join(f"\n  | {line}" for line in tail)
        out.append((job, why))
    return out


def submit_study(args: argparse.Namespace, jobs: list[Job]) -> None:
    """--launcher slurm or submitit_local: submit what is left to do and not alive in the
    scheduler, then return, or with --wait wait for the jobs and end as the local launcher does."""
    launch.check(args)  # before anything is written
    with only_study_running(args.out_dir):
        todo = still_to_do(jobs)
        states = recorded_states(jobs, args.out_dir)
        print("\n".join(status_lines(jobs, todo, states, args.out_dir)[0]), flush=True)
        record_command(args.out_dir, launch.settings(args))
        submitted = launch.submit(todo, args, args.out_dir, states)
        unsent = [job for job in todo if job.name not in submitted
                  and not launch.alive(states.get(job.name, "ended"))]
        if stop_requested():
            raise StopRequested(f"{len(submitted)} jobs were submitted and recorded in "
                                f"{os.path.join(args.out_dir, launch.JOBS_FILE)}; the same "
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
                  f"{os.path.join(args.out_dir, launch.LOG_DIR)}; the same command with --status "
                  f"shows how they are, and without it resubmits the failed ones", flush=True)
            return
        wait_for_jobs(todo, args)  # those submitted now and those alive from before
        records = launch.read_jobs(args.out_dir)
        failed = []
        for job in todo:
            if os.path.exists(job.cache_file) if job.builds_cache else to_do(job) == "done":
                print(f"done  {job.name}{result_line(job)}", flush=True)
            else:
                failed.append((job, f"job {records.get(job.name, {}).get('job_id', '?')} ended, "
                                    f"the run did not finish"))
    if failed:
        say(failure_report(with_job_log(failed, args.out_dir), len(todo)))
        sys.exit(1)
    print_report_command(args.out_dir)


def wait_for_jobs(todo: list[Job], args: argparse.Namespace) -> None:
    """Wait until no job of todo is queued or running; a stop signal stops the waiting."""
    poll_s = 0.5 if args.launcher == "submitit_local" else 30  # sacct is the cluster's to share
    while any(launch.alive(state) for state in recorded_states(todo, args.out_dir).values()):
        if stop_requested():
            where = ("the local jobs share this terminal: they stop too, keeping their last.pt"
                     if args.launcher == "submitit_local" else "the jobs go on on the cluster")
            raise StopRequested(f"stopped waiting; {where}; --status shows how they are, the "
                                f"same command resubmits failed ones")
        polled = time.monotonic()
        while time.monotonic() - polled < poll_s and not stop_requested():  # Ctrl-C acts now
            time.sleep(0.5)


def print_report_command(out_dir: str) -> None:
    plot = shown_path(REPO / "plots" / "plot_runs.py")
    report = shlex.join([sys.executable, plot, out_dir, "--out", os.path.join(out_dir, "report")])
    print(f"study complete. Report: {report}")


def main() -> None:
    args, rest = build_parser().parse_known_args()
    jobs = plan(args, flag_values(rest))
    env = {} if args.launcher == "slurm" else run_env(jobs[-1].config["device"], args.jobs)
    for job in jobs:  # this machine's launchers and --dry_run alike (a cluster's nodes: their own)
        job.env = env
    if args.dry_run:
        todo = still_to_do(jobs)
        record_command(args.out_dir)  # marks the folder as a study for the report
        for job in todo:
            print(shlex.join(job.command()))
        say(f"{len(todo)} commands, {len(jobs) - len(todo)} finished runs left out" +
            ("; the first builds the teacher cache: run it before the others"
             if todo and todo[0].builds_cache else ""))
        return
    if args.status:
        todo = still_to_do(jobs)
        lines, failed = status_lines(jobs, todo, recorded_states(jobs, args.out_dir), args.out_dir)
        print("\n".join(lines))
        if failed:
            print(failure_report(with_job_log(failed, args.out_dir), len(todo)))
        return
    if args.launcher != "local":
        submit_study(args, jobs)
        return
    slots = gpu_slots(jobs[-1].config["device"], args.jobs)
    with only_study_running(args.out_dir):
        todo = still_to_do(jobs)
        going = [name for name, state in recorded_states(todo, args.out_dir).items()
                 if launch.alive(state)]
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


if __name__ == "__main__":
    run_script(main)

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
import glob
import itertools
import json
import os
import shlex
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import distill_student
import train_student
from kd import cache, launch
from kd.checkpoint import file_sha256
from kd.errors import UserError, run_script, say
from kd.flags import NO_CACHE, HelpFormatter, Parser, number
from kd.methods import DEFAULT, METHOD_FLAGS, METHODS
from kd.rundir import RERUN_FLAGS, changed_settings, verdict

REPO = Path(__file__).resolve().parent
OUTPUT_FILE = "study_output.log"  # a run's stdout and stderr, in its folder


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
            target = [launch.shown_path(REPO / self.script) if shown else str(REPO / self.script)]
        variables = [f"{name}={value}" for name, value in self.env.items()] if shown else []
        return [*variables, sys.executable, *target, *self.argv]  # the study's interpreter


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
                        f"default: OUT_DIR/teacher_cache.pt; {NO_CACHE}: the teacher runs online")
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
    online = cache_path == NO_CACHE
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
                live = known is not None and known.online
                teacher = [] if online or live else ["--teacher_cache", cache_path]
                argv = ["--out_dir", folder, *run, *distilled, "--method", method, *settings,
                        *teacher]
                jobs.append(Job(f"{name}/seed{seed}", "distill_student.py", argv, folder))
    parsers = {"train_student.py": train_student.build_parser(),
               "distill_student.py": distill_student.build_parser()}
    for script, parser in parsers.items():
        parser.prog = script  # its errors name the script they are about
    teacher_sha256, seen = None, {}
    for job in jobs:
        parsed = parsers[job.script].parse_args(job.argv)  # bad values: one line, exit 2
        if job.script == "distill_student.py":  # and settings it would refuse once started
            distill_student.refuse_settings(parsers[job.script], parsed, job.argv)
        job.config = vars(parsed)
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
    """kd.rundir.verdict of the job's run folder ('run' for the cache build, which has none):
    'run', 'resume', 'restart' or 'done'; a folder holding another run is refused."""
    return "run" if job.builds_cache else verdict(job.out_dir, job.config)


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
            job.argv += RERUN_FLAGS[action]
            todo.append(job)
    if refused:
        more = f" ({len(refused) - 1} more run folders too)" if len(refused) > 1 else ""
        raise UserError(refused[0] + more)
    refuse_runs_named_otherwise(jobs)
    cached = any(job.reads_cache for job in todo)
    return [job for job in todo if cached or not job.builds_cache]


def main() -> None:
    args, rest = build_parser().parse_known_args()
    jobs = plan(args, flag_values(rest))
    env = {} if args.launcher == "slurm" else launch.run_env(jobs[-1].config["device"], args.jobs)
    for job in jobs:  # this machine's launchers and --dry_run alike (a cluster's nodes: their own)
        job.env = env
    if args.dry_run:
        todo = still_to_do(jobs)
        launch.record_command(args.out_dir)  # marks the folder as a study for the report
        for job in todo:
            print(shlex.join(job.command()))
        say(f"{len(todo)} commands, {len(jobs) - len(todo)} finished runs left out" +
            ("; the first builds the teacher cache: run it before the others"
             if todo and todo[0].builds_cache else ""))
        return
    if args.status:
        todo = still_to_do(jobs)
        states = launch.recorded_states(jobs, args.out_dir)
        lines, failed = launch.status_lines(jobs, todo, states, args.out_dir)
        print("\n".join(lines))
        if failed:
            print(launch.failure_report(launch.with_job_log(failed, args.out_dir), len(todo)))
        return
    run_left = launch.launcher(args, jobs)
    with launch.only_study_running(args.out_dir):
        run_left(still_to_do(jobs))


if __name__ == "__main__":
    run_script(main)

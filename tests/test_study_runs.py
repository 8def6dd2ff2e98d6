"""study.py's runs: the local launcher (slots, the cache build first, failures, stop signals),
and a tiny study end to end through the local launcher and through submitit's, which must give
the same runs."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import study
from kd import launch
from helpers import REPO, STUDY_RUN, assert_one_line_error, planned, run_in_process
from kd.record import TIMING_COLUMNS
from helpers import report


def test_gpu_slots_on_the_cpu():
    assert launch.local.gpu_slots("cpu", None) == [None]
    assert launch.local.gpu_slots("cpu", 3) == [None, None, None]


class FakeJob(study.Job):
    """A job that runs a line of Python instead of its script."""

    def __init__(self, tmp_path: Path, name: str, code: str, script: str = "train_student.py"):
        super().__init__(name, script, [], str(tmp_path / name))
        self.code = code

    def command(self, *, shown: bool = True) -> list[str]:
        return [sys.executable, "-c", self.code]


@pytest.mark.slow
def test_scheduler_waits_for_the_cache_and_reports_failures(tmp_path):
    order = tmp_path / "order.txt"
    write = lambda tag: f"open({str(order)!r}, 'a').write({tag!r} + '\\n')"
    # the build ends only once fitnet has run: fitnet (teacher online) must not wait for it
    until_fitnet = (f"import os, time\nfor _ in range(1200):\n"
                    f"    if os.path.exists({str(order)!r}) and 'fitnet' in "
                    f"open({str(order)!r}).read(): break\n    time.sleep(0.05)\n")
    build = FakeJob(tmp_path, "cache", until_fitnet + write("cache"), "kd.cache")
    ce = FakeJob(tmp_path, "ce", write("ce"))
    kd = FakeJob(tmp_path, "kd", write("kd"), "distill_student.py")
    kd.config = {"teacher_cache": str(tmp_path / "cache.pt")}
    fitnet = FakeJob(tmp_path, "fitnet", write("fitnet"), "distill_student.py")
    broken = FakeJob(tmp_path, "broken", "print('first'); raise SystemExit('error: it broke')")
    failed = launch.local.run_all([build, kd, ce, fitnet, broken], [None, None])
    assert order.read_text().split() == ["ce", "fitnet", "cache", "kd"]  # kd waited, the rest not
    assert [(job.name, why.split(" after")[0]) for job, why in failed] == [
        ("broken", "exit code 1")]
    text = launch.failure_report(failed, 5)
    assert "1 of 5 study jobs failed" in text and "| error: it broke" in text and "| first" in text

    failing_build = FakeJob(tmp_path, "cache2", "raise SystemExit(2)", "kd.cache")
    kd2, ce2 = FakeJob(tmp_path, "kd2", write("kd2"), "distill_student.py"), FakeJob(
        tmp_path, "ce2", write("ce2"))
    kd2.config = kd.config
    failed = launch.local.run_all([ce2, failing_build, kd2], [None])
    assert [(job.name, why.split(" after")[0]) for job, why in failed] == [
        ("cache2", "exit code 2"), ("kd2", "not run: the teacher cache build failed")]
    assert "kd2" not in order.read_text()

    failed = launch.local.run_all([broken, FakeJob(tmp_path, "ce3", write("ce3"))], [None])
    assert [(job.name, why.split(" after")[0]) for job, why in failed] == [
        ("broken", "exit code 1"), ("ce3", "not started: an earlier run failed first")]
    assert "ce3" not in order.read_text()  # nothing had worked: the setup is suspect


STOPPING = """
import signal, sys, study
from kd.errors import run_script
from kd.launch.local import run_all

class Stubborn(study.Job):  # a run that ignores SIGTERM
    def command(self, *, shown=True):
        return [sys.executable, "-c", "import os, signal, time; signal.signal(signal.SIGTERM, "
                "signal.SIG_IGN); print(os.getpid(), flush=True); time.sleep(60)"]

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, whatever runs the tests
run_script(lambda: run_all([Stubborn("stubborn", "train_student.py", [], sys.argv[1])], [None]))
"""


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"  # unreaped
    except (OSError, IndexError):
        return True


@pytest.mark.slow
def test_a_closed_terminal_stops_the_study_and_a_second_signal_its_runs(tmp_path):
    output = tmp_path / study.OUTPUT_FILE
    parent = subprocess.Popen([sys.executable, "-c", STOPPING, str(tmp_path)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True)
    run = None
    try:
        for _ in range(600):  # the run prints its process id
            if output.exists() and len(output.read_text().splitlines()) == 2:
                run = int(output.read_text().splitlines()[1])
                break
            assert parent.poll() is None, parent.stderr.read()
            time.sleep(0.05)
        assert run is not None, "the run did not start within 30 s"
        parent.send_signal(signal.SIGHUP)  # asks the run to stop: it ignores that
        with pytest.raises(subprocess.TimeoutExpired):
            parent.wait(timeout=1)
        assert not gone(run)
        parent.send_signal(signal.SIGINT)
        assert parent.wait(timeout=30) == 128 + signal.SIGINT
        assert "SIGHUP: stopping at the next step" in parent.stderr.read()
        for _ in range(100):
            if gone(run):
                break
            time.sleep(0.05)
        assert gone(run)
    finally:
        parent.kill()
        if run is not None and not gone(run):
            os.kill(run, signal.SIGKILL)


def test_progress_names_the_epoch_of_a_run_in_flight(tmp_path, teacher_file):
    job = planned(["--out_dir", str(tmp_path), "--teacher_ckpt", teacher_file, "--seeds", "0",
                   "--teacher_cache", "none", "--epochs", "7"])[1]
    assert launch.local.progress(job) == "kd/seed0 epoch 0/7"
    Path(job.out_dir).mkdir(parents=True)
    (Path(job.out_dir) / "log.csv").write_text("epoch,lr\n1,0.1\n2,0.1\n")
    assert launch.local.progress(job) == "kd/seed0 epoch 2/7"


@pytest.fixture(scope="module")
def tiny_study(fake_data, runs_root, tmp_path_factory) -> SimpleNamespace:
    """Two seeds x (CE + two kd points), one epoch each on generated data, made by the
    local launcher: one command printed by --dry_run run as printed, then `python study.py` for
    the rest; with its report, written before any test changes the study."""
    root = tmp_path_factory.mktemp("tiny_study")
    out = root / "study"
    argv = ["--out_dir", str(out), "--seeds", "0", "1", "--teacher_ckpt",
            str(runs_root / "teacher" / "best.pt"), "--teacher_cache", "none", "--method", "kd",
            "--T", "2", "4", "--val_size", "100", "--jobs", "2", "--data_dir", fake_data,
            *STUDY_RUN]
    with pytest.MonkeyPatch.context() as mp:  # study.py in this process: seconds of imports less
        mp.chdir(REPO)
        dry_run = run_in_process("study.py", [*argv, "--dry_run"], mp)
        assert dry_run.returncode == 0, dry_run.stderr
        commands = dry_run.stdout.splitlines()
        subprocess.run(commands[3], shell=True, check=True, capture_output=True, cwd=REPO)
        mp.chdir(root)
        first = run_in_process("study.py", argv, mp)
    assert first.returncode == 0, first.stdout + first.stderr
    text = report(out, "--out", root / "report", "--no-cost")
    return SimpleNamespace(out=out, argv=argv, commands=commands, first=first, report=text,
                           report_dir=root / "report")


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_study, monkeypatch, capsys):
    """The tiny study: the --dry_run commands, the runs, the report's study section; then the
    same command resumes a stopped run, and a changed flag is refused."""
    out, argv, commands, first = tiny_study.out, tiny_study.argv, tiny_study.commands, \
        tiny_study.first
    assert len(commands) == 6 and "/ce/seed1 " in commands[3]
    assert "5 of 6 runs to do (0 to resume); 2 at a time on the CPU" in first.stdout
    assert first.stdout.count("done  ") == 5 and "test_top1" not in first.stdout
    for name in ["ce", "kd-T2", "kd-T4"]:
        for seed in (0, 1):
            config = json.loads((out / name / f"seed{seed}" / "config.json").read_text())
            assert (config["seed"], config["val_size"], config["epochs"]) == (seed, 100, 1)
            assert (out / name / f"seed{seed}" / "summary.json").exists()
    recorded = json.loads((out / "study.json").read_text())["commands"]
    assert recorded[0].endswith(" --dry_run") and recorded[1].endswith(shlex.join(argv))

    section = tiny_study.report.split("## Study: ")[1]
    assert "gain over CE, 95% CI" in section and "(n=2)" in section
    assert "| T=2 | 2 |" in section or "| T=2 (selected) | 2 |" in section
    assert "The teacher: test top-1 " in section
    for name in ("study_heatmap_kd.png", "study_curves.png"):
        assert (tiny_study.report_dir / name).exists()

    (out / "kd-T4" / "seed1" / "summary.json").unlink()  # as if stopped after its last save
    again = run_in_process("study.py", argv, monkeypatch, capsys)
    assert again.returncode == 0 and "1 of 6 runs to do (1 to resume)" in again.stdout
    output = (out / "kd-T4" / "seed1" / study.OUTPUT_FILE).read_text()
    assert [line for line in output.splitlines() if line.startswith("$ ")][-1].endswith(" --resume")
    assert (out / "kd-T4" / "seed1" / "summary.json").exists()

    changed = run_in_process("study.py", [*argv, "--lr", "0.05"], monkeypatch, capsys)
    assert_one_line_error(changed, f"{out}/ce/seed0 holds a run with other settings "
                                   f"(--lr 0.2 -> 0.05)")


@pytest.mark.slow
def test_the_tiny_study_through_submitit_reports_as_the_local_one(tiny_study, tmp_path,
                                                                   monkeypatch, capsys):
    """--launcher submitit_local --wait runs the tiny study as submitit jobs, and its report is
    the local launcher's, word for word but the training times and the folder's path. The same
    command again submits nothing; a run whose job is alive is left alone, by the local launcher
    too; once its job is gone the run is reported failed (tests/test_launch.py: it is then
    resubmitted). Four of the local study's runs are copied in first (seconds of process
    starts each), so a CE run and a kd run are submitted."""
    out = tmp_path / "study"
    argv = [*tiny_study.argv, "--launcher", "submitit_local"]
    argv[argv.index("--out_dir") + 1] = str(out)
    copied = ["ce/seed0", "kd-T2/seed0", "kd-T2/seed1", "kd-T4/seed0"]
    for name in copied:
        shutil.copytree(tiny_study.out / name, out / name)
    first = run_in_process("study.py", [*argv, "--wait"], monkeypatch, capsys)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "6 jobs: 4 done, 2 to do" in first.stdout, first.stdout
    assert first.stdout.count("\nsubmitted ") == 2 and first.stdout.count("\ndone  ") == 6
    assert "study complete. Report: " in first.stdout
    ours = report(out, "--out", tmp_path / "report", "--no-cost")
    assert "train time (min)" in ours and "## Study: " in ours
    assert without_train_time(ours.replace(str(out), "STUDY")) == \
        without_train_time(tiny_study.report.replace(str(tiny_study.out), "STUDY"))
    submitted = [job for job in planned(argv) if job.name not in copied]
    assert [job.name for job in submitted] == ["ce/seed1", "kd-T4/seed1"]
    for job in submitted:  # the same experiments: every logged value, timing aside
        ran = {}
        for root in (out, tiny_study.out):
            folder = root / Path(job.out_dir).relative_to(out)
            ran[root] = (json.loads((folder / "config.json").read_text())["cpu_threads"],
                         pd.read_csv(folder / "log.csv").drop(columns=list(TIMING_COLUMNS)))
        (threads, ours_log), (local_threads, local_log) = ran.values()
        assert threads == local_threads == int(launch.threads_per_run(2)), job.name  # --jobs 2
        pd.testing.assert_frame_equal(ours_log, local_log, check_exact=True, obj=job.name)
    jobs = json.loads((out / launch.JOBS_FILE).read_text())["runs"]
    assert sorted(jobs) == [job.name for job in submitted]
    assert all(Path(entry["folder"], f"{entry['job_id']}_0_log.out").exists()
               for entry in jobs.values())  # the jobs' own logs, below the study folder
    recorded = json.loads((out / "study.json").read_text())["launchers"]
    assert recorded == [{**launch.settings(study.build_parser().parse_known_args(argv)[0])}]

    status = run_in_process("study.py", [*argv, "--status"], monkeypatch, capsys)
    assert status.returncode == 0 and "6 jobs: 6 done" in status.stdout

    (out / "kd-T4" / "seed1" / "summary.json").unlink()  # stopped after its last save...
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "submitit"])
    try:  # ... and its job still running (a stand-in process)
        jobs["kd-T4/seed1"]["job_id"] = str(alive.pid)
        (out / launch.JOBS_FILE).write_text(json.dumps({"runs": jobs}))
        again = run_in_process("study.py", argv, monkeypatch, capsys)
        assert again.returncode == 0, again.stderr
        assert f"running  kd-T4/seed1  job {alive.pid}" in again.stdout
        assert "0 jobs submitted" in again.stdout
        local = run_in_process("study.py", tiny_study.argv[:1] + [str(out)] +
                               tiny_study.argv[2:], monkeypatch, capsys)
        assert_one_line_error(local, "1 jobs of this study are still queued or running")
    finally:
        alive.kill()
        alive.wait()
    status = run_in_process("study.py", [*argv, "--status"], monkeypatch, capsys)
    assert f"failed   kd-T4/seed1  job {alive.pid} ended: no process" in status.stdout

    # --wait waits for a job alive from an earlier submission too, then names its unfinished run
    brief = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)", "submitit"])
    jobs["kd-T4/seed1"]["job_id"] = str(brief.pid)
    (out / launch.JOBS_FILE).write_text(json.dumps({"runs": jobs}))
    waited = run_in_process("study.py", [*argv, "--wait"], monkeypatch, capsys)
    brief.wait()
    assert waited.returncode == 1 and "Traceback" not in waited.stderr, waited.stderr
    assert "running  kd-T4/seed1" in waited.stdout
    assert f"kd-T4/seed1: job {brief.pid} ended, the run did not finish" in waited.stderr


def without_train_time(text: str) -> str:
    """A report without its train time column: wall-clock time differs between any two runs."""
    lines, drop = [], None
    for line in text.splitlines():
        cells = line.split(" | ")
        if "train time (min)" in cells:
            drop = cells.index("train time (min)")
        elif not line.startswith("|"):
            drop = None
        lines.append(" | ".join(c for i, c in enumerate(cells) if i != drop))
    return "\n".join(lines)


@pytest.mark.slow
def test_a_feature_method_through_submitit_on_two_processes(tiny_study, tmp_path, monkeypatch,
                                                             capsys):
    """--launcher submitit_local --gpus_per_run 2 --method fitnet: the fitnet run is one job of
    two tasks (ranks 0 and 1 as torchrun's would be, kd.job.ddp_env) whose connector and
    student stay in sync (kd.train.fit checks after each epoch, or fails the run). The CE run is
    the local study's, copied in (seconds of process starts)."""
    out = tmp_path / "study"
    argv = [*tiny_study.argv, "--launcher", "submitit_local", "--gpus_per_run", "2", "--wait"]
    argv[argv.index("--out_dir") + 1] = str(out)
    argv[argv.index("--seeds") + 1:argv.index("--teacher_ckpt")] = ["0"]
    argv[argv.index("--method") + 1:argv.index("--val_size")] = ["fitnet"]
    shutil.copytree(tiny_study.out / "ce" / "seed0", out / "ce" / "seed0")
    ran = run_in_process("study.py", argv, monkeypatch, capsys)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "2 jobs: 1 done, 1 to do" in ran.stdout and "submitted fitnet/seed0" in ran.stdout
    assert "study complete. Report: " in ran.stdout
    run = out / "fitnet" / "seed0"
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["world_size"], config["per_rank_batch_size"]) == \
        ("fitnet", 2, 50)
    assert len(pd.read_csv(run / "log.csv")) == 1 and (run / "summary.json").exists()
    saved = torch.load(run / "last.pt", weights_only=True)
    assert saved["connector"] and not any(k.startswith("module.") for k in saved["model"])

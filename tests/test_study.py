"""study.py and its report: the runs a grid plans, skipping, resuming, refusals, the scheduler,
selection on validation data and the paired confidence interval; and a tiny study end to end."""
import json
import math
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

import distill_student
import kd.features
import kd.methods.ofd
import study
from kd import launch
from helpers import REPO, assert_one_line_error, run_in_process
from kd.errors import UserError
from kd.methods import METHOD_FLAGS, METHODS
from kd.train import TIMING_COLUMNS
from plots.rundata import load_runs
from plots.study import gain, paired_interval, read_study, study_section, t_quantile
from helpers import STUDENT, fake_logits, report, write_run

COMMON = ["--epochs", "1", "--batch_size", "100", "--eval_batch_size", "100", "--no-download"]


@pytest.fixture
def teacher_file(tmp_path) -> str:
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"stand-in teacher: plan() only hashes it")
    return str(path)


def planned(argv: list[str]) -> list[study.Job]:
    args, rest = study.build_parser().parse_known_args(argv)
    return study.plan(args, study.flag_values(rest))


def test_flag_values_groups_the_tokens():
    assert study.flag_values(["--T", "1", "2", "--logit_std", "--lr=0.1", "--alpha", "-1"]) == [
        ("--T", ["1", "2"]), ("--logit_std", []), ("--lr", ["0.1"]), ("--alpha", ["-1"])]
    with pytest.raises(UserError, match="--T is given twice"):
        study.flag_values(["--T", "1", "--T", "2"])
    with pytest.raises(UserError, match="unrecognized argument 3"):
        study.flag_values(["3", "--T", "1"])


def test_plan_runs_the_baseline_and_every_grid_point_per_seed(tmp_path, teacher_file):
    out = str(tmp_path / "study")
    jobs = planned(["--out_dir", out, "--seeds", "0", "1", "--teacher_ckpt", teacher_file,
                    "--method", "kd", "dkd", "--T", "2", "4", "--alpha", "0", "0.9",
                    "--dkd_beta", "8", "--epochs", "3", "--lr", "0.1"])
    assert jobs[0].builds_cache and jobs[0].argv[:4] == ["--teacher_ckpt", teacher_file, "--out",
                                                         f"{out}/teacher_cache.pt"]
    grid = ["kd-T2-alpha0", "kd-T2-alpha0.9", "kd-T4-alpha0", "kd-T4-alpha0.9",
            "dkd-T2-dkd_beta8", "dkd-T4-dkd_beta8"]
    assert [job.name for job in jobs[1:]] == [
        f"{name}/seed{seed}" for seed in (0, 1) for name in ["ce", *grid]]
    by_name = {job.name: job for job in jobs}
    ce = by_name["ce/seed1"].config
    assert (ce["seed"], ce["val_size"], ce["epochs"], ce["lr"]) == (1, 5000, 3, 0.1)
    assert "teacher_ckpt" not in ce and not by_name["ce/seed1"].distills
    kd = by_name["kd-T4-alpha0.9/seed0"]
    assert kd.distills and kd.out_dir == f"{out}/kd-T4-alpha0.9/seed0"
    assert (kd.config["method"], kd.config["T"], kd.config["alpha"], kd.config["dkd_beta"]) == \
        ("kd", 4.0, 0.9, 8.0)  # dkd_beta is dkd's: kd runs keep the default
    assert kd.config["teacher_cache"] == f"{out}/teacher_cache.pt"
    assert kd.config["val_size"] == 5000 and kd.config["lr"] == 0.1
    dkd = by_name["dkd-T2-dkd_beta8/seed1"].config
    assert (dkd["method"], dkd["T"], dkd["alpha"]) == ("dkd", 2.0, 0.5)  # alpha is kd's
    settings = [{k: v for k, v in job.config.items() if k != "out_dir"} for job in jobs[1:]]
    assert len({json.dumps(c, sort_keys=True) for c in settings}) == len(jobs) - 1  # all differ


def test_plan_without_cache_build(tmp_path, teacher_file):
    argv = ["--out_dir", str(tmp_path), "--teacher_ckpt", teacher_file]
    online = planned([*argv, "--teacher_cache", "none", "--seeds", "0"])
    assert [job.name for job in online] == ["ce/seed0", "kd/seed0"]  # no grid: one point
    assert "--teacher_cache" not in online[1].argv
    assert online[1].config["teacher_logits"] == "online"
    repeated = planned([*argv, "--teacher_cache", "none", "--seeds", "0", "0", "--T", "2", "2"])
    assert [job.name for job in repeated] == ["ce/seed0", "kd-T2/seed0"]  # once each
    existing = tmp_path / "cache.pt"
    existing.write_bytes(b"")
    cached = planned([*argv, "--teacher_cache", str(existing), "--seeds", "0"])
    assert not any(job.builds_cache for job in cached)  # the runs check the file themselves
    assert cached[1].config["teacher_cache"] == str(existing)


class FixedTaps:
    """Stand-in taps: fixed random features of the shapes a model's taps have."""

    def __init__(self, shapes: list[tuple], seed: int):
        g = torch.Generator().manual_seed(seed)
        self.shapes = [torch.Size(s) for s in shapes]
        self.values = [torch.randn(16, *s, generator=g) for s in shapes]

    def read(self, which: list[int] | None = None) -> list[torch.Tensor]:
        return [self.values[i] for i in (which or range(len(self.values)))]


def test_each_method_reads_exactly_its_flags(fake_data, monkeypatch):
    """METHOD_FLAGS (which the study grids over) against what each method computes, its loss on
    fixed logits and, for a feature method, on its connector's output from fixed taps: every flag
    a method is said to read changes it, and no other distillation flag does."""
    parser = distill_student.build_parser()
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 100, generator=g), torch.randn(16, 100, generator=g) * 3
    labels, keys = torch.arange(16), torch.arange(16) * 162
    student_shapes = [(4, 16, 16), (6, 8, 8), (8, 4, 4), (10, 2, 2), (10, 1, 1)]  # small: fast
    teacher_shapes = [(8, 8, 8), (12, 4, 4), (16, 2, 2), (20, 2, 2), (20, 1, 1)]  # FT: 2 x 2
    monkeypatch.setattr(kd.features, "student_taps", lambda model: FixedTaps(student_shapes, 1))
    monkeypatch.setattr(kd.features, "teacher_taps",
                        lambda model, student: FixedTaps(teacher_shapes, 2))
    for four_stages in ("preact_taps", "stage_taps"):
        monkeypatch.setattr(kd.features, four_stages, lambda student, teacher: (
            FixedTaps(student_shapes[:4], 3), FixedTaps(teacher_shapes[:4], 4)))
    margins = [-torch.rand(c, generator=g) for c, *_ in teacher_shapes[:4]]
    monkeypatch.setattr(kd.methods.ofd, "stage_margins", lambda teacher, taps: margins)
    changed = {"T": "2", "alpha": "0.2", "logit_std": None, "ce_weight": "0.3", "dkd_alpha": "2",
               "dkd_beta": "3", "dkd_warmup": "5", "dist_beta": "1", "dist_gamma": "1",
               "hint_weight": "3", "hint_stage": "3", "crd_weight": "2", "feat_dim": "16",
               "nce_k": "50", "nce_t": "0.5", "nce_m": "0.9", "review_weight": "2",
               "review_warmup": "5", "at_weight": "3", "at_p": "1", "pkt_weight": "3",
               "rkd_weight": "3", "rkd_distance": "3", "rkd_angle": "3", "sp_weight": "3",
               "nst_weight": "3", "cc_weight": "3", "vid_weight": "3", "vid_init_var": "2",
               "ofd_weight": "3", "kdsvd_weight": "3", "kdsvd_k": "2", "init_epochs": "3",
               "init_lr": "0.02", "ab_margin": "2", "ft_weight": "3"}
    assert set(changed) == {flag for flags in METHOD_FLAGS.values() for flag in flags}
    base = ["--data_dir", fake_data, "--no-download", "--nce_k", "100"]  # 300 images: 297 others
    training_labels = distill_student.training_labels(parser.parse_args(base))  # no flag moves it

    def loss(method: str, name: str | None) -> tuple:
        """The method's loss and, with an init stage, its init loss and length."""
        flag = [] if name is None else [f"--{name}"] + ([changed[name]] if changed[name] else [])
        args = parser.parse_args([*base, "--method", method, *flag])
        inputs = [student, teacher, labels]
        entry = METHODS[method]
        if entry.connector:
            torch.manual_seed(0)  # the same initial weights and negatives whatever the flags
            connect = entry.connector(args, None, None, training_labels)
            connect(keys, labels)  # a second step reads what the first left (CRD's memory)
            inputs.append(connect(keys, labels))
        value = (distill_student.loss_at(args, 2)(*inputs)[0].item(),)
        if entry.init:
            init_inputs = [*inputs[:3], entry.init.connect(connect, keys, labels)]
            value += (entry.init.loss(args)(*init_inputs)[0].item(), args.init_epochs,
                      args.init_lr)
        return value

    for method, reads in METHOD_FLAGS.items():
        default = loss(method, None)
        for name in changed:
            assert (loss(method, name) != default) == (name in reads), (method, name)


def test_existing_runs_are_skipped_resumed_restarted_or_refused(tmp_path, teacher_file):
    jobs = planned(["--out_dir", str(tmp_path), "--seeds", "0", "1", "--teacher_ckpt",
                    teacher_file, "--teacher_cache", "none", *COMMON])
    job = jobs[1]
    assert study.to_do(job) == "run"
    folder = Path(job.out_dir)
    folder.mkdir(parents=True)
    write_config = lambda **change: (folder / "config.json").write_text(
        json.dumps({**job.config, "device_name": "cpu", "overwrite": True, **change}))
    write_config(lr=0.5)
    assert study.to_do(job) == "restart"  # no epoch saved: other settings do not matter
    (folder / "last.pt").write_bytes(b"")
    write_config()
    assert study.to_do(job) == "resume"
    (folder / "summary.json").write_text("{}")
    assert study.to_do(job) == "done"
    write_config(lr=0.3, T=2.0)
    with pytest.raises(UserError, match=r"holds a run with other settings \(--T 2.0 -> 4.0, "
                                        r"--lr 0.3 -> 0.2\)"):
        study.to_do(job)
    write_config(teacher_sha256="other")
    with pytest.raises(UserError, match="--teacher_sha256 other -> "):
        study.to_do(job)
    (folder / "config.json").write_text("[]")
    with pytest.raises(UserError, match="no readable config.json"):
        study.to_do(job)
    other = Path(jobs[3].out_dir)  # the kd run of seed 1
    other.mkdir(parents=True)
    (other / "log.csv").write_text("epoch\n")
    (other / "config.json").write_text(json.dumps({**jobs[3].config, "lr": 0.3}))
    with pytest.raises(UserError, match=r"kd/seed0 holds .* no readable config.json .* "
                                        r"\(1 more run folders too\)"):
        study.still_to_do(jobs)


def test_one_study_at_a_time_in_a_folder(tmp_path):
    lock = tmp_path / study.LOCK_FILE
    with study.only_study_running(str(tmp_path)):
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(UserError, match=rf"another study.py \(process {os.getpid()}\)"):
            with study.only_study_running(str(tmp_path)):
                pass
        assert lock.read_text() == str(os.getpid())  # the refused one changed nothing
    assert lock.read_text() == ""
    lock.write_text("999999999\xff")  # a study killed by SIGKILL: the system released its lock
    with study.only_study_running(str(tmp_path)):
        assert lock.read_text() == str(os.getpid())
    (tmp_path / "file").write_text("")
    for out_dir in [tmp_path / "file", tmp_path / "file" / "sub"]:
        with pytest.raises(UserError, match=rf"cannot write to --out_dir {out_dir}: "):
            with study.only_study_running(str(out_dir)):
                pass


def test_a_run_under_another_name_is_refused(tmp_path, teacher_file):
    argv = ["--out_dir", str(tmp_path), "--seeds", "0", "--teacher_ckpt", teacher_file,
            "--teacher_cache", "none", "--T", "2"]
    before = planned([*argv, "--alpha", "0.5"])[1]  # the default, given: kd-T2-alpha0.5
    Path(before.out_dir).mkdir(parents=True)
    (Path(before.out_dir) / "config.json").write_text(json.dumps(before.config))
    with pytest.raises(UserError, match=r"kd-T2-alpha0.5/seed0 already holds the run planned as "
                                        r"kd-T2/seed0"):
        study.still_to_do(planned(argv))


def test_runs_of_other_seeds_are_left_alone(tmp_path, teacher_file):
    argv = ["--out_dir", str(tmp_path), "--teacher_ckpt", teacher_file, *COMMON]
    earlier = planned([*argv, "--seeds", "5"])[1]  # ce/seed5 of an earlier study
    Path(earlier.out_dir).mkdir(parents=True)
    (Path(earlier.out_dir) / "config.json").write_text(json.dumps(earlier.config))
    jobs = planned([*argv, "--seeds", "0"])
    assert jobs[0].builds_cache  # its settings match no run folder: never a rename
    assert study.still_to_do(jobs) == jobs


def test_the_same_run_twice_is_refused(tmp_path, teacher_file):
    with pytest.raises(UserError, match="kd-T4/seed0 and kd-T4.0/seed0 would be the same run"):
        planned(["--out_dir", str(tmp_path), "--seeds", "0", "--teacher_ckpt", teacher_file,
                 "--T", "4", "4.0"])


@pytest.mark.parametrize("argv, phrase", [
    (["--lr", "0.1", "0.2"], "--lr 0.1 0.2: only the settings of a --method"),
    (["--seed", "1"], "--seed is the study's to set"),
    (["--resume"], "--resume is the study's to set"),
    (["--learning_rate", "1"], "--learning_rate is a flag of neither"),
    (["--dkd_beta", "1", "2"], "--dkd_beta is read by no --method of the study (kd)"),
    (["--method"], "--method needs one method or more"),
    (["--alpha", "2"], "argument --alpha: must be in [0, 1]"),
    (["--method", "kd", "fitnets"], "argument --method: invalid choice: 'fitnets'"),
    (["--val_size", "0"], "argument --val_size: must be >= 100"),
    (["--teacher_ckpt", "missing.pt"], "--teacher_ckpt missing.pt: no such file"),
])
def test_bad_study_flags_are_one_line(argv, phrase, tmp_path, teacher_file, monkeypatch, capsys):
    teacher = [] if "--teacher_ckpt" in argv else ["--teacher_ckpt", teacher_file]
    result = run_in_process("study.py", ["--out_dir", tmp_path, *teacher, *argv], monkeypatch,
                            capsys)
    assert_one_line_error(result, phrase)
    assert not (tmp_path / "study.json").exists()


def test_dry_run_prints_the_commands_to_run(tmp_path, teacher_file, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # scripts are shown relative to the current folder
    captured = run_in_process("study.py", ["--out_dir", tmp_path, "--teacher_ckpt", teacher_file,
                                           "--seeds", "3", "--T", "1", "2", "--dry_run", *COMMON],
                              monkeypatch, capsys)
    lines = captured.stdout.splitlines()
    python = sys.executable  # the interpreter running the study, not whichever `python` is first
    assert lines[0] == (f"{python} -m kd.cache --teacher_ckpt {teacher_file} --out "
                        f"{tmp_path}/teacher_cache.pt --no-download")
    assert lines[1] == (f"{python} train_student.py --out_dir {tmp_path}/ce/seed3 --seed 3 "
                        f"--val_size 5000 {' '.join(COMMON)}")
    assert lines[3] == (f"{python} distill_student.py --out_dir {tmp_path}/kd-T2/seed3 --seed 3 "
                        f"--val_size 5000 {' '.join(COMMON)} --teacher_ckpt {teacher_file} "
                        f"--method kd --T 2 --teacher_cache {tmp_path}/teacher_cache.pt")
    assert len(lines) == 4 and "4 commands, 0 finished runs left out; the first builds" in \
        captured.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.json", "teacher.pt"]


def test_gpu_slots_on_the_cpu():
    assert study.gpu_slots("cpu", None) == [None]
    assert study.gpu_slots("cpu", 3) == [None, None, None]


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
    failed = study.run_all([build, kd, ce, fitnet, broken], [None, None])
    assert order.read_text().split() == ["ce", "fitnet", "cache", "kd"]  # kd waited, the rest not
    assert [(job.name, why.split(" after")[0]) for job, why in failed] == [
        ("broken", "exit code 1")]
    text = study.failure_report(failed, 5)
    assert "1 of 5 study jobs failed" in text and "| error: it broke" in text and "| first" in text

    failing_build = FakeJob(tmp_path, "cache2", "raise SystemExit(2)", "kd.cache")
    kd2, ce2 = FakeJob(tmp_path, "kd2", write("kd2"), "distill_student.py"), FakeJob(
        tmp_path, "ce2", write("ce2"))
    kd2.config = kd.config
    failed = study.run_all([ce2, failing_build, kd2], [None])
    assert [(job.name, why.split(" after")[0]) for job, why in failed] == [
        ("cache2", "exit code 2"), ("kd2", "not run: the teacher cache build failed")]
    assert "kd2" not in order.read_text()

    failed = study.run_all([broken, FakeJob(tmp_path, "ce3", write("ce3"))], [None])
    assert [(job.name, why.split(" after")[0]) for job, why in failed] == [
        ("broken", "exit code 1"), ("ce3", "not started: an earlier run failed first")]
    assert "ce3" not in order.read_text()  # nothing had worked: the setup is suspect


STOPPING = """
import signal, sys, study
from kd.errors import run_script

class Stubborn(study.Job):  # a run that ignores SIGTERM
    def command(self, *, shown=True):
        return [sys.executable, "-c", "import os, signal, time; signal.signal(signal.SIGTERM, "
                "signal.SIG_IGN); print(os.getpid(), flush=True); time.sleep(60)"]

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, whatever runs the tests
run_script(lambda: study.run_all([Stubborn("stubborn", "train_student.py", [], sys.argv[1])],
                                 [None]))
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


def test_t_quantiles_and_the_paired_interval_by_hand():
    for df, table in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)]:
        assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)
    # d = 3, 2.5, 3: mean 17/6, sd = sqrt(1/12), half width = t(0.975, 2) * sd / sqrt(3)
    mean, low, high = paired_interval([3.0, 2.5, 3.0])
    half = 4.302653 * math.sqrt(1 / 12) / math.sqrt(3)
    assert (mean, low, high) == pytest.approx((17 / 6, 17 / 6 - half, 17 / 6 + half), abs=1e-5)
    assert math.isnan(paired_interval([1.0])[1])


def write_study(root: Path) -> Path:
    """A study folder by hand: CE and two kd points over seeds 0-2. T=4 has the best validation
    top-1 and T=2 the best test top-1, so selecting on test would pick the other point."""
    (root / "study.json").parent.mkdir(parents=True)
    (root / "study.json").write_text(json.dumps({"commands": ["python study.py"]}))
    kd = {**STUDENT, "method": "kd", "alpha": 0.5, "teacher_ckpt": "t.pt", "teacher_sha256": "ab"}
    for seed, ce_test, t4_test in [(0, 60.0, 63.0), (1, 61.0, 63.5), (2, 62.0, 65.0)]:
        write_run(root / "ce" / f"seed{seed}", {**STUDENT, "seed": seed}, [50.0, ce_test],
                  val_top1=[50.0, 55.0], logits_seed=None)
        write_run(root / "kd-T4" / f"seed{seed}", {**kd, "T": 4.0, "seed": seed},
                  [50.0, t4_test], val_top1=[50.0, 70.0 + seed], logits_seed=None)
        write_run(root / "kd-T2" / f"seed{seed}", {**kd, "T": 2.0, "seed": seed},
                  [50.0, 80.0], val_top1=[50.0, 60.0], logits_seed=None)
    return root


def test_study_report_selects_on_validation_and_pairs_by_seed(tmp_path):
    root = write_study(tmp_path / "runs" / "study")
    write_run(root / "kd-T8" / "seed0", {**STUDENT, "method": "kd", "T": 8.0, "teacher_ckpt": "t",
                                         "teacher_sha256": "ab", "alpha": 0.5}, [1.0],
              val_top1=[99.0], logits_seed=None)
    (root / "kd-T8" / "seed0" / "summary.json").unlink()  # unfinished: never selected
    text = report(tmp_path / "runs", "--out", tmp_path / "out", "--no-cost")
    section = text.split("## Study: ")[1]
    assert "- not finished yet, left out: kd-T8/seed0\n" in section
    table = [[c.strip() for c in line.strip("|").split("|")]
             for line in section.split("| method |")[1].split("\n\n")[0].splitlines()[2:]]
    half = 4.302653 * math.sqrt(1 / 12) / math.sqrt(3)
    assert table[0][:5] == ["ce", "–", "3", "55.00 ± 0.00", "61.00 ± 1.00"]
    assert table[1][:5] == ["kd", "T=4 (of 2)", "3", "71.00 ± 1.00", "63.83 ± 1.04"]
    assert table[1][5] == f"+{17 / 6:.2f} [+{17 / 6 - half:.2f}, +{17 / 6 + half:.2f}] (n=3)"
    assert table[1][6] == "helps: the interval is above 0"
    assert table[1][7:] == ["3.62 ± 0.10", "83.83 ± 1.04"]  # ECE 10 - top1/10, agree top1 + 20
    assert "| T=4 (selected) | 3 | 71.00 ± 1.00 |" in section
    assert "| T=2 | 3 | 60.00 ± 0.00 |" in section
    for name in ("study_heatmap_kd.png", "study_curves.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000 and f"]({name})" in section


def test_study_needs_one_baseline(tmp_path):
    root = write_study(tmp_path / "study")
    write_run(root / "ce-other" / "seed0", {**STUDENT, "lr": 0.5}, [1.0, 2.0], val_top1=[1.0, 2.0],
              logits_seed=None)
    runs_study = read_study("study", load_runs([root])[0])
    assert runs_study.baseline is None and "2 finished CE baselines (one is needed)" in \
        runs_study.notes[0]
    assert runs_study.selected["kd"].setting == {"T": 4.0}


def test_ties_and_runs_of_one_seed_twice_are_named(tmp_path):
    root = write_study(tmp_path / "study")
    kd = json.loads((root / "kd-T4" / "seed0" / "config.json").read_text())
    write_run(root / "kd-T4-copy" / "seed0", kd, [50.0, 63.0], val_top1=[50.0, 70.0],
              logits_seed=None)  # the same run as kd-T4/seed0, in another folder
    for seed in range(3):
        write_run(root / "kd-T3" / f"seed{seed}", {**kd, "T": 3.0, "seed": seed}, [50.0, 99.0],
                  val_top1=[50.0, 70.0 + seed], logits_seed=None)  # ties with T=4
    result = read_study("study", load_runs([root])[0])
    assert "kd T=4: more than one run of a seed; left out: kd-T4/seed0" in result.notes
    assert "kd: T=3 and T=4 tie on validation top-1; the first in grid order, T=3, is shown as " \
           "selected" in result.notes
    assert result.selected["kd"].label == "T=3" and len(result.methods["kd"][2].runs) == 3


def test_a_gain_over_fewer_seeds_than_the_columns_is_named(tmp_path):
    root = write_study(tmp_path / "study")
    for name in ("kd-T2", "kd-T4"):
        (root / name / "seed2" / "summary.json").unlink()  # seed 2 of the grid not finished
    result = read_study("study", load_runs([root])[0])
    assert "kd: its selected point has seeds [0, 1], the baseline [0, 1, 2]: the gain pairs the " \
           "2 they share, the other columns average each point's own" in result.notes
    half = 12.7062 * 0.25  # d = 3, 2.5: sd = sqrt(0.125), se = sd / sqrt(2) = 0.25
    assert gain(result.selected["kd"], result.baseline) == \
        pytest.approx((2.75, 2.75 - half, 2.75 + half, 2), abs=1e-3)


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
            *COMMON]
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


def test_feature_methods_run_the_teacher_online(tmp_path, teacher_file):
    jobs = planned(["--out_dir", str(tmp_path), "--teacher_ckpt", teacher_file, "--seeds", "0",
                    "--method", "kd", "fitnet", "--hint_weight", "10", "100"])
    by_name = {job.name: job for job in jobs}
    assert jobs[0].builds_cache  # for kd
    fitnet = by_name["fitnet-hint_weight10/seed0"]
    assert "--teacher_cache" not in fitnet.argv and fitnet.config["teacher_logits"] == "online"
    assert by_name["kd/seed0"].config["teacher_logits"] == "cache"
    only_features = planned(["--out_dir", str(tmp_path / "f"), "--teacher_ckpt", teacher_file,
                             "--seeds", "0", "--method", "crd"])
    assert [job.name for job in only_features] == ["ce/seed0", "crd/seed0"]  # no cache build


def test_help_names_where_the_run_flags_go(capsys):
    with pytest.raises(SystemExit):
        study.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "every run, one value: --amp" in text and "--epochs" in text
    assert "every distilled run: --method --teacher_ckpt" in text
    assert "  fitnet: --ce_weight --hint_weight --hint_stage" in text
    assert "(default: None)" not in text


def test_progress_names_the_epoch_of_a_run_in_flight(tmp_path, teacher_file):
    job = planned(["--out_dir", str(tmp_path), "--teacher_ckpt", teacher_file, "--seeds", "0",
                   "--teacher_cache", "none", "--epochs", "7"])[1]
    assert study.progress(job) == "kd/seed0 epoch 0/7"
    Path(job.out_dir).mkdir(parents=True)
    (Path(job.out_dir) / "log.csv").write_text("epoch,lr\n1,0.1\n2,0.1\n")
    assert study.progress(job) == "kd/seed0 epoch 2/7"


def test_the_study_names_its_teacher_accuracy(tmp_path):
    root = write_study(tmp_path / "study")
    kd = json.loads((root / "kd-T4" / "seed0" / "config.json").read_text())
    write_run(root / "kd-T6" / "seed0", {**kd, "T": 6.0}, [50.0, 63.0], val_top1=[50.0, 1.0],
              logits_seed=3)
    test = fake_logits(3, structured=False, kd=True)["test"]
    expected = 100 * (test["teacher_logits"].argmax(1) == test["labels"]).float().mean().item()
    result = read_study("study", load_runs([root])[0])
    assert result.teachers == {"ab": pytest.approx(expected)}
    section = study_section(result, tmp_path, "s_")
    assert f"The teacher: test top-1 {expected:.2f} % (from the distilled runs'" in section

"""study.py's plan: the runs a grid plans, the flags each method reads, skipping, resuming and
refusing run folders, bad flags, --dry_run. The runs themselves: test_study_runs.py; the study's
report: test_study_report.py."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import distill_student
import kd.features
import kd.methods.mlkd
import kd.methods.ofd
import kd.methods.sdd
import study
from kd import launch
from helpers import REPO, STUDY_RUN, assert_one_line_error, planned, run_in_process
from kd.errors import UserError
from kd.methods import METHOD_FLAGS, METHODS


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
    direct = distill_student.build_parser().parse_args(["--teacher_cache", "none"])
    assert direct.teacher_cache is None  # distill_student.py reads 'none' as study.py does
    assert online[1].config["teacher_cache"] is None
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


class FixedOutput(torch.nn.Module):
    """A stand-in connector that gives the same output at every call."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, keys, labels):
        return self.output


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
    # the connectors that run the models' own heads, or the models on other views: stand-ins
    monkeypatch.setattr(kd.methods.sdd, "heads", lambda student, teacher: (
        torch.nn.Linear(10, 100), torch.nn.Linear(20, 100)))
    strong = torch.randn(16, 100, generator=g), torch.randn(16, 100, generator=g) * 3
    monkeypatch.setattr(kd.methods.mlkd, "StrongViews",
                        lambda student, teacher, train: FixedOutput(strong))
    changed = {"T": "2", "alpha": "0.2", "logit_std": None, "ce_weight": "0.3", "dkd_alpha": "2",
               "dkd_beta": "3", "dkd_warmup": "5", "dist_beta": "1", "dist_gamma": "1",
               "hint_weight": "3", "hint_stage": "3", "crd_weight": "2", "feat_dim": "16",
               "nce_k": "50", "nce_t": "0.5", "nce_m": "0.9", "review_weight": "2",
               "review_warmup": "5", "at_weight": "3", "at_p": "1", "pkt_weight": "3",
               "rkd_weight": "3", "rkd_distance": "3", "rkd_angle": "3", "sp_weight": "3",
               "nst_weight": "3", "cc_weight": "3", "vid_weight": "3", "vid_init_var": "2",
               "ofd_weight": "3", "kdsvd_weight": "3", "kdsvd_k": "2", "init_epochs": "3",
               "init_lr": "0.02", "ab_margin": "2", "ft_weight": "3", "wttm_gamma": "0.5",
               "wttm_beta": "2", "itrd_corr": "3", "itrd_mutual": "3", "itrd_alpha": "1.01",
               "sdd_scales": "1,2", "sdd_loss": "kd", "sdd_weight": "2",
               "sdd_inconsistent_weight": "3", "mlkd_ce_weight": "0.3", "mlkd_weight": "2",
               "ctkd_loss": "dkd", "ctkd_ce_weight": "0.3", "ctkd_weight": "2", "ctkd_t_min": "2",
               "ctkd_t_max": "10", "ctkd_lambda_min": "0.5", "ctkd_lambda_max": "2",
               "ctkd_lambda_epochs": "5"}
    assert set(changed) == {flag for flags in METHOD_FLAGS.values() for flag in flags}
    base = ["--data_dir", fake_data, "--no-download", "--nce_k", "100"]  # 300 images: 297 others
    train = distill_student.training_file(parser.parse_args(base))  # no flag moves it

    def loss(method: str, name: str | None) -> tuple:
        """The method's loss and, with an init stage, its init loss and length."""
        flag = [] if name is None else [f"--{name}"] + ([changed[name]] if changed[name] else [])
        args = parser.parse_args([*base, "--method", method, *flag])
        inputs = [student, teacher, labels]
        entry = METHODS[method]
        if entry.connector:
            torch.manual_seed(0)  # the same initial weights and negatives whatever the flags
            connect = entry.connector(args, None, None, train)
            connect(keys, labels)  # a second step reads what the first left (CRD's memory)
            inputs.append(connect(keys, labels))
        total = distill_student.loss_at(args, 2)(*inputs)[0]
        value = (total.item(),)
        params = list(connect.parameters()) if entry.connector else []
        if params and total.requires_grad:  # CTKD's curriculum acts on its gradient alone
            value += tuple(g.sum().item() for g in torch.autograd.grad(
                total, params, allow_unused=True, materialize_grads=True))
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
                    teacher_file, "--teacher_cache", "none", *STUDY_RUN])
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
    lock = tmp_path / launch.LOCK_FILE
    with launch.only_study_running(str(tmp_path)):
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(UserError, match=rf"another study.py \(process {os.getpid()}\)"):
            with launch.only_study_running(str(tmp_path)):
                pass
        assert lock.read_text() == str(os.getpid())  # the refused one changed nothing
    assert lock.read_text() == ""
    lock.write_text("999999999\xff")  # a study killed by SIGKILL: the system released its lock
    with launch.only_study_running(str(tmp_path)):
        assert lock.read_text() == str(os.getpid())
    (tmp_path / "file").write_text("")
    for out_dir in [tmp_path / "file", tmp_path / "file" / "sub"]:
        with pytest.raises(UserError, match=rf"cannot write to --out_dir {out_dir}: "):
            with launch.only_study_running(str(out_dir)):
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
    argv = ["--out_dir", str(tmp_path), "--teacher_ckpt", teacher_file, *STUDY_RUN]
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
    (["--dot_delta", "0.05"], "--dot_delta is read by --optimizer dot, not by sgd"),  # as the
    (["--optimizer", "dot", "--dot_delta", "0.2"], "give DOT momenta 0.7 and 1.1"),  # runs would
])
def test_bad_study_flags_are_one_line(argv, phrase, tmp_path, teacher_file, monkeypatch, capsys):
    teacher = [] if "--teacher_ckpt" in argv else ["--teacher_ckpt", teacher_file]
    result = run_in_process("study.py", ["--out_dir", tmp_path, *teacher, *argv], monkeypatch,
                            capsys)
    assert_one_line_error(result, phrase)
    assert not (tmp_path / "study.json").exists()


def test_dry_run_prints_the_commands_to_run(tmp_path, teacher_file, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # scripts are shown relative to the current folder
    captured = run_in_process("study.py", [
        "--out_dir", tmp_path, "--teacher_ckpt", teacher_file, "--seeds", "3", "--T", "1", "2",
        "--dry_run", *STUDY_RUN], monkeypatch, capsys)
    lines = captured.stdout.splitlines()
    python = sys.executable  # the interpreter running the study, not whichever `python` is first
    assert lines[0] == (f"{python} -m kd.cache --teacher_ckpt {teacher_file} --out "
                        f"{tmp_path}/teacher_cache.pt --no-download")
    assert lines[1] == (f"{python} train_student.py --out_dir {tmp_path}/ce/seed3 --seed 3 "
                        f"--val_size 5000 {' '.join(STUDY_RUN)}")
    assert lines[3] == (f"{python} distill_student.py --out_dir {tmp_path}/kd-T2/seed3 --seed 3 "
                        f"--val_size 5000 {' '.join(STUDY_RUN)} --teacher_ckpt {teacher_file} "
                        f"--method kd --T 2 --teacher_cache {tmp_path}/teacher_cache.pt")
    assert len(lines) == 4 and "4 commands, 0 finished runs left out; the first builds" in \
        captured.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.json", "teacher.pt"]


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
    assert "every distilled run: --dot_delta --method --optimizer --teacher_ckpt" in text
    assert "  fitnet: --ce_weight --hint_weight --hint_stage" in text
    assert "(default: None)" not in text

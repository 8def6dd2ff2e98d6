"""kd/rundir.py is the one place that says what a run folder holds: resume, study.py and the
report's grouping ask it, so they agree on the same folders."""
import argparse
import itertools
import json

import pytest
import torch

import distill_student
import kd.job
import study
from helpers import assert_one_line_error, write_run
from kd.distributed import World
from kd.errors import UserError
from kd.methods import METHOD_FLAGS
from kd.models import STUDENT_ARCH
from kd.rundir import (RERUN_FLAGS, experiment_key, is_distilled, later_defaults, resumed_config,
                       run_config, verdict)
from plots.groups import group_runs
from plots.rundata import load_runs

RUN = ["--epochs", "2", "--batch_size", "100", "--no-download", "--device", "cpu"]


def saved_config(job: study.Job) -> dict:
    """The config.json the job's script writes (kd.rundir.run_config of its flags)."""
    config = job.config
    run_info = {"arch": STUDENT_ARCH}
    if job.distills:
        cached = config["teacher_logits"] == "cache"
        run_info.update(teacher_sha256=config["teacher_sha256"],
                        teacher_logits=config["teacher_logits"],
                        teacher_cache_sha256="cd34" if cached else None)
    args = argparse.Namespace(**{k: v for k, v in config.items() if k not in run_info})
    return run_config(args, torch.device("cpu"), run_info, World())


@pytest.fixture
def folders(tmp_path) -> tuple[dict[str, dict], dict[str, study.Job]]:
    """Run folders' configs (a CE baseline, online KD of two seeds, a KD run from before
    --method existed, cached KD) and the study jobs that plan the same runs."""
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"stand-in teacher")
    def plan(*argv: str) -> list[study.Job]:
        args, rest = study.build_parser().parse_known_args(
            ["--out_dir", str(tmp_path / "study"), "--teacher_ckpt", str(teacher), *RUN, *argv])
        return study.plan(args, study.flag_values(rest))

    online = {job.name: job for job in plan("--teacher_cache", "none", "--seeds", "0", "1")}
    cached = {job.name: job for job in plan("--teacher_cache", str(tmp_path / "c.pt"),
                                            "--seeds", "0")}
    jobs = {"ce0": online["ce/seed0"], "online0": online["kd/seed0"],
            "online1": online["kd/seed1"], "cached0": cached["kd/seed0"]}
    configs = {name: saved_config(job) for name, job in jobs.items()}
    configs["old0"] = {k: v for k, v in configs["online0"].items() if k not in later_defaults()}
    return configs, jobs


def test_resume_study_and_report_agree(folders, tmp_path):
    configs, jobs = folders
    for (folder, saved), (name, job) in itertools.product(configs.items(), jobs.items()):
        try:
            resumed_config(saved, saved_config(job), 0)
            resumes = True
        except UserError:
            resumes = False
        study_takes = not study.differences(saved, job)
        same_experiment = experiment_key(saved) == experiment_key(saved_config(job))
        same_seed = saved["seed"] == job.config["seed"]
        assert resumes == study_takes == (same_experiment and same_seed), (folder, name)
        expected = folder == name or (folder, name) == ("old0", "online0")
        assert resumes == expected, (folder, name)

    for name, config in configs.items():  # the report groups them as seeds of experiments
        write_run(tmp_path / "report" / name, config, [10.0, 20.0])
    runs, _ = load_runs([tmp_path / "report"])
    groups = sorted(sorted(run.label for run in group.runs) for group in group_runs(runs))
    assert groups == [["cached0"], ["ce0"], ["old0", "online0", "online1"]]
    assert {run.label: run.method for run in runs}["old0"] == "kd"


def test_a_folder_of_another_script_is_named_so(folders):
    configs, jobs = folders
    with pytest.raises(UserError, match=r"^--resume: the folder holds a run made by "
                                        r"distill_student.py, not train_student.py; resume it "
                                        r"with distill_student.py"):
        resumed_config(configs["online0"], saved_config(jobs["ce0"]), 1)
    assert study.differences(configs["ce0"], jobs["online0"]) == [
        "made by train_student.py, not distill_student.py"]


# A run folder's files -> the verdict on it, with the config it was planned with
FOLDER_STATES = {
    "no folder": (None, "run"),
    "empty folder": ([], "run"),
    "config.json only": (["config.json"], "restart"),
    "summary.json, no log or last.pt": (["config.json", "summary.json"], "restart"),
    "a log, no last.pt": (["config.json", "log.csv"], "restart"),
    "a saved epoch": (["config.json", "log.csv", "last.pt"], "resume"),
    "finished": (["config.json", "log.csv", "last.pt", "best.pt", "summary.json"], "done"),
    "finished, last.pt deleted": (["config.json", "log.csv", "best.pt", "summary.json"], "done"),
}


@pytest.mark.parametrize("files,expected", FOLDER_STATES.values(), ids=FOLDER_STATES.keys())
def test_one_verdict_on_each_folder_state(tmp_path, files, expected):
    """kd.rundir.verdict is what study.py plans by and what a submitit job (kd.job) starts by."""
    folder = tmp_path / "run"
    config = {"arch": STUDENT_ARCH, "lr": 0.2, "seed": 0}
    if files is not None:
        folder.mkdir()
        for name in files:
            (folder / name).write_text(json.dumps(config) if name == "config.json" else "x")
    assert verdict(str(folder)) == verdict(str(folder), config) == expected
    assert study.to_do(study.Job("run", "train_student.py", [], str(folder), config)) == expected

    class Started(Exception):
        """The job went past its verdict, on to start the run."""

    def start():
        raise Started
    with pytest.MonkeyPatch.context() as mp:  # a submitit job's start, up to running the script
        mp.setattr(kd.job.submitit, "JobEnvironment", start)
        try:
            outcome = kd.job.RunJob(["train_student.py"], {}, str(tmp_path / "log"),
                                    out_dir=str(folder))()
        except Started:
            outcome = "started"
    assert outcome == ("done before" if RERUN_FLAGS[expected] is None else "started")


@pytest.mark.parametrize("saved", ["{not json", json.dumps({"arch": STUDENT_ARCH, "lr": 0.5})])
def test_a_folder_holding_another_run_is_refused(tmp_path, saved):
    (tmp_path / "log.csv").write_text("x")
    (tmp_path / "config.json").write_text(saved)
    assert verdict(str(tmp_path)) == "restart"  # no planned config: nothing to compare
    with pytest.raises(UserError, match="no readable config.json|--lr 0.5 -> 0.2"):
        verdict(str(tmp_path), {"arch": STUDENT_ARCH, "lr": 0.2, "seed": 0})


@pytest.mark.parametrize("terms,distilled", [
    ([], False), (["train_ce"], True), (["train_ce", "train_kd"], True),
    (["train_ce", "train_hint"], True)])  # a CE run; ab's main stage; kd; fitnet
def test_a_run_without_its_config_is_known_by_its_terms(terms, distilled):
    columns = ["epoch", "lr", "train_loss", "train_top1", *terms, "test_top1", "epoch_time_s",
               "train_img_per_s"]
    assert is_distilled({}, columns) == distilled


def test_later_defaults_are_the_scripts_defaults():
    """A distilled run from before a flag existed had the flag's default in effect: the two
    must not drift apart."""
    defaults = vars(distill_student.build_parser().parse_args([]))
    run_info = {"teacher_logits": "online", "teacher_cache_sha256": None}  # what main() records
    assert all(defaults.get(k, run_info.get(k)) == v for k, v in later_defaults().items())
    method_flags = {f for flags in METHOD_FLAGS.values() for f in flags}
    assert method_flags | {"method"} <= set(later_defaults())  # every flag added since


@pytest.mark.parametrize("out", ["notes.txt", "notes.txt/run"])
def test_an_out_dir_through_a_file_is_one_line(out, tmp_path, fake_data, in_process):
    (tmp_path / "notes.txt").write_text("mine")
    result = in_process("train_student.py", ["--out_dir", tmp_path / out, "--data_dir", fake_data,
                                             "--no-download", "--epochs", "1", "--batch_size",
                                             "100", "--device", "cpu"])
    assert_one_line_error(result, f"--out_dir {tmp_path / out}")
    assert (tmp_path / "notes.txt").read_text() == "mine"

import csv
import os

import pytest
import torch
from torchvision.models import resnet50

import kd.evaluate
from helpers import RunsCode, assert_one_line_error, run_in_process
from kd.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from kd.errors import UserError
from kd.logger import CSVLogger
from kd.models import build_student, build_teacher, load_teacher
from kd.rundir import later_defaults, resumed_config


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = build_student()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
             "config": {"arch": "mobilenet_v3_small", "lr": 0.1}}
    save_checkpoint(str(tmp_path / "c.pt"), state)
    loaded = load_checkpoint(str(tmp_path / "c.pt"))
    assert loaded["epoch"] == 3 and loaded["config"] == state["config"]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v), k
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"model": {}, "config": {"v": 1}})

    def crash(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("killed mid-write")
    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert load_checkpoint(path)["config"] == {"v": 1}
    assert os.listdir(tmp_path) == ["c.pt"]


@pytest.mark.parametrize("use", ["as teacher", "on resume"])
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, fake_data, in_process, use):
    """A pickle that would run code, as a teacher (kd.models.load_teacher) or as a run's last.pt
    (train_student.py --resume: one line on stderr): refused, and its code never runs."""
    marker, folder = tmp_path / "pwned", tmp_path / "run"
    folder.mkdir()
    torch.save({"model": RunsCode(marker), "config": {}}, folder / "last.pt")
    if use == "as teacher":
        with pytest.raises(UserError, match="(?i)global.*system"):
            load_teacher(str(folder / "last.pt"))
    else:
        result = in_process("train_student.py", ["--out_dir", folder, "--data_dir", fake_data,
                                                 "--no-download", "--resume"])
        assert_one_line_error(result, "not a loadable checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"])
def test_garbage_checkpoint_is_a_user_error(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"))


def test_csv_logger_writes_whole_rows_and_trims_on_resume(tmp_path):
    path = str(tmp_path / "log.csv")
    log = CSVLogger(path)
    assert not os.path.exists(path)  # the header is the first row's keys
    for epoch in (1, 2, 3):
        log.log({"epoch": epoch, "loss": 1.0 / epoch})
        assert len(list(csv.DictReader(open(path)))) == epoch  # on disk at once
    log = CSVLogger(path, keep_epochs=2)  # epoch 3 was never checkpointed
    log.log({"epoch": 3, "loss": 0.25})
    rows = list(csv.DictReader(open(path)))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["loss"] == "0.5" and rows[2]["loss"] == "0.25"
    assert os.listdir(tmp_path) == ["log.csv"]


def test_teacher_with_another_number_of_classes_is_refused(tmp_path):
    teacher = build_teacher(32)
    teacher.net.fc = torch.nn.Linear(2048, 10)
    save_checkpoint(str(tmp_path / "t10.pt"), {"model": teacher.state_dict(),
                                               "config": {"arch": "resnet50", "img_size": 32}})
    with pytest.raises(UserError, match="does not fit a 100-class resnet50"):
        load_teacher(str(tmp_path / "t10.pt"))


def foreign_files(folder) -> dict[str, str]:
    """Checkpoints this repo did not write, or wrote for something else, by what is wrong."""
    files = {
        "torchvision state dict": resnet50().state_dict(),
        "config without arch": {"model": build_student().state_dict(), "config": {"stem": "cifar"}},
        "student config without stem": {"model": build_student().state_dict(),
                                        "config": {"arch": "mobilenet_v3_small"}},
        "teacher config without img_size": {"model": {}, "config": {"arch": "resnet50"}},
        "weights of the wrong shapes": {"model": {"fc.weight": torch.zeros(3)},
                                        "config": {"arch": "mobilenet_v3_small", "stem": "cifar"}},
        "model not a state dict": {"model": 3, "config": {"arch": "mobilenet_v3_small",
                                                          "stem": "cifar"}},
        "config not a dict": {"model": {}, "config": [1, 2]},
    }
    paths = {}
    for i, (what, content) in enumerate(files.items()):
        paths[what] = str(folder / f"foreign{i}.pt")
        torch.save(content, paths[what])
    return paths


@pytest.mark.parametrize("entry", ["kd.evaluate", "--teacher_ckpt"])
def test_foreign_checkpoints_are_one_line(entry, fake_data, tmp_path, monkeypatch, capsys):
    for what, path in foreign_files(tmp_path).items():
        if entry == "kd.evaluate":
            argv = [path, "--data_dir", fake_data, "--no-download", "--device", "cpu"]
            result = run_in_process(kd.evaluate.main, argv, monkeypatch, capsys)
        else:
            argv = ["--teacher_ckpt", path, "--out_dir", tmp_path / "kd", "--data_dir", fake_data,
                    "--no-download", "--device", "cpu"]
            result = run_in_process("distill_student.py", argv, monkeypatch, capsys)
        assert_one_line_error(result, path)


def test_kd_runs_from_before_the_method_flags_resume_as_kd():
    old = {"arch": "mobilenet_v3_small", "teacher_sha256": "ab", "alpha": 0.5, "T": 4.0,
           "epochs": 3}
    now = {**old, **later_defaults(), "teacher_cache": None, "save_every": 1}
    assert resumed_config(old, now, 2)["epochs"] == 3
    with pytest.raises(UserError, match="--method kd -> dkd"):
        resumed_config(old, {**now, "method": "dkd"}, 2)
    baseline = {"arch": "mobilenet_v3_small", "epochs": 3}  # not a KD run: nothing is filled in
    with pytest.raises(UserError, match="holds a run made by train_student.py, not "
                                        "distill_student.py; resume it with train_student.py"):
        resumed_config(baseline, now, 2)

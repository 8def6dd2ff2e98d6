"""kd.export: a briefly trained student exports to ONNX, ONNX Runtime gives PyTorch's logits, the
int8 model runs, validation.json holds every field and its numbers are those of the files, and
the report shows them. Speed figures live in the benchmark, not here."""
import contextlib
import csv
import io
import json
import os
import runpy
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import kd.export
from helpers import REPO, TINY_RUN, assert_one_line_error, report
from kd.data import load_split, normalize
from kd.models import Float32Linear, build_student, load_model, plain_heads
from kd.rundir import EXPORT_DIR, EXPORT_FILE
from kd.timing import Timing, physical_cores

FORMS = ["PyTorch eager fp32", "ONNX Runtime fp32", "ONNX Runtime int8"]


@pytest.fixture(scope="module")
def student_run(fake_data, tmp_path_factory):
    """train_student.py's run folder after 1 epoch on fake_data, its export/ by
    `python -m kd.export RUN --int8` with 3 timed runs."""
    folder = tmp_path_factory.mktemp("export") / "student"
    train = runpy.run_path(str(REPO / "train_student.py"))["main"]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(sys, "argv", ["train_student.py", "--out_dir", str(folder), "--data_dir",
                                 fake_data, *TINY_RUN, "--epochs", "1"])
        train()
        kd.export.main([str(folder), "--int8", "--timed_runs", "3", "--no-download"])
    return folder


@pytest.fixture(scope="module")
def varied_export(student_run, fake_data, tmp_path_factory):
    """The fixture's student with its BatchNorm statistics measured on the training images and
    its head scaled to a trained model's logit scale, exported with kd.export: the briefly
    trained student predicts one class for every image (MobileNetV3's BatchNorm momentum is
    0.01), which would make the ONNX-PyTorch comparison one of near-constant logits."""
    folder = tmp_path_factory.mktemp("varied")
    model, ckpt = load_model(str(student_run / "best.pt"))
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average over the forward below
    with torch.no_grad():
        model.train()(normalize(load_split(fake_data, train=True).images))
        model.classifier[-1].weight *= 300
    torch.save({**ckpt, "model": model.state_dict()}, folder / "varied.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        kd.export.main([str(folder / "varied.pt"), "--timed_runs", "1", "--no-download"])
    return folder


def validation(folder) -> dict:
    return json.loads((folder / EXPORT_FILE).read_text())


def test_export_writes_both_models_and_every_field(student_run):
    out = student_run / EXPORT_DIR
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model_int8.onnx",
                                                    "validation.json"]
    record = validation(student_run)
    assert [form["form"] for form in record["forms"]] == FORMS
    assert record["checkpoint"] == "best.pt" and record["test_images"] == 100
    assert record["model"] == "mobilenet_v3_small/cifar-stem@32px"
    assert record["calibration"]["images"] == 300  # the default 1,024, capped at 300 images
    assert record["latency"]["timed_runs"] == 3 and record["latency"]["threads"] >= 1
    for form in record["forms"]:
        assert 0 <= form["test_top1"] <= 100 and 0 <= form["top1_agreement"] <= 100
        assert set(form["latency_ms"]) == {"1", "64"}
        for t in form["latency_ms"].values():
            assert 0 < t["median"] <= t["p90"]
        if form["file"]:
            assert form["size_bytes"] == (out / form["file"]).stat().st_size
    fp32, int8 = record["forms"][1:]
    assert fp32["top1_agreement"] == 100 and fp32["max_abs_logit_diff"] < 1e-3
    assert fp32["images_beyond_bound"] == 0 and not record["blown_up"]
    assert int8["size_bytes"] < fp32["size_bytes"] / 2
    assert int8["top1_change_points"] == pytest.approx(int8["test_top1"] - fp32["test_top1"])


@pytest.mark.parametrize("checkpoint", [
    "best.pt", pytest.param("varied.pt", marks=pytest.mark.slow)])  # slow: a second torch.export
def test_onnx_logits_are_pytorchs_at_any_batch_size(checkpoint, student_run, fake_data, request):
    folder = student_run if checkpoint == "best.pt" else request.getfixturevalue("varied_export")
    path = folder / EXPORT_DIR / "model.onnx"
    proto = onnx.load(path)
    ops = [node.op_type for node in proto.graph.node]
    assert ops[-1] == "Gemm" and "Cast" not in ops  # the float32 head is a plain linear layer
    assert proto.opset_import[0].version == kd.export.OPSET
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["mean"]) == [0.5071, 0.4865, 0.4409] and len(
        json.loads(meta["classes"])) == 100
    model, _ = load_model(str(folder / checkpoint))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = normalize(load_split(fake_data, train=False).images)
    if checkpoint == "varied.pt":
        with torch.no_grad():
            logits = model.eval()(images)
        assert logits.std(0).mean() > 1 and len(logits.argmax(1).unique()) > 10
        fp32 = validation(folder)["forms"][1]
        assert fp32["top1_agreement"] == 100 and 1e-7 < fp32["max_abs_logit_diff"] < 1e-3
    for batch in (1, 7, 100):
        with torch.no_grad():
            expected = model.eval()(images[:batch]).numpy()
        got = session.run(None, {"images": images[:batch].numpy()})[0]
        assert got.shape == (batch, 100)
        assert np.abs(got - expected).max() < 1e-3
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_pytorch_top1_is_the_logged_one_and_int8_top1_is_its_files(student_run, fake_data):
    record = validation(student_run)
    best = json.loads((student_run / "summary.json").read_text())["best_epoch"]
    row = list(csv.DictReader(open(student_run / "log.csv")))[best - 1]
    assert record["forms"][0]["test_top1"] == pytest.approx(float(row["test_top1"]), abs=5e-3)
    int8 = ort.InferenceSession(str(student_run / EXPORT_DIR / "model_int8.onnx"),
                                providers=["CPUExecutionProvider"])
    assert {"QuantizeLinear", "DequantizeLinear"} <= {
        n.op_type for n in onnx.load(student_run / EXPORT_DIR / "model_int8.onnx").graph.node}
    test = load_split(fake_data, train=False)
    logits = int8.run(None, {"images": normalize(test.images).numpy()})[0]
    top1 = 100 * (logits.argmax(1) == test.labels.numpy()).mean()
    assert record["forms"][2]["test_top1"] == pytest.approx(top1, abs=1e-9)


def test_the_report_shows_the_deployed_forms_and_drops_a_stale_export(student_run, tmp_path,
                                                                      capsys):
    text = report(student_run, "--out", tmp_path / "plots", "--no-cost")
    section = text[text.index("### Deployed forms"):]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| student")]
    for row, form in zip(rows, validation(student_run)["forms"], strict=True):
        assert row[1] == f"best.pt, epoch {validation(student_run)['epoch']}"
        assert row[2] == form["form"]
        assert row[3] == f"{form['test_top1']:.2f}"
        assert row[5] == f"{form['max_abs_logit_diff']:.1e}"
        t = form["latency_ms"]["64"]
        assert row[8].rstrip(" |") == f"{t['median']:.2f} / {t['p90']:.2f}"
    assert validation(student_run)["latency"]["cpu"] in section

    copy = tmp_path / "changed"
    shutil.copytree(student_run, copy)
    shutil.copy(copy / "last.pt", copy / "best.pt")  # another file than the export's
    if (copy / "best.pt").read_bytes() == (student_run / "best.pt").read_bytes():
        torch.save({**torch.load(copy / "best.pt", weights_only=True), "epoch": -1},
                   copy / "best.pt")
    text = report(copy, "--out", tmp_path / "plots2", "--no-cost")
    assert "Deployed forms" not in text
    assert "left out of the deployed forms" in capsys.readouterr().err

    shutil.copy(student_run / "best.pt", copy / "best.pt")
    record = validation(copy)
    record["forms"][1]["latency_ms"]["64"] = {"median": None}  # a hand-edited file
    (copy / EXPORT_FILE).write_text(json.dumps(record))
    text = report(copy, "--out", tmp_path / "plots3", "--no-cost")
    assert "Deployed forms" not in text and "lacks what kd.export writes" in text


@pytest.fixture
def reexport(student_run, monkeypatch):
    """kd.export with the fixture's model.onnx copied in place of a new export (seconds of
    torch.export each), for the tests of what happens around the export; checks that what
    would be exported has plain linear heads."""
    def copy_export(model, path, metadata):
        assert not any(isinstance(m, Float32Linear) for m in model.modules())
        assert any(type(m) is nn.Linear for m in model.modules())
        shutil.copy(student_run / EXPORT_DIR / "model.onnx", path)
    monkeypatch.setattr(kd.export, "export_onnx", copy_export)


def test_overwrite_replaces_the_export_only_when_asked(student_run, tmp_path, in_process,
                                                       reexport):
    before = (student_run / EXPORT_FILE).read_text()
    again = in_process(kd.export.main, [student_run, "--timed_runs", "1"])
    assert_one_line_error(again, "exists", "--overwrite")
    assert (student_run / EXPORT_FILE).read_text() == before
    copy = tmp_path / "run"
    shutil.copytree(student_run, copy)
    threads = torch.get_num_threads()
    fp32_only = in_process(kd.export.main, [copy, "--overwrite", "--timed_runs", "1",
                                            "--threads", "1"])
    assert fp32_only.returncode == 0, fp32_only.stderr
    assert torch.get_num_threads() == threads
    assert validation(copy)["latency"]["threads"] == 1
    assert sorted(p.name for p in (copy / EXPORT_DIR).iterdir()) == ["model.onnx",
                                                                    "validation.json"]
    assert [form["form"] for form in validation(copy)["forms"]] == FORMS[:2]
    assert not list(tmp_path.glob(".replaced-*")) and not list(copy.glob(".replaced-*"))


def test_a_failed_replace_puts_the_old_export_back(student_run, tmp_path, in_process,
                                                  monkeypatch, reexport):
    copy = tmp_path / "run"
    shutil.copytree(student_run, copy)
    before = (copy / EXPORT_FILE).read_text()
    rename = os.replace

    def fail_to_move_the_new_export_in(source, target):
        if os.path.basename(source).startswith(".kd-export-"):  # the new export folder
            raise OSError(28, "No space left on device")
        rename(source, target)
    monkeypatch.setattr(os, "replace", fail_to_move_the_new_export_in)
    result = in_process(kd.export.main, [copy, "--overwrite", "--timed_runs", "1"])
    assert_one_line_error(result, "cannot write the export", "No space left")
    assert (copy / EXPORT_FILE).read_text() == before
    assert sorted(p.name for p in (copy / EXPORT_DIR).iterdir()) == [
        "model.onnx", "model_int8.onnx", "validation.json"]
    assert not [p.name for p in copy.iterdir() if p.name.startswith(".")]


def test_overwrite_never_replaces_a_run_folder(student_run, in_process):
    files = sorted(p.name for p in student_run.iterdir())
    result = in_process(kd.export.main, [student_run, "--out", student_run, "--overwrite"])
    assert_one_line_error(result, "kd.export did not write", "pick another --out")
    assert sorted(p.name for p in student_run.iterdir()) == files


def test_an_export_that_differs_from_pytorch_fails_and_writes_nothing(student_run, tmp_path,
                                                                       in_process, monkeypatch,
                                                                       reexport):
    monkeypatch.setattr(kd.export, "LOGIT_ATOL", 0.0)  # no float32 export can be that close
    monkeypatch.setattr(kd.export, "LOGIT_RTOL", 0.0)
    result = in_process(kd.export.main, [student_run, "--out", tmp_path / "x",
                                         "--timed_runs", "1"])
    assert_one_line_error(result, "the ONNX model is not the model", "of the 100 test images",
                          "beyond 0 + 0 x the image's largest |logit|", "nothing written")
    assert not (tmp_path / "x").exists()


def test_the_fp32_bound_is_absolute_plus_relative_to_each_images_scale():
    reference = torch.tensor([[1e10, 5e9, 0.0],  # huge logits
                              [10.0, 3.0, -2.0],  # a trained model's scale
                              [10.0, 10.0 - 1e-3, 0.0]], dtype=torch.float64)  # a near tie
    labels = torch.tensor([0, 0, 1])

    def beyond(change: list[list[float]]) -> int:
        return kd.export.compare(reference + torch.tensor(change, dtype=torch.float64),
                                 reference, labels)["images_beyond_bound"]

    within = [[1.02e4, 0, 0], [0, 9e-4, 0], [0, 0, 0]]  # 1e-6 of the scale; under 1e-3 + 1e-4
    assert beyond(within) == 0
    record = kd.export.compare(reference + torch.tensor(within), reference, labels)
    assert record["max_abs_logit_diff"] == pytest.approx(1.02e4)
    assert record["max_rel_logit_diff"] == pytest.approx(9e-5)  # the second image's 9e-4 of 10
    flip = [[0, 0, 0], [0, 0, 0], [-6e-4, 6e-4, 0]]  # within the bound, the tie flips
    assert beyond(flip) == 0
    record = kd.export.compare(reference + torch.tensor(flip), reference, labels)
    assert record["top1_agreement"] == pytest.approx(200 / 3)  # counted, and allowed
    assert beyond([[2e5, 0, 0], [0, 0, 0], [0, 0, 0]]) == 1  # 2e-5 of the scale
    assert beyond([[0, 0, 0], [0, 1.2e-3, 0], [0, 0, 0]]) == 1  # the absolute bound at scale 10
    assert beyond([[0, 0, 0], [-7.0, 0, 0], [0, 0, 0]]) == 1  # a flip that is no tie: beyond
    nan = torch.full((3, 3), float("nan"), dtype=torch.float64)
    assert kd.export.compare(nan, reference, labels)["images_beyond_bound"] == 3  # never within


@pytest.fixture(scope="module")
def huge_logits_run(student_run, tmp_path_factory):
    """A copy of the fixture's run whose best.pt has its classifier scaled by 1e12 (logits of
    ~1e9, as in a run that blew up), through kd.export; with what it printed. The ONNX file is
    the fixture's with its last Gemm's weight and bias scaled alike, as the exporter would write
    them (seconds of torch.export less)."""
    folder = tmp_path_factory.mktemp("huge") / "student"
    shutil.copytree(student_run, folder, ignore=shutil.ignore_patterns(EXPORT_DIR))
    ckpt = torch.load(folder / "best.pt", weights_only=True)
    head = [k for k in ckpt["model"] if k.startswith("classifier.")][-2:]  # last weight, bias
    for key in head:
        ckpt["model"][key] = ckpt["model"][key] * 1e12
    torch.save(ckpt, folder / "best.pt")

    def scaled_export(model, path, metadata):
        proto = onnx.load(student_run / EXPORT_DIR / "model.onnx")
        gemm = [node for node in proto.graph.node if node.op_type == "Gemm"][-1]
        for tensor in proto.graph.initializer:
            if tensor.name in gemm.input[1:]:
                tensor.CopyFrom(onnx.numpy_helper.from_array(
                    onnx.numpy_helper.to_array(tensor) * np.float32(1e12), tensor.name))
        onnx.save(proto, path)
        kd.export.add_metadata(path, metadata)

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(kd.export, "export_onnx", scaled_export)
        kd.export.main([str(folder), "--timed_runs", "1", "--no-download"])
    return folder, printed.getvalue()


def test_huge_logits_export_as_exact_and_are_named_blown_up(huge_logits_run, fake_data,
                                                             tmp_path):
    folder, printed = huge_logits_run
    record = validation(folder)
    pytorch, fp32 = record["forms"]
    model, _ = load_model(str(folder / "best.pt"))
    with torch.no_grad():
        logits = model.eval()(normalize(load_split(fake_data, train=False).images))
    assert logits.abs().amax(1).min() > 1e9  # every image's logits at that scale
    assert fp32["images_beyond_bound"] == 0 and fp32["top1_agreement"] == 100
    assert fp32["max_abs_logit_diff"] > kd.export.LOGIT_ATOL  # an absolute bound alone refuses
    assert fp32["max_rel_logit_diff"] < kd.export.LOGIT_RTOL
    assert record["blown_up"] and pytorch["test_nll"] > 1e6
    assert "warning: this checkpoint has blown up: its test NLL is " in printed
    text = report(folder, "--out", tmp_path / "plots", "--no-cost")
    section = text[text.index("### Deployed forms"):]
    rows = [line for line in section.splitlines() if line.startswith("| student")]
    assert rows and all(row.startswith("| student (blown up) | ") for row in rows)


def foreign_checkpoints(tmp_path):
    noise = tmp_path / "noise.pt"
    noise.write_bytes(b"not a checkpoint")
    vit = tmp_path / "vit.pt"
    torch.save({"model": {}, "config": {"arch": "vit_b_16"}}, vit)
    misfit = tmp_path / "misfit.pt"
    torch.save({"model": nn.Linear(2, 2).state_dict(),
                "config": {"arch": "mobilenet_v3_small", "stem": "cifar"}}, misfit)
    (tmp_path / "empty_run").mkdir()
    return {"noise": (noise, "not a loadable checkpoint"),
            "vit": (vit, "names no model this repo builds"),
            "misfit": (misfit, "does not fit"),
            "empty_run": (tmp_path / "empty_run", "has no best.pt")}


@pytest.mark.parametrize("case", ["noise", "vit", "misfit", "empty_run", "calibration_0",
                                  "calibration_too_many", "calibration_without_int8",
                                  "out_is_a_file", "out_below_a_file"])
def test_bad_input_is_one_line_and_writes_nothing(case, student_run, tmp_path, in_process):
    out = tmp_path / "out"
    (tmp_path / "file").write_text("mine")
    if case.startswith("calibration"):
        n, phrase = {"calibration_0": ("0", "must be >= 1"),
                     "calibration_too_many": ("301", "more than the 300 training images"),
                     "calibration_without_int8": ("20", "read only with --int8")}[case]
        argv = [student_run, "--calibration_images", n] + ["--int8"] * ("int8" not in case)
    elif case.startswith("out"):
        out = tmp_path / "file" if case == "out_is_a_file" else tmp_path / "file" / "export"
        phrase = "is a file"
        argv = [student_run, "--overwrite"]
    else:
        path, phrase = foreign_checkpoints(tmp_path)[case]
        argv = [path]
    before = sorted(tmp_path.rglob("*")), sorted(student_run.rglob("*"))
    result = in_process(kd.export.main, [*argv, "--out", out])
    assert_one_line_error(result, phrase)
    assert (sorted(tmp_path.rglob("*")), sorted(student_run.rglob("*"))) == before
    assert (tmp_path / "file").read_text() == "mine"


def test_plain_heads_compute_what_the_float32_heads_do():
    model = build_student().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        head = model.classifier[-1]
        plain_heads(model)
        assert type(model.classifier[-1]) is nn.Linear
        assert model.classifier[-1].weight is head.weight  # the same tensors, not copies
        assert not any(isinstance(m, Float32Linear) for m in model.modules())
        assert torch.equal(model(x), expected)


def test_timing_p90():
    timing = Timing(seconds=2.0, first_s=0.0, times=[float(t) for t in range(1, 11)])
    assert timing.p90_seconds == pytest.approx(9.1)  # 10 values, linear interpolation
    assert Timing(1.0, 0.0, [1.0]).p90_seconds == 1.0


def test_physical_cores_count_each_allowed_core_once(tmp_path, monkeypatch):
    """2 packages x 2 cores x 2 hyperthreads: 8 processors, 4 cores."""
    blocks = [f"processor\t: {4 * package + 2 * thread + core}\nphysical id\t: {package}\n"
              f"core id\t\t: {core}\n" for package in (0, 1) for core in (0, 1)
              for thread in (0, 1)]
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("\n".join(blocks))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert physical_cores(str(cpuinfo)) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2})  # two threads of one core
    assert physical_cores(str(cpuinfo)) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 4})
    assert physical_cores(str(cpuinfo)) == 3
    assert physical_cores(str(tmp_path / "missing")) == 3  # no cpuinfo: the allowed CPUs

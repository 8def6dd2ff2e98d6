"""python -m kd.bench: the quick CPU run measures every stage and writes them all.

Speeds depend on the machine: what is checked is that every row is there, that each figure
derived from others (ratios, input cost) is the one its parts give, and that each row trained
with the settings it names.
"""
import json

import pytest

from helpers import assert_one_line_error, run_in_process
import kd.bench
import kd.inference
import kd.train
from kd.methods import DEFAULT, METHODS, flag_defaults


@pytest.mark.slow  # the benchmark: seconds of every configuration
def test_quick_cpu_run_reports_every_stage(tmp_path, in_process):
    out = tmp_path / "bench.json"
    # the quick CPU configs but most method rows (each a method at its defaults, its connector
    # built and stepped the same way): a parameter-free connector, a memory bank, one from a
    # pre-activation tap, MLKD's strong views, and DOT's two backward passes
    method_rows = {f"{name}_t32" for name in METHODS if name != DEFAULT} | {"kd_dot_t32"}
    assert set(kd.bench.METHOD_CONFIGS) == method_rows
    assert set(kd.bench.SMALL_CONFIGS) == {"teacher_32", "student_ce", "kd_t32", "kd_cached",
                                           "eval_student", *method_rows}
    measured = ["at_t32", "crd_t32", "ofd_t32", "mlkd_t32", "kd_dot_t32"]
    configs = [c for c in kd.bench.SMALL_CONFIGS if c not in method_rows or c in measured]
    result = in_process(kd.bench.main, ["--quick", "--device", "cpu", "--images", "128",
                                        "--batch_size", "32", "--repeats", "1", "--json", out,
                                        "--configs", ",".join(configs)])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] and report["torch"] and report["flags"]["quick"]

    data = report["data"]
    assert data["device_loader_img_per_s"] > 0 and data["torchvision_img_per_s"] > 0
    assert data["ratio"] == pytest.approx(data["device_loader_img_per_s"] /
                                          data["torchvision_img_per_s"])

    train = {row["config"]: row for row in report["train"]}
    assert set(train) == {"teacher_32", "student_ce", "kd_t32", "kd_cached", *measured}
    assert train["kd_cached"]["vs_student_ce"] > 0 and report["cache_build"]["views_per_s"] > 0
    ratio = lambda name, base: train[name]["img_per_s"] / train[base]["img_per_s"]
    assert train["kd_cached"]["vs_student_ce"] == pytest.approx(ratio("kd_cached", "student_ce"))
    for name in measured:  # the other methods' cost, against the CE step and online kd
        for base in ("student_ce", "kd_t32"):
            assert train[name][f"vs_{base}"] == pytest.approx(ratio(name, base))
    params = {name: train[name].get("connector_params") for name in measured}
    assert params["crd_t32"] > 0 and params["ofd_t32"] > 0 and params["kd_dot_t32"] is None
    assert params["at_t32"] == params["mlkd_t32"] == 0  # parameter-free connectors
    assert train["crd_t32"]["nce_k"] == flag_defaults()["nce_k"]  # distill_student.py's default
    assert all(row["img_per_s"] > 0 and row["dtype"] == "fp32" for row in train.values())
    for name in ("student_ce", "kd_t32", "kd_cached", "crd_t32"):
        row = train[name]
        assert row["loader_img_per_s"] > 0
        assert row["input_cost_pct"] == pytest.approx(
            100 * (row["img_per_s"] / row["loader_img_per_s"] - 1))
    assert [row["config"] for row in report["eval"]] == ["eval_student"]
    assert report["eval"][0]["img_per_s"] > 0
    assert "kd_t32" in result.stdout and "DeviceLoader" in result.stdout


def test_autocast_dtypes_are_refused_on_cpu(monkeypatch, capsys):
    result = run_in_process(kd.bench.main, ["--device", "cpu", "--dtypes", "bf16"], monkeypatch,
                            capsys)
    assert_one_line_error(result, "only --dtypes fp32 applies")


def test_defaults_are_the_training_settings():
    args = kd.bench.parse_args([])
    kd.bench.fill_defaults(args, cuda=False)
    assert (args.channels_last, args.compile, args.dtypes) == ("on", "off", ["fp32"])
    assert args.cudnn_benchmark is kd.train.CUDNN_BENCHMARK is True
    assert kd.bench.variants(args)[0].memory_format == kd.inference.MEMORY_FORMAT
    kd.bench.fill_defaults(args := kd.bench.parse_args([]), cuda=True)
    assert args.dtypes == ["bf16"] and args.compile == "both"  # the scripts' --amp_dtype

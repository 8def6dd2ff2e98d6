"""Export a checkpoint (the student, or a teacher) to ONNX, check that the exported model is the
model, optionally quantize it to int8, and measure what each deployable form costs on this CPU.

    python -m kd.export runs/student_kd --int8          # into runs/student_kd/export/
    python -m kd.export runs/student_kd/last.pt --out deploy/kd

A run folder means its best.pt. Writes into --out (default: the checkpoint's folder's export/):
  model.onnx       float32, dynamic batch, exported by torch.onnx.export(dynamo=True) at opset 18
                   and checked by onnx.checker.check_model(full_check=True)
  model_int8.onnx  with --int8: ONNX Runtime static quantization (QDQ, per-channel int8 weights,
                   uint8 activations, MinMax ranges), after its pre-processing step, calibrated on
                   --calibration_images training images drawn with --seed
  validation.json  each form (PyTorch eager fp32, ONNX fp32, ONNX int8) on the whole test split of
                   the run's data, run by ONNX Runtime's CPU provider: top-1, agreement with
                   PyTorch's top-1, max |logit difference|, file size; and its latency at batch 1
                   and 64 on the CPU's physical cores (median and p90 of --timed_runs runs after
                   warm-up, the CPU named). The report (plots/plot_runs.py) adds these rows to its
                   cost section.

The fp32 model must be PyTorch's on every test image, or nothing is written and the command says
by how much it differs: its logits within 1e-3 + 1e-5 x the image's largest |logit| (an absolute
and a relative bound, as numpy.allclose has: float32 kernels summing in another order differ in
proportion to the logits' scale), and finite; so its top-1 is PyTorch's, except where PyTorch's
two best logits are that close (a tie at float32 precision). A checkpoint whose test NLL
has blown up (as kd.train names it) is exported, and named so in validation.json, in what the
command prints and in the report. The models take what the scripts feed the network: float32
images [batch, 3, 32, 32], RGB pixels / 255 normalised with the CIFAR-100 mean and std (both in
the ONNX file's metadata, with the class names).
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from kd.checkpoint import current_umask, file_sha256, write_json
from kd.data import CIFAR100_MEAN, CIFAR100_STD, DeviceLoader, Split, load_split, normalize
from kd.errors import UserError, run_script
from kd.flags import HelpFormatter, Parser, add_data_flags, number, positive_int
from kd.metrics import BLOWN_UP_FACTOR, blown_up
from kd.models import load_model, model_name, plain_heads
from kd.rundir import EXPORT_DIR, VALIDATION_FILE
from kd.timing import cpu_name, measure, physical_cores
from kd.inference import predict

OPSET = 18
# The fp32 export's bound on |ONNX - PyTorch| per image: ATOL + RTOL x its largest |logit|. Float32
# kernels differ by ~1e-5 on a trained model's logits (|logit| ~ 10), ~1e-6 relative at any scale.
LOGIT_ATOL, LOGIT_RTOL = 1e-3, 1e-5
INPUT, OUTPUT = "images", "logits"
LATENCY_BATCHES = (1, 64)
WARMUP = 10
CALIBRATION_IMAGES = 1024
FP32_FILE, INT8_FILE = "model.onnx", "model_int8.onnx"


def checkpoint_of(path: str) -> str:
    """The checkpoint a RUN_DIR_OR_CHECKPOINT argument names: a run folder means its best.pt."""
    if os.path.isdir(path):
        best = os.path.join(path, "best.pt")
        if not os.path.isfile(best):
            raise UserError(f"run folder {path} has no best.pt (no epoch finished); pass a "
                            f"checkpoint file instead")
        return best
    return path


def export_onnx(model: nn.Module, path: str, metadata: dict[str, str]) -> None:
    """model (eval mode, float32) as an ONNX file with a dynamic batch dimension, checked."""
    example = torch.zeros(2, 3, 32, 32)  # batch 2: torch.export would specialise a batch of 1
    batch = torch.export.Dim("batch")
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports each stage on stdout
        torch.onnx.export(model, (example,), path, dynamo=True, opset_version=OPSET,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes=({0: batch},), external_data=False)
    add_metadata(path, metadata)


def add_metadata(path: str, metadata: dict[str, str]) -> None:
    """Write metadata into the ONNX file's properties, then check the whole model."""
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, path)
    onnx.checker.check_model(path, full_check=True)


def ort_session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_run(session: ort.InferenceSession, images: torch.Tensor) -> np.ndarray:
    """The session's logits for a batch of CPU images (any memory format)."""
    return session.run([OUTPUT], {INPUT: np.ascontiguousarray(images.numpy())})[0]


def ort_predict(session: ort.InferenceSession, loader: DeviceLoader) -> torch.Tensor:
    """Logits [N, classes] of every image of the (CPU, eval-mode) loader, in order."""
    return torch.cat([torch.from_numpy(ort_run(session, images)) for images, _, _ in loader])


def compare(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 of logits and its agreement with the reference's top-1, both in %; the largest
    absolute logit difference, and the largest relative to each image's scale (its largest
    |reference logit|); and the images whose logits lie beyond the bound logit_bound gives them,
    or are not finite (NaN compares as beyond). Within the bound the top-1 can differ only where
    the reference's best two logits lie within twice the bound of each other (a tie at float32
    precision): a wider gap can only be crossed by a difference beyond it."""
    top1, diff = logits.argmax(1), (logits - reference).abs().amax(1).double()
    scale = reference.abs().amax(1).double()
    return {"test_top1": 100 * (top1 == labels).double().mean().item(),
            "top1_agreement": 100 * (top1 == reference.argmax(1)).double().mean().item(),
            "max_abs_logit_diff": diff.max().item(),
            "max_rel_logit_diff": (diff / scale.clamp_min(torch.finfo(torch.float32).tiny))
            .max().item(),
            "images_beyond_bound": int((~(diff <= logit_bound(scale))).sum())}


def logit_bound(scale: torch.Tensor) -> torch.Tensor:
    """The largest |ONNX - PyTorch| logit difference a correct fp32 export may have on an image
    whose largest |logit| is scale: LOGIT_ATOL + LOGIT_RTOL x scale."""
    return LOGIT_ATOL + LOGIT_RTOL * scale


def calibration_images(train: Split, n: int | None, seed: int) -> np.ndarray:
    """n training images (None: CALIBRATION_IMAGES or all) drawn without replacement by seed,
    normalised as evaluation feeds them (no augmentation: the deployed model sees whole images)."""
    n = min(CALIBRATION_IMAGES, len(train)) if n is None else n
    if n > len(train):
        raise UserError(f"--calibration_images {n} is more than the {len(train)} training "
                        f"images in the run's data")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return normalize(train.images[pick.sort().values]).numpy()


def quantize_int8(fp32_path: str, int8_path: str, images: np.ndarray, work_dir: str) -> None:
    """ONNX Runtime static quantization: pre-processing (shape inference, graph optimisation),
    then QDQ with per-channel int8 weights and uint8 activations, ranges from the images."""
    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(images, max(1, len(images) // 64)))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    prepared = os.path.join(work_dir, "prepared.onnx")
    quant_pre_process(fp32_path, prepared)
    quantize_static(prepared, int8_path, Batches(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    os.remove(prepared)
    onnx.checker.check_model(int8_path, full_check=True)


def latency_ms(call: Callable[[], object], timed_runs: int) -> dict:
    """{'median', 'p90'} milliseconds per call over timed_runs calls, after WARMUP calls."""
    timing = measure(call, warmup=WARMUP, repeats=timed_runs)
    return {"median": 1000 * timing.seconds, "p90": 1000 * timing.p90_seconds}


def form_latency(forward: Callable[[torch.Tensor], object], test: Split, timed_runs: int) -> dict:
    """{batch size: {'median', 'p90'} in ms} of forward on the first test images."""
    return {str(b): latency_ms(lambda x=normalize(test.images[:b]): forward(x), timed_runs)
            for b in LATENCY_BATCHES if b <= len(test)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m kd.export", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder (its best.pt) or a checkpoint written by one of the scripts")
    p.add_argument("--out", default=None,
                   help="folder for the models and validation.json; default: export/ beside "
                        "the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists (it is replaced only once everything passed)")
    p.add_argument("--int8", action="store_true",
                   help="also quantize to int8 with ONNX Runtime, calibrated on training images")
    p.add_argument("--calibration_images", type=positive_int, default=None,
                   help=f"training images --int8 calibrates its activation ranges on; default: "
                        f"{CALIBRATION_IMAGES}, or every training image where there are fewer")
    p.add_argument("--seed", type=int, default=0, help="seeds which images calibrate")
    add_data_flags(p, of_the_run=True)
    p.add_argument("--batch_size", type=positive_int, default=500,
                   help="batch size of the validation passes")
    p.add_argument("--timed_runs", type=positive_int, default=100,
                   help="timed runs per form and batch size (median and p90 reported)")
    p.add_argument("--threads", type=number(int, 1), default=None,
                   help="threads of PyTorch and ONNX Runtime; default: the CPU's physical cores")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.calibration_images is not None and not args.int8:
        raise UserError("--calibration_images is read only with --int8")
    checkpoint = checkpoint_of(args.checkpoint)
    sha256 = file_sha256(checkpoint)
    model, ckpt = load_model(checkpoint)
    if file_sha256(checkpoint) != sha256:
        raise UserError(f"{checkpoint} changed while it was read (a run writing it?); export it "
                        f"once the run has written it")
    out = os.path.abspath(args.out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                                                   EXPORT_DIR))
    check_out(out, args.overwrite)
    data_dir = args.data_dir or ckpt["config"].get("data_dir") or "./data"
    test = load_split(data_dir, train=False, download=args.download)
    calibration = calibration_images(load_split(data_dir, train=True, download=args.download),
                                     args.calibration_images, args.seed) if args.int8 else None
    model = plain_heads(model.eval())
    metadata = {"input": "float32 [batch, 3, 32, 32]: RGB pixels / 255, minus mean, over std",
                "mean": json.dumps(CIFAR100_MEAN), "std": json.dumps(CIFAR100_STD),
                "classes": json.dumps(test.classes), "checkpoint_sha256": sha256}

    work = work_folder(out)
    try:
        record = export_and_check(model, test, calibration, work, metadata,
                                  threads=args.threads or physical_cores(),
                                  timed_runs=args.timed_runs, batch_size=args.batch_size)
        record.update({"checkpoint": os.path.basename(checkpoint), "checkpoint_sha256": sha256,
                       "model": model_name(ckpt["config"]), "epoch": ckpt.get("epoch"),
                       "data_dir": data_dir, "test_images": len(test),
                       "calibration": None if calibration is None else {
                           "images": len(calibration), "seed": args.seed, "from": "training split",
                           "method": "MinMax", "format": "QDQ", "weights": "int8 per channel",
                           "activations": "uint8"}})
        write_json(os.path.join(work, VALIDATION_FILE), record)
        check_out(out, args.overwrite)  # again: an --out made meanwhile is not replaced unasked
        replace_folder(work, out)
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_record(record, out)


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an --out that exists, unless --overwrite is given and it holds only what kd.export
    writes (so a run folder, or a folder of runs, is never replaced); refuse one that cannot be
    made."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder; pick another --out")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite to replace it, or another --out")
    if os.path.exists(out):
        foreign = sorted(set(os.listdir(out)) - {FP32_FILE, INT8_FILE, VALIDATION_FILE})
        if foreign:
            raise UserError(f"--out {out} holds {', '.join(foreign[:3])}, which kd.export did "
                            f"not write; --overwrite replaces only an export folder: pick "
                            f"another --out")
    ancestor = existing_ancestor(out)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "is a file" if not os.path.isdir(ancestor) else "is not writable"
        raise UserError(f"--out {out}: {ancestor} {why}; pick another --out")


def existing_ancestor(path: str) -> str:
    """path's nearest ancestor that exists (a folder, or a file in the way)."""
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    return ancestor


def work_folder(out: str) -> str:
    """An empty folder in out's nearest existing ancestor, where the export is made before it is
    renamed to out (one rename on one file system), with the permissions that the umask gives a
    new folder (mkdtemp's 0700 would hide the export from the group)."""
    work = tempfile.mkdtemp(prefix=".kd-export-", dir=existing_ancestor(out))
    os.chmod(work, 0o777 & ~current_umask())
    return work


def export_and_check(model: nn.Module, test: Split, calibration: np.ndarray | None, work: str,
                     metadata: dict, *, threads: int, timed_runs: int, batch_size: int) -> dict:
    """Export (and, given calibration images, quantize) into work, validate each form on the
    test split and time it: validation.json's forms, exporter and latency method."""
    fp32_path, int8_path = os.path.join(work, FP32_FILE), os.path.join(work, INT8_FILE)
    print(f"exporting to ONNX (opset {OPSET})")
    export_onnx(model, fp32_path, metadata)
    if calibration is not None:
        print(f"quantizing to int8, calibrated on {len(calibration)} training images")
        quantize_int8(fp32_path, int8_path, calibration, work)
    loader = DeviceLoader(test, batch_size, "cpu", train=False)
    with torch.inference_mode():
        reference = predict(model, loader, contextlib.nullcontext)
    pytorch = {"form": "PyTorch eager fp32", "file": None,
               **compare(reference, reference, test.labels),
               "test_nll": F.cross_entropy(reference.double(), test.labels).item()}
    print(f"validating on the {len(test)} test images")

    def onnx_form(name: str, path: str) -> tuple[dict, ort.InferenceSession]:
        session = ort_session(path, threads)
        return {"form": name, "file": os.path.basename(path), "size_bytes": os.path.getsize(path),
                **compare(ort_predict(session, loader), reference, test.labels)}, session

    onnx_forms = [onnx_form("ONNX Runtime fp32", fp32_path)]
    fp32 = onnx_forms[0][0]
    check_fp32(fp32, len(test))
    if calibration is not None:
        onnx_forms.append(onnx_form("ONNX Runtime int8", int8_path))
        int8 = onnx_forms[1][0]
        int8["top1_change_points"] = int8["test_top1"] - fp32["test_top1"]

    print(f"timing each form at batch {' and '.join(map(str, LATENCY_BATCHES))}: "
          f"{timed_runs} runs on {threads} threads")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            pytorch["latency_ms"] = form_latency(model, test, timed_runs)
    finally:
        torch.set_num_threads(torch_threads)
    for form, session in onnx_forms:
        form["latency_ms"] = form_latency(lambda x, s=session: ort_run(s, x), test, timed_runs)
    return {"forms": [pytorch, *(form for form, _ in onnx_forms)],
            "blown_up": blown_up(pytorch["test_nll"]),  # as kd.train names a run's epoch
            "exporter": f"torch.onnx.export(dynamo=True), opset {OPSET}, torch {torch.__version__}",
            "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider",
            "latency": {"cpu": cpu_name(), "threads": threads, "warmup": WARMUP,
                        "timed_runs": timed_runs, "input": "the first test images"}}


def check_fp32(form: dict, images: int) -> None:
    """Refuse an fp32 export with any test image beyond the bound (compare): logits further from
    PyTorch's than logit_bound allows (so another top-1 where PyTorch's is no tie), or not
    finite."""
    if form["images_beyond_bound"]:
        raise UserError(f"the ONNX model is not the model: on {form['images_beyond_bound']} of "
                        f"the {images} test images its logits differ from PyTorch's beyond "
                        f"{LOGIT_ATOL:g} + {LOGIT_RTOL:g} x the image's largest |logit| (up to "
                        f"{form['max_abs_logit_diff']:.3g}, {form['max_rel_logit_diff']:.2g} of "
                        f"that scale; top-1 agrees on {form['top1_agreement']:.2f}%); nothing "
                        f"written")


def replace_folder(source: str, out: str) -> None:
    """Rename source to out; an existing out is deleted only once source is in its place, and
    put back if that fails."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if not os.path.exists(out):
        os.replace(source, out)
        return
    holder = tempfile.mkdtemp(prefix=".replaced-", dir=os.path.dirname(out))
    old = os.path.join(holder, "export")
    os.replace(out, old)
    try:
        os.replace(source, out)
    except BaseException:
        os.replace(old, out)
        os.rmdir(holder)
        raise
    shutil.rmtree(holder)


def print_record(record: dict, out: str) -> None:
    """validation.json as a table, as the report shows it."""
    lat = record["latency"]
    print(f"\n{record['model']} from {record['checkpoint']} (epoch {record['epoch']}), "
          f"{record['test_images']} test images; latency on {lat['cpu']}, {lat['threads']} "
          f"threads, median / p90 of {lat['timed_runs']} runs")
    header = f"{'form':<20} {'top-1':>7} {'agree':>7} {'max|diff|':>10} {'MB':>6}" + "".join(
        f" {f'batch {b} (ms)':>16}" for b in LATENCY_BATCHES)
    print(header)
    for form in record["forms"]:
        size = f"{form['size_bytes'] / 1e6:.2f}" if form.get("size_bytes") else "-"
        times = "".join(f" {t['median']:>7.2f} / {t['p90']:<6.2f}"
                        for t in form["latency_ms"].values())
        print(f"{form['form']:<20} {form['test_top1']:>7.2f} {form['top1_agreement']:>7.2f} "
              f"{form['max_abs_logit_diff']:>10.1e} {size:>6}{times}")
    if record["blown_up"]:
        print(f"warning: this checkpoint has blown up: its test NLL is "
              f"{record['forms'][0]['test_nll']:.3g}, over {BLOWN_UP_FACTOR}x a uniform "
              f"prediction's; its exported forms are exact but predict nothing useful")
    print(f"wrote {out}/: {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
    run_script(main)

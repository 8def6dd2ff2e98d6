"""Evaluate any teacher or student checkpoint of this repo on the CIFAR-100 test set.

    python -m kd.evaluate runs/student_kd/best.pt [--data_dir DIR] [--json metrics.json]

The test split is read from the run's own --data_dir (recorded in the checkpoint) unless
--data_dir says otherwise.
"""
import argparse
import contextlib
import json

import torch

from kd.checkpoint import write_json
from kd.data import DeviceLoader, load_split
from kd.distributed import resolve_device
from kd.errors import run_script
from kd.flags import Parser, add_data_flags, add_device_flag, add_precision_flags, positive_int
from kd.metrics import split_metrics, superclass_map
from kd.models import load_model
from kd.inference import MEMORY_FORMAT, make_autocast, predict


def evaluate_checkpoint(path: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Test-set metrics (top-1, top-5, NLL as 'loss', ECE, superclass accuracy) of a checkpoint,
    in the precision training evaluates with on `device` (autocast as --amp and --amp_dtype say
    on CUDA, float32 on CPU), so they match the log of a run on such a device. args: --data_dir
    (None: the run's own), --download, --amp, --amp_dtype, --batch_size."""
    model, ckpt = load_model(path)
    model.to(device, memory_format=MEMORY_FORMAT)
    data_dir = args.data_dir or ckpt["config"].get("data_dir") or "./data"
    test = load_split(data_dir, train=False, download=args.download)
    autocast = make_autocast(device, amp=args.amp, amp_dtype=args.amp_dtype)
    precision = "float32" if autocast is contextlib.nullcontext else f"{args.amp_dtype} autocast"
    logits = predict(model, DeviceLoader(test, args.batch_size, device, train=False), autocast)
    mapping = superclass_map(load_split(data_dir, train=True, download=args.download),
                             test).to(device)  # as training maps them
    metrics = split_metrics(logits, test.labels.to(device), test.coarse_labels.to(device), mapping)
    return {"checkpoint": path, "arch": ckpt["config"]["arch"], "epoch": ckpt.get("epoch"),
            "data_dir": data_dir, "device": str(device), "precision": precision,
            **{f"test_{k}": v for k, v in metrics.items()}}


def main() -> None:
    p = Parser(prog="python -m kd.evaluate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a best.pt or last.pt written by one of the three scripts")
    add_data_flags(p, of_the_run=True)
    add_device_flag(p)
    add_precision_flags(p)  # as training evaluates
    p.add_argument("--batch_size", type=positive_int, default=1000, help="evaluation batch size")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    args = p.parse_args()
    metrics = evaluate_checkpoint(args.checkpoint, args, resolve_device(args.device))
    print(json.dumps(metrics, indent=2))
    if args.json:
        write_json(args.json, metrics)


if __name__ == "__main__":
    run_script(main)

"""Evaluate any teacher or student checkpoint of this repo on the CIFAR-100 test set.

    python -m kd.evaluate runs/student_kd/best.pt [--data_dir ./data] [--json metrics.json]
"""
import argparse
import json
from types import SimpleNamespace

import torch

from kd.checkpoint import load_checkpoint, write_json
from kd.cli import run_script
from kd.data import DeviceLoader, load_split
from kd.engine import predict
from kd.errors import UserError
from kd.flags import Parser
from kd.metrics import fine_to_coarse, split_metrics
from kd.models import build_model
from kd.distributed import resolve_device
from kd.train import make_autocast


def evaluate_checkpoint(path: str, data_dir: str, device: torch.device, batch_size: int = 1000,
                        download: bool = True) -> dict:
    """Test-set metrics (top-1, top-5, NLL as 'loss', ECE, superclass accuracy) of a checkpoint,
    under the autocast setting it was trained with, so they match the run's log."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt["config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path} does not fit its recorded architecture: {str(e).splitlines()[0]}")
    model.to(device, memory_format=torch.channels_last)
    test = load_split(data_dir, train=False, download=download)
    autocast = make_autocast(SimpleNamespace(**ckpt["config"]), device)  # as the run evaluated
    logits = predict(model, DeviceLoader(test, batch_size, False, device), autocast)
    mapping = fine_to_coarse(test.labels, test.coarse_labels).to(device)
    metrics = split_metrics(logits, test.labels.to(device), test.coarse_labels.to(device), mapping)
    return {"checkpoint": path, "arch": ckpt["config"]["arch"], "epoch": ckpt.get("epoch"),
            **{f"test_{k}": v for k, v in metrics.items()}}


def main() -> None:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a best.pt or last.pt written by one of the three scripts")
    p.add_argument("--data_dir", default="./data", help="folder holding cifar-100-python/")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                   help="download CIFAR-100 into --data_dir when it is missing there")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="where to run")
    p.add_argument("--batch_size", type=int, default=1000, help="evaluation batch size")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    args = p.parse_args()
    metrics = evaluate_checkpoint(args.checkpoint, args.data_dir, resolve_device(args.device),
                                  args.batch_size, args.download)
    print(json.dumps(metrics, indent=2))
    if args.json:
        write_json(args.json, metrics)


if __name__ == "__main__":
    run_script(main)

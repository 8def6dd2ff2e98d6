"""Model cost: parameters, multiply-accumulates per image and CPU latency at batch 1; and the
deployable forms kd.export measured for a run (PyTorch, ONNX fp32, ONNX int8), read from the
run's export/validation.json, never re-measured here.

Each model is an untrained instance of a run's architecture fed what training feeds it, a 32 px
image: the student sees it with its stem, the teacher upsamples it inside the model to its config
img_size, so its MACs are those at that size (the resize itself is not counted). MACs are
FlopCounterMode's FLOPs / 2. Results are cached per model in a JSON file and reused while the
CPU, torch's thread count, the torch version and the number of timed passes stay the same.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from kd.metrics import BLOWN_UP_FACTOR
from kd.models import build_model, model_name
from kd.timing import cpu_name, measure as time_call
from plots.rundata import Run
from plots.tables import markdown

INPUT_SHAPE = (1, 3, 32, 32)
WARMUP = 3
COST_HEADER = ["model", "params (M)", "MACs (M)", "CPU latency (ms)"]


def machine() -> dict:
    """What a latency depends on besides the model."""
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__}


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2


def median_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    return 1000 * time_call(lambda: model(x), warmup=WARMUP, repeats=repeats).seconds


def measure(config: dict, repeats: int) -> dict:
    """{'params', 'macs', 'latency_ms'} of the model a run's config describes, in eval mode."""
    model = build_model(config, "config").eval()
    x = torch.zeros(INPUT_SHAPE)
    with torch.inference_mode():
        return {"params": sum(p.numel() for p in model.parameters()),
                "macs": count_macs(model, x), "latency_ms": median_latency_ms(model, x, repeats)}


def read_cache(path: Path) -> dict:
    """The cache, or {} when it is missing or unreadable (it is only ever re-measured)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def model_costs(configs: list[dict], cache_path: Path, repeats: int) -> dict[str, dict]:
    """model_name -> measure() result for each distinct known model among configs, plus the
    'machine' and 'repeats' it was measured with; measured only when not cached for this machine."""
    here = machine()
    cache = read_cache(cache_path)
    costs = {}
    for config in configs:
        key = model_name(config)
        if key is None or key in costs:
            continue
        entry = cache.get(key)
        if not isinstance(entry, dict) or entry.get("machine") != here or \
                entry.get("repeats") != repeats:
            entry = cache[key] = {**measure(config, repeats), "machine": here, "repeats": repeats}
        costs[key] = entry
    cache_path.write_text(json.dumps(cache, indent=2) + "\n")
    return costs


def cost_section(costs: dict[str, dict]) -> str:
    """results.md's model-cost table with its note, for costs measured with one number of timed
    passes."""
    repeats = next(iter(costs.values()))["repeats"]
    return "\n\n".join([cost_note(repeats),
                        markdown(COST_HEADER, cost_rows(costs))])


def cost_rows(costs: dict[str, dict]) -> list[list[str]]:
    return [[key, f"{c['params'] / 1e6:.2f}", f"{c['macs'] / 1e6:.1f}", f"{c['latency_ms']:.2f}"]
            for key, c in costs.items()]


def cost_note(repeats: int) -> str:
    m = machine()
    return (f"CPU: {m['cpu']}, {m['threads']} torch threads, torch {m['torch']}. Latency: median "
            f"of {repeats} forward passes after {WARMUP} warm-up passes, batch 1, float32, eval "
            f"mode, torch.inference_mode. MACs per image = FlopCounterMode FLOPs / 2 (the "
            f"teacher's upsampling of the 32 px input is not counted).")


DEPLOYED_HEADER = ["run", "checkpoint", "form", "test top-1", "agree %", "max abs logit diff",
                   "size (MB)"]


def batch_sizes(runs: list[Run]) -> list[str]:
    """The batch sizes any export was timed at, in increasing order."""
    return sorted({b for run in runs for form in run.export["forms"] for b in form["latency_ms"]},
                  key=lambda b: (len(b), b))


def deployed_rows(run: Run, batches: list[str]) -> list[list[str]]:
    record, rows = run.export, []
    checkpoint = f"{record.get('checkpoint')}, epoch {record.get('epoch')}"
    for form in record["forms"]:
        size = form.get("size_bytes")
        label = run.label + (" (blown up)" if record.get("blown_up") else "")
        rows.append([label, checkpoint, form["form"], f"{form['test_top1']:.2f}",
                     f"{form['top1_agreement']:.2f}", f"{form['max_abs_logit_diff']:.1e}",
                     f"{size / 1e6:.2f}" if isinstance(size, int) else "–",
                     *(f"{t['median']:.2f} / {t['p90']:.2f}" if t else "–"
                       for t in (form["latency_ms"].get(b) for b in batches))])
    return rows


def measured_on(record: dict) -> str:
    lat = record["latency"]
    return (f"{lat.get('cpu')}, {lat.get('threads')} threads, ONNX Runtime "
            f"{record.get('onnxruntime')}, median / p90 of {lat.get('timed_runs')} runs after "
            f"{lat.get('warmup')} warm-up runs")


def deployed_section(runs: list[Run]) -> str | None:
    """results.md's table of each exported run's deployable forms, or None when no run has
    one: accuracy and latency as kd.export measured and wrote them."""
    exported = [run for run in runs if run.export is not None]
    if not exported:
        return None
    machines = {measured_on(run.export) for run in exported}
    where = (f"Measured on {machines.pop()}." if len(machines) == 1 else "Measured on:\n\n" +
             "\n".join(f"- {run.label}: {measured_on(run.export)}" for run in exported))
    note = (f"Each exported run's checkpoint as deployed, measured by `python -m kd.export RUN "
            f"[--int8]` and read from its `export/validation.json`. Test top-1 on the run's whole "
            f"test split, computed by PyTorch (float32) and by ONNX Runtime's CPU provider; "
            f"*agree*: the share of test images whose top-1 equals PyTorch's; *max abs logit "
            f"diff*: the largest difference from PyTorch's logits; *(blown up)*: a checkpoint "
            f"whose test NLL is over {BLOWN_UP_FACTOR}x a uniform prediction's, exported exactly "
            f"and useless. Latency per batch of test images, median / p90 in ms, every form "
            f"timed alike (so PyTorch's here can differ from the table above, timed on an "
            f"untrained model with torch's threads). {where}")
    batches = batch_sizes(exported)
    rows = [row for run in exported for row in deployed_rows(run, batches)]
    return "\n\n".join(["### Deployed forms", note,
                         markdown(DEPLOYED_HEADER + [f"batch {b} (ms)" for b in batches], rows)])

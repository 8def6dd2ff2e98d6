"""Model cost: parameters, multiply-accumulates per image and CPU latency at batch 1.

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

from kd.models import build_model, model_name
from kd.timing import cpu_name, measure as time_call
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
    """results.md's model-cost section, for costs measured with one number of timed passes."""
    repeats = next(iter(costs.values()))["repeats"]
    return "\n\n".join(["## Model cost", cost_note(repeats),
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

"""How this repo times things, so that the benchmark, the report's cost table and kd.export
measure alike: the machine's name and cores, and the median time of a call after warm-up."""
import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows of it."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity, where the OS has one)."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else \
        set(range(os.cpu_count() or 1))


def physical_cores(cpuinfo: str = "/proc/cpuinfo") -> int:
    """Physical cores among the CPUs this process may run on: the distinct (physical id, core
    id) pairs of its allowed processors in cpuinfo, so two hyperthreads of one core count once;
    the number of allowed CPUs where cpuinfo does not tell."""
    allowed = allowed_cpus()
    cores = set()
    with contextlib.suppress(OSError), open(cpuinfo) as f:
        for block in f.read().split("\n\n"):
            fields = {key.strip(): value.strip() for key, _, value in
                      (line.partition(":") for line in block.splitlines())}
            processor = fields.get("processor", "")
            if processor.isdigit() and int(processor) in allowed and "core id" in fields:
                cores.add((fields.get("physical id"), fields["core id"]))
    return len(cores) or len(allowed) or 1


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of threads torch computes on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} torch threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(block: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of block takes; on CUDA between events, with one sync at the end."""
    if device.type != "cuda":
        start = time.perf_counter()
        block()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    block()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3


@dataclass
class Timing:
    seconds: float  # median seconds per call
    first_s: float  # the first warm-up call alone: compilation, cuDNN set-up, worker start
    times: list[float]  # seconds per call of each timed block, in the order they ran

    @property
    def p90_seconds(self) -> float:
        """The 90th percentile of seconds per call over the timed blocks."""
        if len(self.times) == 1:
            return self.times[0]
        return statistics.quantiles(self.times, n=10, method="inclusive")[-1]


def measure(call: Callable[[], None], *, calls_per_block: int = 1, warmup: int = 1,
            repeats: int = 5, device: torch.device = torch.device("cpu")) -> Timing:
    """Median seconds per call over `repeats` timed blocks of `calls_per_block` calls, after
    `warmup` untimed calls (at least one: the first, timed alone as first_s)."""
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        call()
    sync(device)

    def block() -> None:
        for _ in range(calls_per_block):
            call()
    times = [time_block(block, device) / calls_per_block for _ in range(repeats)]
    return Timing(statistics.median(times), first_s, times)

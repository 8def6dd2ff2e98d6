"""Several processes under torchrun: PyTorch's DistributedDataParallel, nothing home-made.

Single-process runs see world_size 1 and every helper here becomes a no-op.
"""
import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> "World":
        """The process's place as torchrun describes it (World() when not launched by torchrun)."""
        if "WORLD_SIZE" not in os.environ:
            return World()
        return World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                     int(os.environ["WORLD_SIZE"]))


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda when available; asking for cuda without it is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init_world(device_name: str) -> tuple[World, torch.device]:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU).

    Each rank gets its own GPU (cuda:LOCAL_RANK); a single process gets the device asked for.
    """
    device = resolve_device(device_name)
    world = World.from_env()
    if world.size == 1:
        return world, device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return world, torch.device(f"cuda:{world.local_rank}" if cuda else "cpu")


def shard_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank's contiguous [start, end) of `total` rows; shard sizes differ by at most one."""
    return rank * total // world_size, (rank + 1) * total // world_size


def gather_rows(shard: torch.Tensor, total: int, world: World) -> torch.Tensor:
    """Concatenate each rank's contiguous shard (shard_range) of a split's rows."""
    if world.size == 1:
        return shard
    sizes = [end - start for start, end in (shard_range(total, r, world.size)
                                            for r in range(world.size))]
    padded = torch.zeros((max(sizes), *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
    padded[:len(shard)] = shard  # all_gather needs equal sizes
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def sync_batch_norm(model: nn.Module, world: World, device: torch.device, sync_bn: bool
                    ) -> nn.Module:
    """model with SyncBatchNorm layers under torchrun when --sync_bn asks (CUDA only), else
    itself: the module every rank saves, evaluates and wraps (wrap_ddp)."""
    if world.size == 1 or not sync_bn:
        return model
    if device.type != "cuda":
        raise UserError("--sync_bn needs CUDA (SyncBatchNorm has no CPU implementation)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, world: World, device: torch.device, *, static_graph: bool = False
             ) -> nn.Module:
    """The module to train through: under torchrun model's DistributedDataParallel wrapper, else
    model itself, as it is for a module without trainable parameters (a connector that only
    reads the taps). The student and a feature method's connector get a wrapper each, with
    these same bucket settings.

    static_graph (the connector's): the loss reaches the same parameters every step, but not
    necessarily all of them or any (FT's paraphraser is frozen after its init stage; AB's and
    FSP's main stage is CE alone); DDP learns which in the first step, where without it a
    connector read in part fails at the next step ("Expected to have finished reduction").
    It counts every backward pass through the parameters as a step, so the wrapper is made
    after any init stage (kd.train.fit)."""
    if world.size == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    # BatchNorm statistics: kd.train broadcasts rank 0's after each epoch, not at every forward
    # (newer PyTorch names broadcast_buffers forward_sync_buffers)
    DDP = torch.nn.parallel.DistributedDataParallel
    new_name = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    no_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True, static_graph=static_graph, **no_sync)


def average_gradients(parameters: list[nn.Parameter], world: World) -> None:
    """Average the parameters' gradients over the ranks (one all-reduce), as DDP would: for an
    init stage (kd.train.initialize), whose loss reads the student's features but not its
    logits, so a DDP wrapper of the student would wait for the classifier's gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if world.size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def norm_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics of module's BatchNorm layers: each rank's own during an epoch
    (DDP does not sync buffers at every forward), rank 0's given to all after it."""
    return [b for m in module.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]


def broadcast_buffers(module: nn.Module, world: World) -> None:
    """Give every rank rank 0's BatchNorm statistics, which is what the checkpoint holds."""
    if world.size > 1:
        for buffer in norm_statistics(module):
            dist.broadcast(buffer, src=0)


def agreed_stop(stop_requested, world: World, device: torch.device, every: int = 25):
    """A stop check that all ranks answer alike: single-process it is stop_requested itself;
    distributed, the ranks combine their flags every `every` steps, so they stop at one step."""
    if world.size == 1:
        return stop_requested
    calls = [0]

    def should_stop() -> bool:
        calls[0] += 1
        if calls[0] % every:
            return False
        flag = torch.tensor([float(stop_requested())], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
    return should_stop


def check_in_sync(module: nn.Module, world: World) -> None:
    """Fail loudly if the ranks' weights or state have drifted apart (they never should): the
    parameters and persistent buffers (a connector's state: CRD's memory bank and Z), BatchNorm's
    statistics aside (norm_statistics)."""
    if world.size == 1:
        return
    own = {id(b) for b in norm_statistics(module)}
    state = [t for t in module.state_dict(keep_vars=True).values()
             if isinstance(t, torch.Tensor) and id(t) not in own]
    with torch.no_grad():
        checksum = torch.stack([t.double().sum() for t in state]).sum().reshape(1)
    parts = [torch.empty_like(checksum) for _ in range(world.size)]
    dist.all_gather(parts, checksum)
    if any(not torch.equal(p, checksum) for p in parts):
        raise RuntimeError(f"rank weights differ across processes: {[p.item() for p in parts]}")


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a training step concatenated in rank order, which is the global
    batch's order (kd.data.DeviceLoader; itself in a single process). No gradient flows back."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def rank_and_size() -> tuple[int, int]:
    """This process's rank and the number of processes ((0, 1) in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def max_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The largest of the ranks' values (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


@contextmanager
def local_main_first(world: World, device: torch.device):
    """Run the block on each machine's local rank 0 first, then on the other ranks (downloads)."""
    barrier = lambda: (dist.barrier(device_ids=[device.index]) if device.type == "cuda"
                       else dist.barrier())
    if world.size > 1 and world.local_rank != 0:
        barrier()
    yield
    if world.size > 1 and world.local_rank == 0:
        barrier()


def average_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of per-rank values (identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()

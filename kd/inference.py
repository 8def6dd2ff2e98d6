"""Inference, below the training loop: the memory layout every model runs in, the autocast
factory, and the logits of a loader's images. kd.train evaluates with it; kd.cache, kd.evaluate,
kd.export and kd.bench predict with it without importing the loop."""
import contextlib
import functools
from typing import Callable

import torch
import torch.nn as nn

from kd.data import DeviceLoader
from kd.distributed import World, gather_rows
from kd.errors import UserError
from kd.models import NUM_CLASSES

MEMORY_FORMAT = torch.channels_last  # the loader's layout; cuDNN's fast depthwise convs need it


def make_autocast(device: torch.device, *, amp: bool, amp_dtype: str
                  ) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts: bf16/fp16 on CUDA with amp, a no-op otherwise."""
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext
    if amp_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bfloat16 support; pass --amp_dtype fp16 or --no-amp")
    dtype = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
    return functools.partial(torch.autocast, "cuda", dtype=dtype)


@torch.inference_mode()
def predict(model: nn.Module, loader: DeviceLoader, autocast) -> torch.Tensor:
    """float32 logits [N, classes], on the device, for every image of the loader's shard in order.

    The last, smaller batch is zero-padded to the full batch size so that a compiled model
    sees one static shape; the padded rows are dropped.
    """
    model.eval()
    chunks = []
    for images, labels, _ in loader:
        if len(images) < loader.batch_size:
            padding = images.new_zeros((loader.batch_size - len(images), *images.shape[1:]))
            images = torch.cat([images, padding]).contiguous(memory_format=MEMORY_FORMAT)
        with autocast():
            chunks.append(model(images)[:len(labels)].float())
    return torch.cat(chunks) if chunks else torch.zeros(0, NUM_CLASSES, device=loader.device)


def predict_splits(model: nn.Module, loaders: dict[str, DeviceLoader], autocast, world: World
                   ) -> dict[str, torch.Tensor]:
    """Logits of every evaluation split; under torchrun each rank predicts a shard, all gather."""
    return {name: gather_rows(predict(model, loader, autocast), len(loader.split), world)
            for name, loader in loaders.items()}

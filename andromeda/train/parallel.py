"""Things applied to a built model from outside: compile and DDP.

Offers `DistInfo` / `init_distributed()` (torchrun environment -> process group),
`compile_model(model)`, `wrap_ddp(model, dist)`,
`no_sync(model, last_micro_step)`, `all_gather(obj, dist)` and `largest_micro_batch(...)`
(try-and-halve search for `--batch-size auto`). Model files never import torch.distributed;
this module does it for them. Activation checkpointing is a model option
(`block.checkpoint_activations`): the Transformer runs each block under
torch.utils.checkpoint, so the auxiliary losses a block returns are outputs of the
checkpointed call.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); one process
    without torchrun. NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    import torch.distributed as dist
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown_distributed(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def compile_model(model: nn.Module) -> nn.Module:
    """Compile in place (nn.Module.compile), so parameter names and state_dict keys stay
    those of the plain model and checkpoints load anywhere."""
    model.compile()
    return model


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    if info.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def no_sync(model: nn.Module, last_micro_step: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if last_micro_step or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_gather(obj, info: DistInfo) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] without distribution."""
    if info.world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def largest_micro_batch(fits: Callable[[int], bool], global_batch: int) -> int:
    """The largest divisor of `global_batch` for which `fits(batch)` holds, trying the whole
    batch first and then about halving (the largest divisor <= half the last try), so the
    global batch is kept exactly by accumulation. `fits` runs a forward and backward and
    returns False on out-of-memory. Raises RuntimeError when not even 1 fits."""
    batch = global_batch
    while True:
        if fits(batch):
            return batch
        if batch == 1:
            raise RuntimeError("not even a micro-batch of 1 sequence fits in device memory; shorten train.seq_len")
        batch = max(d for d in range(1, batch // 2 + 1) if global_batch % d == 0)


def cuda_fits(step: Callable[[int], None]) -> Callable[[int], bool]:
    """Turn a trial step into a predicate that catches CUDA out-of-memory."""
    def fits(batch: int) -> bool:
        try:
            step(batch)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
    return fits

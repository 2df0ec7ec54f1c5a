"""Things applied to a built model from outside: compile, DDP, FSDP.

Offers `DistInfo` / `init_distributed()` (torchrun environment -> process group),
`compile_model(model)`, `wrap_ddp(model, dist)`, `apply_fsdp(model, device, dtype, offload)`
(FSDP2: one unit per block, then the root; a model built on the meta device is materialised
shard by shard), `parallelize(model, cfg, ...)` (the one entry the trainer calls),
`no_sync(model, last_micro_step)`, `all_gather(obj, dist)`, `plain(tensor)`,
`local_state_bytes(model, optimizer)` and `largest_micro_batch(...)` (try-and-halve search for
`--batch-size auto`). Model files never import torch.distributed; this module does it for them.
Activation checkpointing is a model option (`block.checkpoint_activations`): the Transformer
runs each block under torch.utils.checkpoint, so the auxiliary losses a block returns are
outputs of the checkpointed call; under FSDP the recomputation gathers the block again.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    own_group: bool = False
    """A one-process group this module made (FSDP without torchrun); destroyed at shutdown."""

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str, parallel: str = "ddp") -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); one process
    without torchrun. NCCL on GPUs, gloo on CPUs. FSDP without torchrun runs as a world of one
    (an in-memory store, no network): the same sharded code path and checkpoints, and CPU
    offload still frees device memory."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    import torch.distributed as dist
    if world == 1 and parallel == "fsdp" and not dist.is_initialized():
        dist.init_process_group(_backend(device_type), store=dist.HashStore(), rank=0, world_size=1)
        return DistInfo(own_group=True)
    if world == 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(_backend(device_type))
    return info


def _backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def shutdown_distributed(info: DistInfo) -> None:
    if info.world > 1 or info.own_group:
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


def parallelize(model: nn.Module, cfg, info: DistInfo, device: torch.device,
                dtype: Optional[torch.dtype]) -> nn.Module:
    """Apply what TrainConfig `cfg` asks for (compile, then DDP or FSDP) and return the module
    to call; its parameters are those the optimizer must own (FSDP replaces them by shards)."""
    if cfg.parallel == "fsdp":
        if cfg.compile:  # per block, as FSDP's hooks sit between blocks (torchtitan does the same)
            for block in model.layers:
                block.compile()
        return apply_fsdp(model, device, dtype, offload=cfg.offload == "cpu")
    model.to(device)
    if cfg.compile:
        compile_model(model)
    return wrap_ddp(model, info, device)


def apply_fsdp(model: nn.Module, device: torch.device, dtype: Optional[torch.dtype],
               offload: bool = False) -> nn.Module:
    """FSDP2 (`fully_shard`) over the current process group: one unit per block, then the root
    (embeddings, final norm, head), so at most one block is gathered whole at a time.

    Master weights, gradients and optimizer state stay float32 and sharded; with `dtype` bf16
    the gathered weights and the gradient reduction run in bf16 (MixedPrecisionPolicy). With
    `offload` the shards, their gradients and the optimizer update live in host memory
    (CPUOffloadPolicy). A model built on the meta device is materialised after sharding, so
    no rank ever holds it whole (see `_ShardedInit`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype),
                  offload_policy=CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy())
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block is gathered again at once for backward: keeping it saves one all-gather.
        fully_shard(block, reshard_after_forward=i < last, **policy)
    fully_shard(model, **policy)
    if on_meta:
        model.to_empty(device="cpu" if offload else device)
        with torch.no_grad(), _ShardedInit(model):
            model.init_weights()
        if offload:  # derived buffers (rotary tables) are not sharded; the compute device needs them
            for module in model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    setattr(module, name, buf.to(device))
    return model


# Reading these never changes a tensor, so they need no staging (see _ShardedInit).
_METADATA = frozenset({"shape", "dim", "size", "dtype", "device", "numel", "ndim", "is_meta", "requires_grad",
                       "is_floating_point", "element_size", "layout"})


class _ShardedInit(torch.overrides.TorchFunctionMode):
    """Run a sharded model's init rules on whole tensors, one parameter at a time.

    The first op that touches a sharded parameter (a DTensor) gathers it into a plain full
    tensor, the "staged" copy, and the op (and every later one on that parameter, views
    such as the q/k/v split of a fused projection included) runs on that copy; when an op
    touches another parameter, the rank keeps its slice of the staged copy and drops it.
    So the rules draw exactly the random numbers a one-process model draws (same generator,
    same order, same shapes): one seed gives the same model at every world size, and only the
    parameter being initialised is ever whole. Written here because DTensor's own ops draw
    random numbers per shard and split a sharded dimension into copies, not views."""

    def __init__(self, model: nn.Module):
        super().__init__()
        from torch.distributed.tensor import DTensor
        self.sharded = {id(p) for p in model.parameters() if isinstance(p, DTensor)}
        self.staged: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_flatten, tree_map
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property such as .shape: its descriptor holds the name
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _METADATA:
            return func(*args, **kwargs)
        touched = {id(a): a for a in tree_flatten((args, kwargs))[0] if id(a) in self.sharded}
        if not touched:  # plain tensors, views of a staged copy among them
            return func(*args, **kwargs)
        for key in [k for k in self.staged if k not in touched]:
            self._keep_slice(key)
        for key, param in touched.items():
            if key not in self.staged:
                self.staged[key] = (param, param.full_tensor())
        args, kwargs = tree_map(lambda a: self.staged[id(a)][1] if id(a) in touched else a, (args, kwargs))
        return func(*args, **kwargs)

    def _keep_slice(self, key: int) -> None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        param, full = self.staged.pop(key)
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        param.to_local().copy_(full[tuple(slice(o, o + n) for o, n in zip(offset, shape))])

    def __exit__(self, *exc):
        for key in list(self.staged):
            self._keep_slice(key)
        return super().__exit__(*exc)


def plain(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (e.g. the gradient norm of sharded parameters) as an ordinary tensor."""
    from torch.distributed.tensor import DTensor
    return x.full_tensor() if isinstance(x, DTensor) else x


def local_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes this rank holds for parameters, gradients and optimizer state (its shards only)."""
    from torch.distributed.tensor import DTensor

    def size(t) -> int:
        if not torch.is_tensor(t):
            return 0
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    return {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params),
            "optimizer": sum(size(v) for s in optimizer.state.values() for v in s.values())}


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

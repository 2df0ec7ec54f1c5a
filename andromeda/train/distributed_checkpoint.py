"""Sharded training checkpoints (torch.distributed.checkpoint) and resuming at another world size.

A step folder of an FSDP run holds

    config.json        as in every checkpoint (model config, tokenizer, meta with the world size)
    tokenizer files
    train_state.pt     step, every rank's RNG state and data position, configs (no optimizer)
    sharded/           .metadata + one __R_0.distcp file per rank: model and optimizer state,
                       keyed by parameter name, each rank writing its own shards in parallel

It appears atomically like any checkpoint: every rank writes into one temporary folder, then
rank 0 adds the small files, syncs and renames it. Because DCP records which slice of which
tensor each file holds, any world size (and DDP or one process) can read it back: resharding
is by construction. Offers:

- `save_sharded(...)`: write a step folder (collective: every rank calls it).
- `load_training_state(folder, model, optimizer, state)`: any checkpoint, sharded or ordinary,
  into any model (plain, DDP or FSDP) and its optimizer.
- `load_sharded_weights(folder, model_cfg)`: the full weights, in one process without a
  process group (eval, generate, convert, consolidate).
- `sharded_damage(folder)`: why a sharded step folder is unreadable (missing or truncated
  shard files), or None; `--resume` skips such folders.
- `check_resume(folder, model_cfg, train_cfg, world)`: refuse, before anything is written, a
  resume under another model config or one that would change the global batch, naming the
  `--set` that keeps it.

DCP reads its metadata file with plain pickle and non-tensor items with `torch.load` in full
pickle mode; `_SafeReader` and `_SafePlanner` narrow both (a restricted unpickler, and
`weights_only=True`), so a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from andromeda.checkpoint import SHARDED, WEIGHTS, is_sharded, publish_folder, read_config, write_config_files
from andromeda.errors import UserError
from andromeda.model.compat import upgrade_state_dict
from andromeda.model.config import ModelConfig
from andromeda.train import checkpoint as ckpt

__all__ = ["save_sharded", "load_training_state", "load_sharded_weights", "check_resume", "is_sharded",
           "sharded_damage"]


# ----- reading DCP files without running code --------------------------------------------------

class _MetadataUnpickler(pickle.Unpickler):
    """Only the plain data classes DCP's metadata is made of."""

    _MODULES = ("torch.distributed.checkpoint.", "collections", "torch.utils._pytree")

    def find_class(self, module, name):
        if module.startswith(self._MODULES) or (module == "torch" and name in _TORCH_NAMES) \
                or (module, name) in _OTHER_NAMES:
            return super().find_class(module, name)
        raise UserError(f"refusing to load {module}.{name} from a checkpoint's metadata")


_OTHER_NAMES = {("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")} | {
    ("builtins", name) for name in ("set", "frozenset", "slice", "tuple", "list", "dict")}
_TORCH_NAMES = {"Size", "strided", "sparse_coo", "contiguous_format", "preserve_format", "channels_last"} | {
    str(d).removeprefix("torch.") for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                            torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                            torch.bool, torch.complex64)}


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._nested_dict import set_element  # DCP's own helper
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def sharded_damage(folder: Path) -> Optional[str]:
    """Why the sharded step folder `folder` cannot be read, or None when its metadata loads and
    every shard file it names holds the bytes the metadata places in it (a truncated copy fails)."""
    shards = Path(folder) / SHARDED
    try:
        metadata = _SafeReader(shards).read_metadata()
    except Exception as e:
        return f"{shards / '.metadata'}: {e}"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = shards / name
        have = path.stat().st_size if path.exists() else None
        if have is None or have < size:
            return f"{path}: {'missing' if have is None else f'{have} bytes, the metadata needs {size}'}"
    return None


def _dcp_load(state: dict, folder: Path, no_dist: bool = False) -> None:
    reader = _SafeReader(Path(folder) / SHARDED)
    try:
        reader.read_metadata()  # first here, so a bad file is one clear line, not DCP's fallback traces
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read {Path(folder) / SHARDED / '.metadata'}: {e}") from None
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=_SafePlanner(),
                     no_dist=no_dist)
    except UserError:
        raise
    except (Exception, CheckpointException) as e:  # DCP gathers per-rank failures in a BaseException
        raise UserError(f"cannot read the sharded checkpoint {folder}: {str(e).splitlines()[0][:300]}") from None


# ----- saving ----------------------------------------------------------------------------------

def save_sharded(run_dir: Path, step: int, model, optimizer, tokenizer, meta: dict, state: dict,
                 is_best: bool, keep_last: int, info) -> Path:
    """Write checkpoints/step_N as shards from every rank (collective), then move the pointers
    and prune on rank 0. A failed write raises UserError on every rank and leaves the previous
    checkpoints as they were."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dest = ckpt.step_dir(run_dir, step)
    tmp: Optional[str] = None
    if info.main:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    box = [tmp]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    model_state, optim_state = get_state_dict(model, optimizer)
    failure: Optional[str] = None
    try:  # DCP gathers every rank's write errors and raises them on all ranks alike
        dcp.save({"model": model_state, "optim": optim_state},
                 storage_writer=FileSystemWriter(tmp / SHARDED, sync_files=True))
    except (Exception, CheckpointException) as e:
        failure = _reason(e)
    if info.main and failure is None:
        try:
            write_config_files(tmp, model.cfg, tokenizer, dict(meta, sharded=True))
            torch.save(state, tmp / ckpt.STATE)
            publish_folder(tmp, dest)
        except Exception as e:
            failure = _reason(e)
    box = [failure]
    dist.broadcast_object_list(box, src=0)  # rank 0's own failure reaches every rank: none waits
    if box[0] is not None or failure is not None:
        if info.main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = ckpt.newest_checkpoint(run_dir)
        kept = f"; the last good checkpoint is {previous}" if previous else ""
        raise UserError(f"step {step}: could not write checkpoint {dest}: {box[0] or failure}{kept}")
    if info.main:
        ckpt.point(run_dir, "latest", dest)
        if is_best:
            ckpt.point(run_dir, "best", dest)
        ckpt.prune(run_dir, keep_last)
    dist.barrier()  # no rank reads or prunes past a checkpoint before it exists
    return dest


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    for line in str(e).splitlines()[::-1]:  # DCP puts the root cause last, after tracebacks
        if line.strip():
            return line.strip()[:300]
    return type(e).__name__


# ----- loading ---------------------------------------------------------------------------------

def load_training_state(folder: Path, model, optimizer, state: dict) -> None:
    """Weights and optimizer state of checkpoint `folder` into `model` (plain, DDP or FSDP) and
    `optimizer`. A sharded checkpoint is resharded to this world by DCP; an ordinary one (one
    process or DDP) is given whole to every rank, which keeps its own shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    folder = Path(folder)
    if is_sharded(folder):
        model_state, optim_state = get_state_dict(model, optimizer)  # this world's layout, to fill
        wanted = {"model": model_state, "optim": optim_state}
        _dcp_load(wanted, folder)
        set_state_dict(model, optimizer, model_state_dict=wanted["model"], optim_state_dict=wanted["optim"])
        return
    config = state["config"]["model"]
    weights = upgrade_state_dict(load_file(str(folder / WEIGHTS)), config)
    if model.cfg.tie_embeddings:
        weights["head.weight"] = weights["embed.weight"]
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict=_optimizer_by_name(state["optimizer"], model, optimizer),
                   options=StateDictOptions(full_state_dict=True))


def _optimizer_by_name(saved: dict, model, optimizer) -> dict:
    """An ordinary optimizer state dict (parameters numbered in param_groups order) keyed by
    parameter name instead, the form set_state_dict takes. The optimizer here was built by the
    same param_groups rule over the same names, so position i is the same parameter."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    flat = [i for group in saved["param_groups"] for i in group["params"]]
    if len(flat) != len(order):
        raise UserError(f"the checkpoint's optimizer holds {len(flat)} parameters, this model {len(order)}")
    by_index = dict(zip(flat, order))
    return {"state": {by_index[i]: s for i, s in saved["state"].items()},
            "param_groups": [dict(g, params=[by_index[i] for i in g["params"]]) for g in saved["param_groups"]]}


def load_sharded_weights(folder: Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The full (float32) weights of a sharded checkpoint, read in this one process."""
    from andromeda.model.transformer import build_model

    model = build_model(model_cfg, device="meta").to_empty(device="cpu")
    wanted = {"model": model.state_dict()}
    _dcp_load(wanted, folder, no_dist=True)
    return wanted["model"]


# ----- resuming at another world size ----------------------------------------------------------

def check_resume(folder: Path, model_cfg: ModelConfig, train_cfg, world: int) -> None:
    """Refuse a resume under another model config, or one whose global batch (batch_size x
    grad_accum x world) differs from the checkpoint's; say which `--set` keeps it. Reads only
    config.json, so it runs before anything is written."""
    from andromeda.train.trainer import _dict_diff

    config = read_config(folder)
    saved = ModelConfig.from_dict(config["model"]).to_dict()
    if saved != model_cfg.to_dict():
        raise UserError(f"cannot resume from {folder}: it was trained with another model config "
                        f"({_dict_diff(saved, model_cfg.to_dict())}); use the same --preset/--config/--set "
                        "or a new --out")
    meta = config.get("meta") or {}
    if "world" not in meta or "train" not in meta:
        return  # written before the world size was recorded
    old_world, old = int(meta["world"]), meta["train"]
    was = old["batch_size"] * old["grad_accum"] * old_world
    now = train_cfg.batch_size * train_cfg.grad_accum * world
    if was == now:
        return
    trained = (f"the run was trained with a global batch of {was} ({old_world} rank(s) x batch_size "
               f"{old['batch_size']} x grad_accum {old['grad_accum']})")
    if was % world:
        raise UserError(f"cannot resume {folder} on {world} rank(s): {trained}, which {world} ranks cannot "
                        "share evenly; resume on a world size that divides it, or start a new --out")
    per_rank = was // world
    if per_rank % train_cfg.batch_size == 0:
        keep = f"--set train.grad_accum={per_rank // train_cfg.batch_size}"
    elif per_rank % train_cfg.grad_accum == 0:
        keep = f"--set train.batch_size={per_rank // train_cfg.grad_accum}"
    else:
        keep = f"--set train.batch_size={per_rank} --set train.grad_accum=1"
    raise UserError(f"cannot resume {folder} on {world} rank(s) with batch_size {train_cfg.batch_size} x "
                    f"grad_accum {train_cfg.grad_accum} (global batch {now}): {trained}; add {keep} to keep it")

"""Checkpoint folders: `config.json` + `model.safetensors` + tokenizer files [+ training state].

    config.json        {"format": "andromeda", "version": 1, "model": {...}, "tokenizer": {...}, "meta": {...}}
    model.safetensors  weights (tied head weight stored once, under embed.weight)
    tokenizer.json     for Hugging Face tokenizers
    train_state.pt     optional; written by the trainer, loaded with weights_only=True
    sharded/           instead of model.safetensors in checkpoints of FSDP training: weights and
                       optimizer state as torch.distributed.checkpoint shards (see
                       andromeda.train.distributed_checkpoint); `load_checkpoint` reads them too

`save_checkpoint` writes into a temporary sibling folder and renames it into place, so a
crash leaves either the previous folder or the complete new one. Weights never go through
pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from andromeda.data.tokenizer import Tokenizer, load_tokenizer
from andromeda.errors import UserError
from andromeda.jsonfile import read_json
from andromeda.model.compat import upgrade_state_dict
from andromeda.model.config import ModelConfig
from andromeda.model.transformer import Transformer, build_model

FORMAT = "andromeda"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SHARDED = "sharded"  # folder of torch.distributed.checkpoint files, instead of WEIGHTS


def _state_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_checkpoint_files(folder: Path, model: Transformer, tokenizer: Optional[Tokenizer],
                           meta: Optional[dict] = None, weights_name: str = WEIGHTS) -> None:
    """Write config, weights (as `weights_name`) and tokenizer into an existing (temporary) folder."""
    folder = Path(folder)
    save_file(_state_for_saving(model), str(folder / weights_name), metadata={"format": "pt"})
    write_config_files(folder, model.cfg, tokenizer, meta)


def write_config_files(folder: Path, model_cfg: ModelConfig, tokenizer: Optional[Tokenizer],
                       meta: Optional[dict] = None) -> None:
    """Write config.json and the tokenizer files (everything but the weights) into `folder`."""
    config = {"format": FORMAT, "version": VERSION, "model": model_cfg.to_dict(),
              "tokenizer": tokenizer.spec() if tokenizer is not None else None, "meta": meta or {}}
    if tokenizer is not None:
        tokenizer.save(folder)
    (Path(folder) / CONFIG).write_text(json.dumps(config, indent=2))


def atomic_folder_write(dest: Path, fill: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Create `dest` by filling a temporary sibling folder and renaming it into place.

    With overwrite, an existing `dest` is moved aside first and removed only after the new
    folder is in place; if the process dies in between, `dest.old` holds the old contents.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        publish_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def publish_folder(tmp: Path, dest: Path) -> None:
    """Sync the filled temporary folder `tmp` to disk and rename it to `dest` (an existing
    `dest` is moved aside first and removed once the new one is in place)."""
    _fsync_tree(tmp)
    _usual_modes(tmp)
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _usual_modes(folder: Path) -> None:
    """Give the folder and its files the modes a plain create gives under the user's umask:
    mkdtemp makes the folder private and some writers (safetensors) create files 0600, but
    checkpoints are shared artefacts, readable like any other file the user writes."""
    probe = folder / ".mode-probe"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    file_mode = probe.stat().st_mode & 0o777
    probe.unlink()
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r: folders must be searchable
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, dir_mode if path.is_dir() else file_mode)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def save_checkpoint(dest: Path, model: Transformer, tokenizer: Optional[Tokenizer] = None,
                    meta: Optional[dict] = None,
                    extra: Optional[Callable[[Path], None]] = None, weights_name: str = WEIGHTS) -> Path:
    """Atomically write a checkpoint folder; `extra(folder)` may add files (training state)."""
    try:
        def fill(folder: Path) -> None:
            write_checkpoint_files(folder, model, tokenizer, meta, weights_name)
            if extra is not None:
                extra(folder)
        return atomic_folder_write(Path(dest), fill)
    except OSError as e:
        raise UserError(f"could not write checkpoint {dest}: {e.strerror or e}") from None


def is_sharded(folder: Path) -> bool:
    """Whether `folder` holds its weights as torch.distributed.checkpoint shards (FSDP runs)."""
    return (Path(folder) / SHARDED / ".metadata").exists()


def checkpoint_folder(path: Path) -> Path:
    """`path` itself, or, for a training run folder (no config.json of its own), the
    checkpoint its `checkpoints/latest` points to."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if not (path / CONFIG).exists() and (latest / CONFIG).exists():
        return latest.resolve()  # the step folder itself: `latest` moves as training goes on
    return path


def read_config(folder: Path) -> dict:
    folder = checkpoint_folder(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder not found: {folder}")
    path = folder / CONFIG
    if not path.exists():
        raise UserError(f"{folder} is not an andromeda checkpoint (no {CONFIG}) nor a training run "
                        "folder with checkpoints/latest")
    config = read_json(path, "checkpoint config")
    if config.get("format") != FORMAT:
        raise UserError(f"{path} is not an andromeda checkpoint config (format={config.get('format')!r}); "
                        "for a Hugging Face folder run `andromeda convert --from-hf`")
    return config


def load_checkpoint(folder: Path, device=None, dtype=None) -> tuple[Transformer, Optional[Tokenizer], dict]:
    """Load (model in eval mode, tokenizer or None, config dict) from a checkpoint folder.
    Weights keep their stored dtype unless `dtype` is given."""
    folder = checkpoint_folder(folder)
    config = read_config(folder)
    cfg = ModelConfig.from_dict(config["model"])
    weights = folder / WEIGHTS
    if not weights.exists() and (folder / "model.packed.safetensors").exists():
        # A BitNet model exported with 2-bit ternary weights: run it from the packed form.
        from andromeda.quant.bitpack import load_packed
        return load_packed(folder, device=device or "cpu")
    if not weights.exists() and not is_sharded(folder):
        raise UserError(f"checkpoint {folder} has no {WEIGHTS}")
    if config.get("quantization"):  # int8 / int4 weights written by `andromeda quantize`
        from andromeda.quant.quantize import load_quantized
        model = load_quantized(folder, config, device=device or "cpu", dtype=dtype)
        tok_spec = config.get("tokenizer")
        tokenizer = load_tokenizer(tok_spec, folder) if tok_spec else None
        if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
        return model, tokenizer, config
    if is_sharded(folder):  # written by FSDP training: torch.distributed.checkpoint shards
        from andromeda.train.distributed_checkpoint import load_sharded_weights
        state = load_sharded_weights(folder, cfg)
    else:
        try:
            state = load_file(str(weights), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read {weights}: {e}") from None
    state = upgrade_state_dict(state, config["model"])  # older format versions named tensors otherwise
    model = build_model(cfg, device="meta")
    stored = [t.dtype for t in state.values() if t.is_floating_point()]
    # Keep the stored precision unless asked otherwise (a bf16 checkpoint loads as bf16).
    model = model.to(dtype or (max(set(stored), key=stored.count) if stored else torch.float32))
    load_weights(model, state, str(weights), device=device or "cpu")
    tok_spec = config.get("tokenizer")
    tokenizer = load_tokenizer(tok_spec, folder) if tok_spec else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
    return model.eval(), tokenizer, config


def load_weights(model: Transformer, state: dict[str, torch.Tensor], source: str, device="cpu") -> None:
    """Load a full state dict into a model built on the meta device, with errors that name
    the tensor; derived buffers (rotary tables, ALiBi slopes) are recomputed on `device`."""
    expected = model.state_dict()
    if model.cfg.tie_embeddings:
        expected.pop("head.weight", None)
        state = {k: v for k, v in state.items() if k != "head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source} does not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                            f"config expects {tuple(expected[name].shape)}")
    model.to_empty(device=device)
    model.load_state_dict(state, strict=False)
    if model.cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    model.reset_derived_buffers()

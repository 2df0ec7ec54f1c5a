"""Run folders and training checkpoints.

A run folder holds

    run_config.json                 the resolved model + training config of the run
    metrics.jsonl                   see metrics.py
    checkpoints/step_0000500/       load_checkpoint folders, plus train_state.pt
    checkpoints/latest -> step_...  symlinks, replaced atomically (os.replace)
    checkpoints/best   -> step_...

Offers `save_step(...)`, `newest_checkpoint(run_dir)`, `load_train_state(folder)`,
`capture_rng()` / `restore_rng(state)`, `prune(run_dir, keep_last)` and `clean_partial`.

Crash safety: a step folder appears only complete (andromeda.checkpoint writes a temporary
folder and renames it); pointers move only after their target exists; old folders are
removed only after the pointers have moved away from them. So at any instant `latest` names
a complete checkpoint, and resuming takes the newest complete step folder.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from andromeda.checkpoint import save_checkpoint
from andromeda.errors import UserError

CHECKPOINTS = "checkpoints"
STATE = "train_state.pt"
RUN_CONFIG = "run_config.json"
_STEP = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:07d}"


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step folders (they hold a training state), oldest first."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _STEP.match(path.name)
        if match and not path.is_symlink() and (path / STATE).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = step_checkpoints(run_dir)
    return found[-1][1] if found else None


def clean_partial(run_dir: Path) -> None:
    """Remove temporary folders and pointers left by a process killed mid-save."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(".") and (".tmp" in path.name):
            if path.is_symlink() or path.is_file():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)


def point(run_dir: Path, name: str, target: Path) -> None:
    """Make checkpoints/<name> a relative symlink to `target`, replacing it atomically."""
    link = checkpoints_dir(run_dir) / name
    tmp = link.with_name(f".{name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(target).name, tmp)
    os.replace(tmp, link)


def pointer_target(run_dir: Path, name: str) -> Optional[Path]:
    link = checkpoints_dir(run_dir) / name
    if not link.is_symlink():
        return None
    return checkpoints_dir(run_dir) / os.readlink(link)


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step folders and whatever `best` and `latest` point to."""
    found = step_checkpoints(run_dir)
    protected = {pointer_target(run_dir, "best"), pointer_target(run_dir, "latest")}
    for _, path in found[:-keep_last]:
        if path not in protected:
            shutil.rmtree(path, ignore_errors=True)


def save_step(run_dir: Path, step: int, model, tokenizer, meta: dict, state: dict, is_best: bool,
              keep_last: int) -> Path:
    """Write checkpoints/step_N (weights, tokenizer, config, train_state.pt), move the
    pointers, drop old folders. A failed write (full disk) raises UserError and leaves the
    previous checkpoints and pointers as they were."""
    dest = step_dir(run_dir, step)
    try:
        save_checkpoint(dest, model, tokenizer, meta, extra=lambda folder: torch.save(state, folder / STATE))
    except UserError as e:
        previous = newest_checkpoint(run_dir)
        kept = f"; the last good checkpoint is {previous}" if previous else ""
        raise UserError(f"step {step}: {e}{kept}") from None
    point(run_dir, "latest", dest)
    if is_best:
        point(run_dir, "best", dest)
    prune(run_dir, keep_last)
    return dest


def load_train_state(folder: Path) -> dict:
    path = Path(folder) / STATE
    if not path.exists():
        raise UserError(f"{folder} has no {STATE}; it is not a training checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise UserError(f"cannot read {path}: {e}") from None


def capture_rng() -> dict:
    """Every random state a training step can draw from, in types weights_only loads."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

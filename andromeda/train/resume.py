"""Choosing the checkpoint a `--resume` continues from.

Offers `resume_point(run_dir) -> Path | None`: the newest step folder whose files are intact. A step
folder whose weights or training state are damaged (a truncated copy, a disk that filled
up behind the program's back) is skipped with a message that names the damaged file; when
no intact folder is left, a one-line UserError names what was found. Checking reads the
safetensors header (which covers the file's length), or for a sharded (FSDP) folder the DCP
metadata and the length of every shard file it names, and the training state's zip index and
checksums, so the damaged file never reaches the loader's traceback.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Optional

from andromeda.checkpoint import WEIGHTS, is_sharded
from andromeda.errors import UserError
from andromeda.train import checkpoint as ckpt


def damage(folder: Path) -> Optional[str]:
    """Why the step checkpoint `folder` cannot be resumed from, or None when it is intact."""
    from safetensors import safe_open

    if is_sharded(folder):  # an FSDP run's step folder: DCP shards instead of one weights file
        from andromeda.train.distributed_checkpoint import sharded_damage
        why = sharded_damage(folder)
        if why is not None:
            return why
    else:
        weights = Path(folder) / WEIGHTS
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for damaged files
            return f"{weights}: {e}"
    state = Path(folder) / ckpt.STATE
    try:
        with zipfile.ZipFile(state) as z:  # torch.save writes a zip archive
            bad = z.testzip()
        if bad is not None:
            return f"{state}: member {bad} fails its checksum"
    except (OSError, zipfile.BadZipFile) as e:
        return f"{state}: {e}"
    return None


def resume_point(run_dir: Path) -> Optional[Path]:
    """The newest intact step checkpoint of `run_dir` (see the module docstring); None when
    the folder holds no step checkpoint at all."""
    found = ckpt.step_checkpoints(run_dir)
    if not found:
        return None
    damaged = []
    for _, folder in reversed(found):
        why = damage(folder)
        if why is None:
            if damaged:
                print(f"andromeda: skipping damaged checkpoint{'s' if len(damaged) > 1 else ''} "
                      f"({'; '.join(damaged)}); resuming from the newest intact one, {folder.name}",
                      file=sys.stderr, flush=True)
            return folder
        damaged.append(why)
    raise UserError(f"cannot resume: every checkpoint in {ckpt.checkpoints_dir(run_dir)} is damaged "
                    f"(newest: {damaged[0]})")

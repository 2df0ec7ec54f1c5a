"""Turn a sharded checkpoint (written by FSDP training) into an ordinary one: config.json,
model.safetensors (float32, as trained) and the tokenizer, readable without torch.distributed
and by every tool that takes a checkpoint. The training state (optimizer, RNG, data
position) is left behind: resume from the sharded folder itself.

  andromeda consolidate runs/big --out ckpt/big             (the run's checkpoints/latest)
  andromeda consolidate runs/big/checkpoints/step_0005000 --out ckpt/big --json

eval, generate and convert read sharded checkpoints directly; this command is for sharing
or archiving a model as one file.
"""

from __future__ import annotations

import json
from pathlib import Path

from andromeda.checkpoint import checkpoint_folder, is_sharded, load_checkpoint, save_checkpoint
from andromeda.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="a sharded checkpoint folder, or a run folder (its checkpoints/latest)")
    p.add_argument("--out", required=True, metavar="DIR", help="the ordinary checkpoint folder to write")
    p.add_argument("--json", action="store_true", help="print {\"out\", \"parameters\", \"step\"} as JSON")


def consolidate(ckpt: Path, out: Path) -> dict:
    source = checkpoint_folder(Path(ckpt))
    if not is_sharded(source):
        raise UserError(f"{source} is not a sharded checkpoint (no sharded/.metadata); it can be used as it is")
    if Path(out).resolve() == source.resolve():
        raise UserError("--out must differ from the checkpoint it consolidates")
    model, tokenizer, config = load_checkpoint(source)
    meta = {k: v for k, v in (config.get("meta") or {}).items() if k != "sharded"}
    meta["consolidated_from"] = str(source)
    save_checkpoint(Path(out), model, tokenizer, meta)
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"out": str(out), "parameters": parameters, "step": meta.get("step")}


def run(args) -> int:
    result = consolidate(Path(args.ckpt), Path(args.out))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {result['out']} ({result['parameters']:,} parameters, step {result['step']})")
    return 0

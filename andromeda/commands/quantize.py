"""Quantise a checkpoint's weights to int8 or int4 and write a new checkpoint that generate,
chat and eval load as they load any other.

  --bits 8   one int8 scale per output channel (about 1/4 of the float32 size)
  --bits 4   two int4 codes a byte, one scale per --group-size input features (32, 64, 128)

Linear layers take the scheme; the output head is int8 in both schemes and the token embedding
int8 per row (docs/quantization.md measures the alternatives). Decoding reads the quantised
bytes; it is fastest with `generate --compile`.

examples:
  andromeda quantize --ckpt runs/shk --out ckpt/shk-int8 --bits 8
  andromeda quantize --ckpt ckpt/model --out ckpt/model-int4 --bits 4 --group-size 64 --json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from andromeda.checkpoint import checkpoint_folder, load_checkpoint, read_config
from andromeda.errors import UserError
from andromeda.quant.quantize import check_scheme, quantize_model, save_quantized, scheme_of


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="float checkpoint folder (or a training run folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="the quantised checkpoint folder to write")
    p.add_argument("--bits", type=int, required=True, metavar="8|4", help="8: per-channel int8; 4: group-wise int4")
    p.add_argument("--group-size", type=int, default=None, metavar="32|64|128",
                   help="input features per int4 scale (default 32; --bits 4 only)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the scheme and the sizes as JSON")


def _weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers(recurse=True)):
        if id(t) not in seen and not t.is_meta:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def run(args) -> int:
    group_size = args.group_size if args.group_size is not None or args.bits != 4 else 32
    check_scheme(args.bits, group_size)
    source = checkpoint_folder(Path(args.ckpt))
    config = read_config(source)
    if scheme_of(config) or (source / "model.packed.safetensors").exists():
        raise UserError(f"{source} is already quantised ({(scheme_of(config) or {}).get('scheme', 'bitnet-2bit')}); "
                        "quantise its float checkpoint instead")
    out = Path(args.out)
    if out.exists() and out.resolve() == source.resolve():
        raise UserError("--out must differ from --ckpt")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    model, tokenizer, config = load_checkpoint(source, device="cpu", dtype=torch.float32)
    float_bytes = _weight_bytes(model)
    scheme = quantize_model(model, args.bits, group_size)
    meta = dict(config.get("meta") or {}, quantized_from=str(source))
    save_quantized(out, model, tokenizer, scheme, meta, overwrite=args.overwrite)
    report = dict(scheme, out=str(out), float32_bytes=float_bytes, quantized_bytes=_weight_bytes(model))
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {out}: {scheme['scheme']}" + (f" (groups of {group_size})" if args.bits == 4 else "")
              + f", weights {float_bytes / 2**20:.1f} MiB -> {report['quantized_bytes'] / 2**20:.1f} MiB")
    return 0

"""List the named model configurations with their total and active parameter counts.

Models are built on the meta device, so even the 15B preset is sized without memory.
"""

from __future__ import annotations

import json
import sys

from andromeda.model.plan import describe as describe_plan
from andromeda.model.transformer import build_model, count_parameters
from andromeda.presets import PRESETS, get_preset


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--show", metavar="NAME", help="print one preset's resolved config as JSON (layer plan on stderr)")


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run(args) -> int:
    if args.show:
        cfg = get_preset(args.show)
        print(cfg.to_json())
        if not args.json:  # the layer plan the layout patterns expand into, for people to read
            print("layer plan (mixer + ffn [routing]):", *describe_plan(cfg), sep="\n", file=sys.stderr)
        return 0
    rows = []
    for name, (description, _) in PRESETS.items():
        cfg = get_preset(name)
        total, active = count_parameters(build_model(cfg, device="meta"))
        rows.append({"name": name, "total_params": total, "active_params": active,
                     "dim": cfg.dim, "depth": cfg.depth, "heads": cfg.attention.heads,
                     "kv_heads": cfg.attention.kv_heads, "vocab_size": cfg.vocab_size,
                     "max_seq_len": cfg.max_seq_len, "description": description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<22}{'total':>10}{'active':>10}  {'dim':>5} {'depth':>5} {'heads':>5} {'kv':>3}  description")
    for r in rows:
        print(f"{r['name']:<22}{_human(r['total_params']):>10}{_human(r['active_params']):>10}  "
              f"{r['dim']:>5} {r['depth']:>5} {r['heads']:>5} {r['kv_heads']:>3}  {r['description']}")
    return 0

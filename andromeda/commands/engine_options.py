"""Options shared by the commands that run the generation engine (generate, chat).

Offers `add_sampling_arguments(parser)`, `sampling_params(args) -> SamplingParams` and
`build_engine(args) -> Engine` (the checkpoint, and a draft for speculative decoding).
"""

from __future__ import annotations

import sys
from pathlib import Path

from andromeda.devices import resolve_device, resolve_dtype
from andromeda.errors import UserError
from andromeda.infer.sampling import SamplingParams


def add_sampling_arguments(p) -> None:
    """Options shared by `generate` and `chat`."""
    p.add_argument("--ckpt", required=True, help="checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop when the text contains STRING (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--draft", metavar="CKPT", help="draft checkpoint for speculative decoding")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step (CUDA graphs on GPU, fused one-row products on CPU); "
                        "the first steps wait for compilation, so it pays off for long generations")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill long prompts in chunks of this many tokens")
    p.add_argument("--truncate", action="store_true",
                   help="keep the last tokens of a prompt that does not fit, leaving room for --max-new-tokens "
                        "(at most half the context)")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          stop=tuple(args.stop), seed=args.seed)


def build_engine(args):
    """Load the checkpoint (and draft) named by the arguments into an Engine."""
    from andromeda.checkpoint import load_checkpoint
    from andromeda.infer.engine import Engine

    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    if args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer, config = load_checkpoint(Path(args.ckpt))
    if tokenizer is None:
        raise UserError(f"checkpoint {args.ckpt} has no tokenizer; text generation needs one")
    draft = None
    if args.draft:
        draft, _, draft_config = load_checkpoint(Path(args.draft))
        if draft_config.get("tokenizer") != config.get("tokenizer"):
            raise UserError(f"draft {args.draft} does not share the tokenizer of {args.ckpt}")
    if args.compile:
        # The first decode step of each cache size compiles: say why the output pauses.
        print("andromeda: --compile: the first tokens wait for compilation (seconds on GPU, "
              "tens of seconds on a small CPU); later steps run the compiled graph", file=sys.stderr)
    return Engine(model, tokenizer, device=device, dtype=dtype, compile=args.compile, draft=draft,
                  draft_tokens=args.draft_tokens, prefill_chunk=args.prefill_chunk, truncate_prompt=args.truncate)

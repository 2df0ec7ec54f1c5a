"""Generate text from a checkpoint, streaming it to the terminal.

The prompt comes from --prompt, --prompt-file, or standard input when neither is given.
Temperature 0 is greedy decoding. With --draft, a smaller checkpoint that shares the
tokenizer proposes tokens for speculative decoding (same output distribution, fewer target
forwards). --json prints {"text", "prompt_tokens", "new_tokens", "prefill_ms",
"decode_tokens_per_s", "finish_reason"} (a list with --num-samples > 1) instead of streaming.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from andromeda.devices import resolve_device
from andromeda.errors import UserError
from andromeda.infer.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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


def add_arguments(p) -> None:
    add_sampling_arguments(p)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print results as JSON instead of streaming")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


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


def read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give either --prompt or --prompt-file, not both")
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read prompt file {args.prompt_file}: {e}") from None
    else:
        if sys.stdin.isatty():
            print("reading the prompt from standard input (end with Ctrl-D)", file=sys.stderr)
        text = sys.stdin.read()
    if not text.strip():
        raise UserError("the prompt is empty")
    return text


def report_capped_budget(engine, prompt: str, params: SamplingParams) -> None:
    """Say on stderr when fewer new tokens than asked for fit in the model's context."""
    used = len(engine.encode(prompt, room=params.max_new_tokens))
    fits = engine.max_seq_len - used
    if params.max_new_tokens > fits:
        print(f"andromeda: --max-new-tokens {params.max_new_tokens} capped to {fits}: the prompt takes {used} "
              f"of the model's {engine.max_seq_len} positions", file=sys.stderr)


def run(args) -> int:
    params = sampling_params(args)  # check the numbers before loading anything
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    prompt = read_prompt(args)
    engine = build_engine(args)
    report_capped_budget(engine, prompt, params)
    prompts = [prompt] * args.num_samples
    if args.json:
        results = engine.generate(prompts, params)
        out = [r.to_json() for r in results]
        print(json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False))
        return 0
    if args.num_samples == 1:
        result = None
        for event in engine.stream(prompts, params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            result = event.result or result
        results = [result]
        sys.stdout.write("\n")
    else:  # several samples decode together; print each as a block when all are done
        results = engine.generate(prompts, params)
        for i, r in enumerate(results):
            print(f"--- sample {i + 1} ---")
            print(r.text)
    for r in results:
        extra = f", draft acceptance {r.acceptance_rate:.0%}" if r.acceptance_rate is not None else ""
        print(f"[{r.prompt_tokens} prompt tokens, {r.new_tokens} new ({r.finish_reason}), prefill "
              f"{r.prefill_ms:.1f} ms, {r.decode_tokens_per_s:.1f} tokens/s{extra}]", file=sys.stderr)
    return 0

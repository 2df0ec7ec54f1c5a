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

from andromeda.commands.engine_options import add_sampling_arguments, build_engine, sampling_params
from andromeda.errors import UserError
from andromeda.infer.sampling import SamplingParams


def add_arguments(p) -> None:
    add_sampling_arguments(p)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print results as JSON instead of streaming")


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

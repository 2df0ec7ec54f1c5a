"""Andromeda checkpoints as a model of EleutherAI's lm-evaluation-harness (the `lm_eval` extra).

Importing this module registers the model name `andromeda` with the harness. The harness's own
`lm_eval` script has no hook that imports third-party models, so the command line is this
module, which registers the model and then hands every argument to the harness unchanged:

    python -m andromeda.interop.lm_eval --model andromeda --model_args ckpt=DIR --tasks hellaswag
    python -m andromeda.interop.lm_eval --model andromeda --model_args ckpt=DIR,max_length=1024 \
        --tasks my_task --include_path tasks/ --batch_size 8 --device cpu

From Python: `import andromeda.interop.lm_eval` then `lm_eval.simple_evaluate(model="andromeda",
model_args="ckpt=DIR", tasks=[...])`.

`AndromedaLM` implements the harness's three request types on the model and tokenizer of a
checkpoint: loglikelihood (batched forward passes, longest first, right-padded: a causal model's
scores at a position do not depend on later positions), rolling loglikelihood (the harness's
disjoint windows of `max_length` tokens after the document-start token, which is exactly what
`andromeda eval --seq-len max_length` scores), and generate_until (the generation engine,
one batch per group of equal generation settings, stop strings honoured). The request
bookkeeping (context/continuation splitting, rolling windows) is the harness's own; only the
scoring is written here.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F

from andromeda.errors import UserError

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - the extra is not installed
    raise UserError("the evaluation harness is not installed: pip install 'andromeda[lm_eval]'") from None


@register_model("andromeda")
class AndromedaLM(TemplateLM):
    """`--model_args ckpt=DIR[,max_length=N][,dtype=bfloat16]`; the harness adds batch_size and device."""

    def __init__(self, ckpt: Optional[str] = None, device: Optional[str] = None, batch_size=1,
                 max_length: Optional[int] = None, dtype: Optional[str] = None, max_batch_size=None, **unused):
        super().__init__()
        from andromeda.checkpoint import load_checkpoint
        from andromeda.devices import resolve_device

        if not ckpt:
            raise UserError("--model_args needs ckpt=DIR (a checkpoint or run folder)")
        if unused:
            raise UserError(f"unknown --model_args for andromeda: {', '.join(sorted(unused))} "
                            f"(known: ckpt, max_length, dtype)")
        self._device = resolve_device(device)
        if dtype not in (None, "float32", "bfloat16", "float16"):
            raise UserError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.model, self.tokenizer, _ = load_checkpoint(ckpt, device=self._device, dtype=torch_dtype)
        self.model.eval()
        if self.tokenizer is None:
            raise UserError(f"checkpoint {ckpt} has no tokenizer; the harness scores text")
        if str(batch_size).startswith("auto"):
            raise UserError("batch_size=auto is not supported for andromeda; give a number")
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length) if max_length else self.model.cfg.max_seq_len
        tok = self.tokenizer
        # The token before a document: BOS where the tokenizer adds one, else EOS (as in `andromeda eval`).
        self._prefix = tok.bos_id if tok.add_bos and tok.bos_id is not None else tok.eos_id
        if self._prefix is None:
            raise UserError("the checkpoint's tokenizer has neither BOS nor EOS; rolling scores need one")

    # ------------------------------------------------------------------ harness interface
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self._prefix

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode_prompt(string) if add_special_tokens else self.tokenizer.encode(string)

    def tok_decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(list(ids))

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        """(log P(continuation | context), whether greedy decoding would produce it) per request."""
        batch_size = override_bs or self.batch_size
        # Longest first, so each batch pads little and the first batch shows the peak memory.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list = [None] * len(requests)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            inputs, conts = [], []
            for i in rows:
                _, context, continuation = requests[i]
                if not continuation:
                    raise UserError("a loglikelihood request has an empty continuation")
                # The last max_length + 1 tokens: the model's context, then what it predicts.
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                inputs.append(whole[:-1])
                conts.append(whole[-min(len(continuation), len(whole) - 1):])
            width = max(len(x) for x in inputs)
            x = torch.zeros(len(rows), width, dtype=torch.long)
            for r, ids in enumerate(inputs):
                x[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs = F.log_softmax(self.model(x.to(self._device)).float(), dim=-1)
            for r, i in enumerate(rows):
                n, cont = len(inputs[r]), conts[r]
                lp = logprobs[r, n - len(cont):n]
                target = torch.tensor(cont, device=lp.device)
                total = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in the harness's disjoint windows of max_length tokens."""
        windows, owners = [], []
        for index, req in enumerate(requests):
            (text,) = req.args
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + window)
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from andromeda.infer.engine import Engine

        engine = Engine(self.model, self.tokenizer, device=self._device, truncate_prompt=True)
        groups: dict = {}
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            params = _sampling_params(dict(gen_kwargs))
            groups.setdefault(repr(params), (params, []))[1].append((index, context))
        outputs: list = [None] * len(requests)
        for params, items in groups.values():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                results = engine.generate([context for _, context in chunk], params)
                for (index, context), result in zip(chunk, results):
                    outputs[index] = result.text
                    self.cache_hook.add_partial("generate_until", (context, requests[index].args[1]), result.text)
        return outputs


def _sampling_params(kwargs: dict):
    """The harness's gen_kwargs (until, max_gen_toks, do_sample, temperature, top_p, top_k) as SamplingParams."""
    from andromeda.infer.sampling import SamplingParams

    until = kwargs.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    max_new = int(kwargs.pop("max_gen_toks", 256))
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0))
    if not do_sample:
        temperature = 0.0
    return SamplingParams(max_new_tokens=max_new, temperature=temperature,
                          top_p=float(kwargs.pop("top_p", 1.0) or 1.0), top_k=kwargs.pop("top_k", None),
                          stop=tuple(s for s in until if s), seed=kwargs.pop("seed", None))


def main(argv: Optional[list[str]] = None) -> int:
    """The harness's command line with `andromeda` registered; unknown tasks are a one-line error."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    old = sys.argv
    sys.argv = ["lm_eval"] + argv
    try:
        cli_evaluate()
    except UserError as e:
        print(f"lm_eval: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lm_eval: error: {first}", file=sys.stderr)
        return 2
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    sys.exit(main())

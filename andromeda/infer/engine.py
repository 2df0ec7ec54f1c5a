"""The generation engine: the Python API behind `andromeda generate` and `andromeda chat`.

- `Engine(model, tokenizer, device, dtype, compile=False, draft=None)`:
  `generate(prompts, params) -> list[GenerationResult]` and `stream(prompts, params)`, an
  iterator of `StreamEvent`s (text pieces as they become final, then each sequence's result).
- `prepare_model(model, device, dtype, compiled)`: move a model for inference (eval mode,
  derived tables kept in float32, decode-friendly linears on CPU: `cpu_linears`).
- `GenerationResult`: text, token ids, counts, finish reason ('eos', 'stop', 'length'),
  prefill time and decode speed (and the draft acceptance rate with speculative decoding).

How a batch runs: each prompt is prefilled alone (in chunks; prompts of equal length
together) into its own row of one static KV cache, so its numbers do not depend on its
neighbours; then all rows decode together, each at its own position (a (B,) `start_pos`),
with the causal rule masking the cache slots a row has not reached. Rows stop
independently (EOS, stop string, token budget); finished rows idle until the whole batch
is done. Host and device synchronise only when text is needed (streaming, stop strings)
or, without those, every `check_every` steps to look for EOS.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Optional, Sequence, Union

import torch

from andromeda.errors import UserError
from andromeda.infer.cache import batch_rows, reset_recurrent
from andromeda.infer.cpu_linears import prepare_cpu_linears
from andromeda.infer.generate import DecodeStep, TextTracker, prefill
from andromeda.infer.sampling import SamplingParams, logits_to_probs, make_generators, pick
from andromeda.model.layer import reset_derived_buffers

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # 'eos', 'stop' or 'length'
    prefill_ms: float
    decode_tokens_per_s: float
    acceptance_rate: Optional[float] = None  # speculative decoding: accepted / proposed draft tokens
    compile_ms: float = 0.0  # compiling the decode step during this request (not in the decode rate)

    def to_json(self) -> dict:
        out = {"text": self.text, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
               "prefill_ms": round(self.prefill_ms, 3),
               "decode_tokens_per_s": round(self.decode_tokens_per_s, 2), "finish_reason": self.finish_reason}
        if self.acceptance_rate is not None:
            out["acceptance_rate"] = round(self.acceptance_rate, 4)
        if self.compile_ms:
            out["compile_ms"] = round(self.compile_ms, 1)
        return out


@dataclasses.dataclass
class StreamEvent:
    index: int  # which prompt of the request
    text: str  # newly final text (may be empty on the last event)
    result: Optional[GenerationResult] = None  # set on the sequence's last event


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_model(model, device, dtype=None, compiled: bool = False):
    """Move a model for inference. Derived tables (rotary frequencies, ALiBi slopes) are
    recomputed afterwards so they stay float32 whatever the weights' dtype. On CPU, linear
    layers get the weight layout and product that decode fastest in eager or compiled mode
    (`andromeda.infer.cpu_linears`)."""
    model = model.to(device=device, dtype=dtype).eval()
    reset_derived_buffers(model)
    if torch.device(device).type == "cpu":
        prepare_cpu_linears(model, compiled)
    return model


class _Sequence:
    """Host-side bookkeeping of one sequence: ids, text, stop rule, timing."""

    def __init__(self, tokenizer, prompt_len: int, budget: int, params: SamplingParams, eos: Optional[int]):
        self.tracker = TextTracker(tokenizer, params.stop) if tokenizer is not None else None
        self.ids: list[int] = []
        self.prompt_len, self.budget, self.eos = prompt_len, budget, eos
        self.finish_reason: Optional[str] = None
        self.decode_end: Optional[float] = None

    def add(self, token: int) -> str:
        """Take one generated id; return newly final text. Sets finish_reason when done."""
        if self.finish_reason is not None:
            return ""
        if self.eos is not None and token == self.eos:
            self.finish_reason = "eos"
            return ""
        self.ids.append(token)
        piece = self.tracker.add([token]) if self.tracker is not None else ""
        if self.tracker is not None and self.tracker.stopped:
            self.finish_reason = "stop"
        elif len(self.ids) >= self.budget:
            self.finish_reason = "length"
        return piece

    def result(self, prefill_ms: float, decode_start: float, extra_piece: str = "",
               acceptance: Optional[float] = None, compile_s: float = 0.0) -> tuple[str, GenerationResult]:
        tail = self.tracker.flush() if self.tracker is not None else ""
        text = self.tracker.text if self.tracker is not None else ""
        elapsed = max((self.decode_end or time.perf_counter()) - decode_start - compile_s, 1e-9)
        # The first token comes out of the prefill; the decode rate counts the others (and
        # leaves out the time spent compiling the decode step, reported on its own).
        rate = max(len(self.ids) - 1, 0) / elapsed
        return extra_piece + tail, GenerationResult(text, list(self.ids), self.prompt_len, len(self.ids),
                                                    self.finish_reason or "length", prefill_ms, rate, acceptance,
                                                    compile_s * 1000)


class Engine:
    def __init__(self, model, tokenizer=None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, compile: bool = False, prefill_chunk: int = 512,
                 draft=None, draft_tokens: int = 4, truncate_prompt: bool = False, check_every: int = 16):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.dtype = dtype
        self.compile = compile
        self.model = self._prepare(model)
        self.draft = self._prepare(draft) if draft is not None else None
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.draft_tokens = draft_tokens
        self.truncate_prompt = truncate_prompt
        self.check_every = check_every
        self.max_seq_len = model.cfg.max_seq_len
        if self.draft is not None and self.draft.cfg.vocab_size != model.cfg.vocab_size:
            raise UserError(f"the draft model's vocabulary ({self.draft.cfg.vocab_size}) differs from the "
                            f"target's ({model.cfg.vocab_size}); a draft must share the tokenizer")
        self._caches: dict = {}

    def _prepare(self, model):
        return prepare_model(model, self.device, self.dtype, compiled=self.compile)

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: Prompt, room: int = 1) -> list[int]:
        """Token ids of a prompt; with truncate_prompt, only its last tokens, leaving `room`
        positions for new tokens (at most half the context, so that a prompt is never cut to nothing)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError("text prompts need a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode_prompt(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise UserError("the prompt is empty")
        vocab = self.model.cfg.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        keep = self.max_seq_len - max(1, min(room, self.max_seq_len // 2))
        if len(ids) > self.max_seq_len - 1 and not self.truncate_prompt:
            raise UserError(f"the prompt has {len(ids)} tokens but the model's context is {self.max_seq_len}; "
                            "shorten it or pass --truncate (keeps the last tokens)")
        if len(ids) > keep and self.truncate_prompt:
            ids = ids[-keep:]
        return ids

    @property
    def eos_id(self) -> Optional[int]:
        return self.tokenizer.eos_id if self.tokenizer is not None else None

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[GenerationResult]:
        results: list[Optional[GenerationResult]] = [None] * len(prompts)
        for event in self.stream(prompts, params, stream_text=False):
            if event.result is not None:
                results[event.index] = event.result
        return results

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Prompt], params: SamplingParams,
               stream_text: bool = True) -> Iterator[StreamEvent]:
        """Yield StreamEvents; `stream_text=False` skips per-token host synchronisation when
        the caller only wants the final results."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [self.encode(p, room=params.max_new_tokens) for p in prompts]
        if not rows:
            return
        if self.draft is not None:
            from andromeda.infer.speculative import stream_speculative
            for i, ids in enumerate(rows):
                yield from stream_speculative(self, ids, params, index=i)
            return
        yield from self._stream_batch(rows, params, stream_text)

    # ------------------------------------------------------------------ batched decoding
    def _budget(self, prompt_len: int, params: SamplingParams) -> int:
        return max(1, min(params.max_new_tokens, self.max_seq_len - prompt_len))

    def cache_for(self, model, batch: int, max_len: int):
        """A reusable cache (and its decode step) for `batch` rows of `max_len` positions.
        Compiled steps are specialised to the cache's length, so lengths are bucketed to
        powers of two (at least 256): a conversation whose history grows recompiles a
        logarithmic number of times. On GPU each step reads the whole buffer (CUDA graphs);
        on CPU, equal-length batches read only the filled prefix, so the spare room is free."""
        if self.compile:
            max_len = min(max(256, 1 << (max_len - 1).bit_length()), self.max_seq_len)
        key = (id(model), batch, max_len)
        if key not in self._caches:
            if not self.compile:  # eager caches are cheap to remake: keep one per model
                self._caches = {k: v for k, v in self._caches.items() if k[0] != id(model)}
            cache = model.new_cache(batch, max_len, device=self.device)
            self._caches[key] = (cache, DecodeStep(model, cache, compile=self.compile))
        cache, step = self._caches[key]
        reset_recurrent(cache)
        return cache, step

    def _prefill_rows(self, rows: list[list[int]], cache) -> torch.Tensor:
        """Last-token logits (B, V) of every prompt, each written into its own cache row."""
        if len({len(r) for r in rows}) == 1:  # equal lengths: one batched prefill
            ids = torch.tensor(rows, dtype=torch.long, device=self.device)
            return prefill(self.model, ids, cache, 0, self.prefill_chunk)
        out = []
        for b, r in enumerate(rows):
            ids = torch.tensor([r], dtype=torch.long, device=self.device)
            out.append(prefill(self.model, ids, batch_rows(cache, b, b + 1), 0, self.prefill_chunk))
        return torch.cat(out, 0)

    def _stream_batch(self, rows: list[list[int]], params: SamplingParams, stream_text: bool):
        B, dev = len(rows), self.device
        lens = [len(r) for r in rows]
        seqs = [_Sequence(self.tokenizer, n, self._budget(n, params), params,
                          self.eos_id if params.stop_at_eos else None) for n in lens]
        max_len = max(n + s.budget for n, s in zip(lens, seqs))
        cache, step = self.cache_for(self.model, B, max_len)
        max_len = cache.max_len
        gens = make_generators(params.seed, B, dev)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.model.cfg.vocab_size, dtype=torch.bool, device=dev)
            for b, r in enumerate(rows):
                seen[b, r] = True

        synchronize(dev)
        t0 = time.perf_counter()
        logits = self._prefill_rows(rows, cache)
        tokens = pick(logits_to_probs(logits, params, seen), params, gens)  # (B,)
        synchronize(dev)
        decode_start = time.perf_counter()
        compiled_before = step.compile_seconds
        prefill_ms = (decode_start - t0) * 1000

        # Equal lengths share one int position (reads stop at the filled prefix); CUDA graphs
        # need tensor positions.
        same_pos = len(set(lens)) == 1 and not (self.compile and dev.type == "cuda")
        lens_t = torch.tensor(lens, dtype=torch.long, device=dev)
        every = 1 if (stream_text or params.stop) else (1 if dev.type == "cpu" else self.check_every)
        pending = [tokens]
        steps = max(s.budget for s in seqs)
        for t in range(steps):
            if t > 0:
                if same_pos:
                    pos = lens[0] + t - 1
                else:  # rows past their budget keep writing to their last slot, unread
                    pos = torch.clamp(lens_t + (t - 1), max=max_len - 1)
                logits = step(tokens[:, None], pos)
                if seen is not None:
                    seen.scatter_(1, tokens[:, None], True)
                    tokens = pick(logits_to_probs(logits, params, seen), params, gens)
                elif params.greedy:
                    tokens = logits.argmax(dim=-1)
                else:
                    tokens = pick(logits_to_probs(logits, params), params, gens)
                pending.append(tokens)
            if len(pending) >= every or t == steps - 1:
                host = torch.stack(pending, 1).tolist()
                pending = []
                now = time.perf_counter()
                for b, seq in enumerate(seqs):
                    if seq.finish_reason is not None:
                        continue
                    piece = "".join(seq.add(tok) for tok in host[b])
                    if seq.finish_reason is not None:
                        seq.decode_end = now
                        tail, result = seq.result(prefill_ms, decode_start, piece,
                                                  compile_s=step.compile_seconds - compiled_before)
                        yield StreamEvent(b, tail, result)
                    elif piece:
                        yield StreamEvent(b, piece)
                if all(s.finish_reason is not None for s in seqs):
                    return
        now = time.perf_counter()
        for b, seq in enumerate(seqs):  # budget reached by every remaining row
            if seq.finish_reason is None:
                seq.decode_end = now
                tail, result = seq.result(prefill_ms, decode_start,
                                          compile_s=step.compile_seconds - compiled_before)
                yield StreamEvent(b, tail, result)

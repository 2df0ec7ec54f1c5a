"""The steps of generation, as small functions the engine and speculative decoding share.

- `prefill(model, ids, cache, start_pos, chunk_size)`: run a prompt through the model in
  chunks of at most `chunk_size` tokens (attention memory stays chunk x context, not
  context^2) and return the logits of its last token.
- `decode_one_token(model, cache, tokens, pos)`: one step for a batch; `pos` is an int, a 0-d
  tensor, or a (B,) tensor of per-sequence positions.
- `DecodeStep`: `decode_one_token` bound to a model and cache, optionally compiled; on CUDA
  with mode "reduce-overhead" (CUDA graphs), as in gpt-fast.
- `TextTracker`: per-sequence detokenisation for streaming and stop strings: emits text only
  once it is final (no half UTF-8 characters, nothing that may still turn into a stop string).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch

from andromeda.errors import UserError
from andromeda.infer.cache import ModelCache

Pos = Union[int, torch.Tensor]


def prefill(model, ids: torch.Tensor, cache: ModelCache, start_pos: int = 0,
            chunk_size: Optional[int] = None) -> torch.Tensor:
    """ids (B, L) at positions start_pos.. -> logits of the last position (B, V)."""
    L = ids.shape[1]
    chunk = chunk_size or L
    logits = None
    for lo in range(0, L, chunk):
        logits = model(ids[:, lo:lo + chunk], cache=cache, start_pos=start_pos + lo, last_only=True)
    return logits[:, -1]


def decode_one_token(model, cache: ModelCache, tokens: torch.Tensor, pos: Pos) -> torch.Tensor:
    """tokens (B, 1) at position(s) pos -> next-token logits (B, V)."""
    return model(tokens, cache=cache, start_pos=pos, last_only=True)[:, -1]


class DecodeStep:
    """Callable (tokens (B, 1), pos) -> logits (B, V) for one model and cache.

    Compiled on CUDA, the cache buffers are marked as static addresses and positions are
    always a tensor, so every step replays one graph, which "reduce-overhead" captures as a
    CUDA graph: that removes the per-kernel launch cost that dominates small-batch decoding.
    Compiled on CPU, where no graph replay exists, int positions stay Python ints compiled
    as symbolic sizes: one graph for every position that reads only the filled prefix of the
    cache (the whole static buffer costs ~6% more time on the 6x384 benchmark model)."""

    def __init__(self, model, cache: ModelCache, compile: bool = False):
        self.model, self.cache, self.compiled = model, cache, compile
        self.fn = decode_one_token
        self.seen: set = set()  # kinds of positions this step has been compiled for
        self.compile_seconds = 0.0  # wall time of the calls that compiled (first of each kind)
        if compile:
            # Dynamo keys compiled graphs by code object, and every engine cache (batch size,
            # length bucket) and every model is a new graph of this one function: a long chat
            # or a process serving several models passes the default limit of 8 quickly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            cuda = next(model.parameters()).device.type == "cuda"
            if cuda:  # for CUDA graphs; on CPU it would make every cache view (the server's
                # spans and row groups) a full compile of its own instead of a cached recompile
                for buf in cache.buffers():
                    torch._dynamo.mark_static_address(buf)
            self.int_positions = not cuda
            self.fn = torch.compile(decode_one_token, mode="reduce-overhead" if cuda else None,
                                    fullgraph=True, dynamic=not cuda)

    def __call__(self, tokens: torch.Tensor, pos: Pos) -> torch.Tensor:
        if not self.compiled:
            return self.fn(self.model, self.cache, tokens, pos)
        if isinstance(pos, int) and not self.int_positions:
            pos = torch.full((tokens.shape[0],), pos, dtype=torch.long, device=tokens.device)
        # The first call of each kind of position compiles and checks every guard; symbolic
        # ints are specialised for 0 and 1, so only larger positions share the int graph.
        kind = "int" if isinstance(pos, int) else pos.dim()
        if kind not in self.seen or (kind == "int" and pos < 2):
            started = time.perf_counter()
            try:
                out = self.fn(self.model, self.cache, tokens, pos)
            except (torch._dynamo.exc.TorchDynamoException,
                    torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode) as e:
                # A layer whose shapes depend on the data (e.g. MoE with a capacity factor)
                # cannot be one graph; say so instead of showing the compiler's traceback.
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"this model's decode step cannot be compiled ({first[:200]}); "
                                "run it without --compile") from None
            if kind not in self.seen:
                self.compile_seconds += time.perf_counter() - started
            self.seen.add(kind)
        else:
            # Same model, same cache, same shapes at every step: re-checking the hundreds of
            # guards on their attributes costs more than a small model's whole step on CPU.
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                out = self.fn(self.model, self.cache, tokens, pos)
        # CUDA graphs reuse their output buffer at the next replay; keep our own copy.
        return out.clone()


class TextTracker:
    """Turns a growing list of token ids into final text pieces, stopping at stop strings.

    Decoding the whole list at every token would cost O(n^2); instead, as in vLLM and
    Hugging Face's streamers, only the ids after a settled prefix are decoded (with a few ids
    of context so tokenizers that merge across ids decode the boundary the same way)."""

    CONTEXT = 4  # ids of context decoded before the unsettled ones

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # final text so far (emitted or held back), stop strings excluded
        self.emitted = 0  # characters of self.text already handed out
        self._settled = 0  # ids whose text is final and part of self.text
        self.stopped = False

    def _pending_text(self) -> str:
        lo = max(0, self._settled - self.CONTEXT)
        head = self.tokenizer.decode(self.ids[lo:self._settled])
        full = self.tokenizer.decode(self.ids[lo:])
        return full[len(head):] if full.startswith(head) else full

    def add(self, new_ids: Sequence[int]) -> str:
        """Append ids; return the text that became final (may be empty). After a stop string
        is seen, `stopped` is True and later ids are ignored."""
        if self.stopped:
            return ""
        self.ids.extend(int(i) for i in new_ids)
        pending = self._pending_text()
        if not pending.endswith("\ufffd"):  # else an incomplete UTF-8 character: wait for more ids
            self.text += pending
            self._settled = len(self.ids)
        return self._emit()

    def _emit(self) -> str:
        if self.stop:
            window_start = max(0, self.emitted - max(map(len, self.stop)))
            hits = [self.text.find(s, window_start) for s in self.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._take(len(self.text))
        return self._take(self._safe_end())

    def _safe_end(self) -> int:
        """End of the text that cannot become the start of a stop string."""
        end = len(self.text)
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    end = min(end, len(self.text) - n)
                    break
        return max(end, self.emitted)

    def _take(self, end: int) -> str:
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def flush(self) -> str:
        """At the end of generation: everything not yet handed out (held-back prefixes of stop
        strings that never completed, and any undecodable tail)."""
        if not self.stopped and self._settled < len(self.ids):
            self.text += self._pending_text()
            self._settled = len(self.ids)
        return self._take(len(self.text))

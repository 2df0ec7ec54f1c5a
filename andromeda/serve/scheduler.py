"""The continuous-batching scheduler: one thread owns the model and a pool of cache slots.

- `Scheduler(engine, max_batch, max_queue, ...)`: `start()`, `submit(sequences, emit)`,
  `cancel(request_id)`, `stop(timeout)`; `stats()` for /health.
- `SequenceSpec`: what one sequence of a request asks for (prompt ids, sampling, penalties,
  logprobs); `TokenEvent` / `FinishEvent`: what the scheduler hands back through `emit`.
- `QueueFull`, `Unfittable`: raised by `submit` (the HTTP layer turns them into 429 / 400).

How it runs (each loop iteration is bounded):
1. Cancelled sequences (client gone, server stopping) leave and free their slot at once.
2. Waiting sequences take free slots (lowest first, but see prefix reuse); a slot's recurrent
   state is zeroed. Prefix reuse: a prompt that starts with whole prefill chunks another slot
   holds (a running sequence's prefilled prompt, or what a finished one left in its idle
   slot: a shared system prompt, the earlier turns of a chat) takes that slot if it is free,
   or copies those keys/values, instead of computing them (models with a KV cache only:
   recurrent states cannot be taken mid-sequence). Idle rows write their dummy decode token
   just past what their slot keeps.
3. Prefill: prompts are prefilled alone (batch 1) into their slot, in chunks of `prefill_chunk`
   tokens, at most `prefill_chunk` tokens per iteration in all, so that a long prompt does
   not stall the streams already running: they decode between its chunks.
4. One decode step advances every decoding sequence; each samples with its own parameters
   and its own seeded generator. The step reads the cache only up to a span that covers the
   furthest row (a power of two from SPAN_MIN, so a compiled step sees few shapes): rows at
   positions 0..p attend over span slots, the ones past their own position masked.

Batch invariance: CPU and GPU matrix products round differently for different numbers of
rows (an MKL product of 1 row and of 8 rows differ at ~1e-5), so a sequence's logits would
depend on how many others are running. With `batch_invariant=True` (the default) every
decode step runs the pool in calls of exactly `decode_group` rows (default: the whole pool,
`max_batch` rows), whatever the load (idle rows compute on a dummy token), and prompts are
prefilled alone: the arithmetic of a row is then the same alone or among any others, bit
for bit. The span does not break this: slots past a row's position are masked, and a masked
slot adds exactly nothing to the attention's sums. Spans are powers of two (whole multiples of
any vector width, so a row's own slots are summed the same way in every span that covers
it) or the whole cache (which the row alone would read too); tests/test_serve_scheduler.py
checks this on the CPU kernels. Neither does prefix reuse: it copies whole chunks, and the
keys/values of a chunk prefilled alone depend only on the tokens up to its end, so the copy
is bit for bit what the sequence would have computed itself. The cost is computing idle rows
at low load; a smaller `decode_group` lowers it (only the groups up to the highest busy slot
run) at the price of more, smaller products at high load (benchmarks/serve_load.py measures
both). `batch_invariant=False` runs only rows 0..highest busy slot, as most servers do.
Models whose layers mix rows (MoE with a capacity limit) are not batch invariant either way.

Written here rather than taken from a serving library: the ones that exist (vLLM, TGI) bring
their own model code and kernels; this one drives the project's Engine and cache types.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import secrets
import threading
import time
from typing import Callable, Optional

import torch

from andromeda.infer.cache import batch_rows, copy_positions, recurrent_buffers, reset_recurrent
from andromeda.infer.generate import DecodeStep, TextTracker, prefill
from andromeda.infer.sampling import SamplingParams, logits_to_probs, pick

# The smallest span of cache positions a decode step reads (see `Scheduler.span_for`).
SPAN_MIN = 64


class QueueFull(Exception):
    """The waiting queue has no room; try again later."""


class Unfittable(Exception):
    """The request can never be served by this pool (too many sequences, too long)."""


@dataclasses.dataclass
class SequenceSpec:
    request_id: str
    index: int  # choice index within the request
    prompt_ids: list[int]
    params: SamplingParams  # max_new_tokens is the exact budget; seed already offset per choice
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # None: none; k >= 0: the chosen token's and the top k


@dataclasses.dataclass
class TokenEvent:
    index: int
    text: str  # newly final text
    token_ids: list[int]
    logprobs: list  # per token: (logprob, [(token_id, logprob), ...]) when asked for


@dataclasses.dataclass
class FinishEvent:
    index: int
    text: str  # the last piece of text
    finish_reason: str  # 'stop' (eos or stop string), 'length' or 'cancelled'
    prompt_tokens: int
    completion_tokens: int


class _Running:
    """A sequence in the scheduler: its slot, progress, sampling state and text."""

    def __init__(self, spec: SequenceSpec, emit: Callable, tokenizer, eos: Optional[int], vocab: int, device):
        self.spec, self.emit = spec, emit
        self.params = spec.params
        self.slot: Optional[int] = None
        self.prefilled = 0
        self.next_token: Optional[int] = None  # sampled, not yet fed to the model
        self.ids: list[int] = []
        self.tracker = TextTracker(tokenizer, self.params.stop)
        self.eos = eos if self.params.stop_at_eos else None
        # Every sequence samples from its own generator, so its draws never depend on what
        # else runs; without a seed, from a fresh random one.
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.counts = None  # generated-token counts (presence / frequency penalties)
        if spec.presence_penalty or spec.frequency_penalty:
            self.counts = torch.zeros(vocab, device=device)
        self.seen = None  # prompt and generated tokens (repetition penalty)
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, spec.prompt_ids] = True
        self.submitted = time.perf_counter()
        self.last_token_at: Optional[float] = None
        self.finished = False

    @property
    def decoding(self) -> bool:
        return self.next_token is not None and not self.finished


class Scheduler:
    def __init__(self, engine, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 512,
                 batch_invariant: bool = True, decode_group: Optional[int] = None, metrics=None,
                 idle_wait_s: float = 0.05, prefix_reuse: bool = True):
        self.engine, self.model = engine, engine.model
        self.device = engine.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk = prefill_chunk
        self.batch_invariant = batch_invariant
        self.metrics = metrics
        self.idle_wait_s = idle_wait_s
        self.max_len = engine.max_seq_len
        self.vocab = self.model.cfg.vocab_size
        self.group = decode_group or max_batch
        if self.group < 1 or max_batch % self.group:
            raise ValueError(f"the decode group ({self.group}) must divide the pool ({max_batch})")
        self.cache = self.model.new_cache(max_batch, self.max_len, device=self.device)
        # One decode step per (first row, rows, span), each over a fixed view of the pool's
        # cache, so a compiled step keeps one graph per view; made when first needed.
        self._steps: dict[tuple[int, int, int], DecodeStep] = {}
        self._recurrent = recurrent_buffers(self.cache)
        self.prefix_reuse = prefix_reuse and not self._recurrent
        self._whole_pool = batch_invariant and self.group == max_batch  # every step computes every row
        self.reused_tokens = 0
        # Per free slot, what its last sequence left: (prompt ids, positions prefilled), kept
        # for prefix reuse until the slot is taken (idle rows write past it, see _decode).
        self.retained: list[Optional[tuple[list[int], int]]] = [None] * max_batch
        self.slots: list[Optional[_Running]] = [None] * max_batch
        self.waiting: collections.deque[_Running] = collections.deque()
        self.prefilling: collections.deque[_Running] = collections.deque()
        self._cancelled: set[str] = set()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None
        self.ready = threading.Event()  # set by the thread once it serves
        self.steps = 0

    def span_for(self, needed: int) -> int:
        """Cache positions a decode step reads when its furthest row needs `needed` of them."""
        span = SPAN_MIN
        while span < needed:
            span *= 2
        return min(span, self.max_len)

    def decode_rows(self, busy_rows: int) -> int:
        """Rows a step computes when rows 0..busy_rows-1 hold sequences: whole groups when batch
        invariant; else just those rows, or, compiled, the next power of two (few graphs)."""
        if self.batch_invariant:
            return -(-busy_rows // self.group) * self.group
        if self.engine.compile:
            return min(self.max_batch, 1 << (busy_rows - 1).bit_length())
        return busy_rows

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """Every (first row, rows, span) a decode step can take."""
        spans = sorted({self.span_for(1 << k) for k in range(self.max_len.bit_length() + 1)})
        if self.batch_invariant:
            views = [(lo, self.group) for lo in range(0, self.max_batch, self.group)]
        else:
            views = [(0, rows) for rows in sorted({self.decode_rows(n) for n in range(1, self.max_batch + 1)})]
        return [(lo, rows, span) for lo, rows in views for span in spans]

    def warm_up(self, progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Compile every decode step before serving (with --compile; each first call compiles),
        so no request waits on the compiler. Runs dummy tokens at position 0 of every row, then
        zeroes the recurrent states they touched; before serving only (start(warm_up=True)
        runs it on the scheduler thread, whose thread count the compiled kernels then use)."""
        shapes = self.step_shapes()
        # Dynamo counts graphs per function; the server's views are one graph each.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(shapes) + 16)
        with torch.inference_mode():
            for i, (lo, rows, span) in enumerate(shapes):
                tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
                self.decode_step(lo, rows, span)(tokens, torch.zeros(rows, dtype=torch.long, device=self.device))
                if progress is not None:
                    progress(i + 1, len(shapes))
            reset_recurrent(self.cache)

    def decode_step(self, lo: int, rows: int, span: int) -> DecodeStep:
        """The (compiled, with --compile) decode step over pool rows lo..lo+rows-1 and the first
        `span` cache slots."""
        key = (lo, rows, span)
        if key not in self._steps:
            view = batch_rows(self.cache, lo, lo + rows, span)
            self._steps[key] = DecodeStep(self.model, view, compile=self.engine.compile)
        return self._steps[key]

    # ------------------------------------------------------------------ client side (any thread)
    def check_fits(self, n: int, prompt_len: int, max_tokens: int) -> None:
        if n > self.max_batch:
            raise Unfittable(f"n={n} sequences cannot run at once on this server (--max-batch {self.max_batch})")
        if prompt_len >= self.max_len:
            raise Unfittable(f"the prompt has {prompt_len} tokens but the model's context is {self.max_len} "
                             "(the prompt and at least one new token must fit)")
        if prompt_len + max_tokens > self.max_len:
            raise Unfittable(f"max_tokens={max_tokens} does not fit: the prompt takes {prompt_len} of the "
                             f"model's {self.max_len} positions, leaving {self.max_len - prompt_len}")

    def submit(self, specs: list[SequenceSpec], emit: Callable) -> None:
        """Queue the sequences of one request; `emit(event)` is called from the scheduler thread."""
        tok = self.engine.tokenizer
        running = [_Running(s, emit, tok, self.engine.eos_id, self.vocab, self.device) for s in specs]
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(running) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self.waiting)} sequences waiting, at most "
                                f"{self.max_queue}); retry shortly")
            self.waiting.extend(running)
            self._lock.notify()
        self._gauge()

    def cancel(self, request_id: str) -> None:
        """Stop every sequence of a request (its client went away); their slots free at once."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    def stats(self) -> dict:
        with self._lock:
            return {"running": sum(s is not None for s in self.slots), "waiting": len(self.waiting),
                    "max_batch": self.max_batch, "steps": self.steps}

    # ------------------------------------------------------------------ lifecycle
    def start(self, threads: Optional[int] = None, warm_up: bool = False,
              progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Start the scheduler thread: it takes `threads` intra-op threads, compiles every decode
        shape first when `warm_up` (see `warm_up`), then sets `ready` and serves.

        Why the thread count is set here: libgomp keeps one team of worker threads per thread
        that has run a parallel region, and once more threads are managed than there are cores
        it stops letting waiting workers spin, which on this 2-core machine made every step of
        this thread ~2x slower than the same step on the main thread (a 1-row compiled step:
        1.7 against 6.7 ms). The server therefore keeps the main thread at one intra-op thread
        (no team) and gives the compute threads to this one."""
        self._thread = threading.Thread(target=self._main, args=(threads, warm_up, progress),
                                        name="andromeda-scheduler", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Wait until the thread serves (True), has ended (False, see `error`) or `timeout`
        passed; without a timeout the wait is bounded by the thread's warm-up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.wait(0.5):
            if not self.alive or (deadline is not None and time.monotonic() >= deadline):
                return self.ready.is_set()
        return True

    def _main(self, threads: Optional[int], warm_up: bool, progress) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        if warm_up:
            try:
                self.warm_up(progress)
            except Exception as e:  # reported by whoever waits for `ready` (serve: one line)
                self.error = e
                return
        self.ready.set()
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still queued or running and wait (bounded) for the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    with self._lock:
                        if self._stopping:
                            break
                        if not self.waiting and not any(self.slots) and not self._cancelled:
                            self._lock.wait(self.idle_wait_s)
                            continue
                    self.iterate()
        except BaseException as e:  # the HTTP layer reports it on /health and to waiting clients
            self.error = e
            raise
        finally:
            self._finish_all("cancelled")

    # ------------------------------------------------------------------ one iteration
    def iterate(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill_some()
        if any(s is not None and s.decoding for s in self.slots):
            self._decode()
        self._gauge()

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            keep = collections.deque()
            for seq in self.waiting:
                if seq.spec.request_id in cancelled:
                    self._finish(seq, "cancelled")
                else:
                    keep.append(seq)
            self.waiting = keep
        for seq in list(self.slots):
            if seq is not None and seq.spec.request_id in cancelled:
                self._finish(seq, "cancelled")

    def _admit(self) -> None:
        with self._lock:
            while self.waiting:
                free = [slot for slot in range(self.max_batch) if self.slots[slot] is None]
                if not free:
                    break
                seq = self.waiting.popleft()
                slot = free[0]
                if self.prefix_reuse:
                    # The free slot that already holds most of this prompt (no copy needed).
                    # Among equals, when every step computes the whole pool anyway, one that
                    # holds nothing, so that other prefixes stay; otherwise the lowest, since
                    # rows up to the highest busy slot are computed.
                    kept = {s: self._shared_chunks(seq, *self.retained[s]) if self.retained[s] else 0 for s in free}
                    slot = max(free, key=lambda s: (kept[s], self._whole_pool and self.retained[s] is None, -s))
                    if kept[slot]:
                        seq.prefilled = kept[slot]
                        self._count_reused(kept[slot])
                seq.slot = slot
                self.slots[slot] = seq
                self.retained[slot] = None
                reset_recurrent(batch_rows(self.cache, slot, slot + 1))
                self.prefilling.append(seq)

    def _shared_chunks(self, seq: _Running, theirs, valid: int) -> int:
        """Prompt positions of `seq` in whole prefill chunks that equal `theirs` within its first
        `valid` positions, leaving at least one token of `seq` to prefill (it gives the logits)."""
        ids, chunk = seq.spec.prompt_ids, self.prefill_chunk
        limit, shared = min(valid, len(ids) - 1), 0
        # Compare chunk by chunk (list slices compare in C).
        while shared + chunk <= limit and ids[shared:shared + chunk] == theirs[shared:shared + chunk]:
            shared += chunk
        return shared

    def _count_reused(self, n: int) -> None:
        self.reused_tokens += n
        if self.metrics is not None:
            self.metrics.prompt_tokens_reused.inc(n)

    def _reuse_prefix(self, seq: _Running) -> None:
        """Before `seq` prefills its next chunk: copy the longest run of whole prefill chunks of
        its prompt that another slot holds (a running sequence's prefilled prompt, or what a
        finished one left), beyond what `seq` has. Checked at every chunk, so prompts admitted
        together copy what the first of them computes."""
        best, source = seq.prefilled, None
        for slot in range(self.max_batch):
            other = self.slots[slot]
            if other is not None and other is not seq and not other.finished:
                held = (other.spec.prompt_ids, other.prefilled)
            elif other is None and self.retained[slot] is not None:
                held = self.retained[slot]
            else:
                continue
            shared = self._shared_chunks(seq, *held)
            if shared > best:
                best, source = shared, slot
        if source is None:
            return
        copy_positions(self.cache, source, seq.slot, seq.prefilled, best)
        self._count_reused(best - seq.prefilled)
        seq.prefilled = best

    def _prefill_some(self) -> None:
        budget = self.prefill_chunk
        while self.prefilling and budget > 0:
            seq = self.prefilling[0]
            if seq.finished:
                self.prefilling.popleft()
                continue
            if self.prefix_reuse:
                self._reuse_prefix(seq)
            ids = seq.spec.prompt_ids
            # Chunks start at multiples of prefill_chunk, as `andromeda generate` cuts them.
            end = min(len(ids), seq.prefilled + self.prefill_chunk)
            chunk = torch.tensor([ids[seq.prefilled:end]], dtype=torch.long, device=self.device)
            row = batch_rows(self.cache, seq.slot, seq.slot + 1)
            logits = prefill(self.model, chunk, row, seq.prefilled)
            budget -= end - seq.prefilled
            seq.prefilled = end
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(chunk.shape[1])
            if end == len(ids):
                self.prefilling.popleft()
                self._take(seq, logits[0])

    def _decode(self) -> None:
        busy = [s for s in self.slots if s is not None]
        rows = self.decode_rows(1 + max(s.slot for s in busy))
        tokens = [0] * rows
        # Idle rows compute a dummy token; it is written just past what the slot retains.
        positions = [kept[1] if kept is not None else 0 for kept in self.retained[:rows]]
        for seq in busy:
            if seq.slot >= rows:
                continue
            if seq.decoding:
                tokens[seq.slot] = seq.next_token
                positions[seq.slot] = len(seq.spec.prompt_ids) + len(seq.ids) - 1
            else:
                # A prompt half prefilled: the dummy token writes the slot its next chunk
                # overwrites before reading; its recurrent state is restored below.
                positions[seq.slot] = seq.prefilled
        saved = [(seq.slot, [b[seq.slot].clone() for b in self._recurrent])
                 for seq in busy if not seq.decoding and seq.slot < rows and self._recurrent]
        span = self.span_for(1 + max(positions))
        tok = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.batch_invariant:
            G = self.group
            logits = torch.cat([self.decode_step(lo, G, span)(tok[lo:lo + G], pos[lo:lo + G])
                                for lo in range(0, rows, G)])
        else:
            logits = self.decode_step(0, rows, span)(tok, pos)
        for slot, bufs in saved:
            for b, value in zip(self._recurrent, bufs):
                b[slot].copy_(value)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.batch_occupancy.observe(sum(s.decoding for s in busy) / self.max_batch)
        for seq in busy:
            if seq.decoding:
                self._take(seq, logits[seq.slot])

    # ------------------------------------------------------------------ sampling and events
    def _take(self, seq: _Running, logits: torch.Tensor) -> None:
        """Sample the next token of `seq` from its logits (V,) and hand out what became final."""
        spec, raw = seq.spec, logits.float()[None]
        adjusted = raw
        if seq.counts is not None:  # OpenAI's definition: over the generated tokens only
            adjusted = raw - spec.frequency_penalty * seq.counts - spec.presence_penalty * (seq.counts > 0).float()
        probs = logits_to_probs(adjusted, seq.params, seq.seen)
        token = int(pick(probs, seq.params, [seq.generator])[0])
        lp = None
        if spec.logprobs is not None:
            # The model's own distribution (before penalties, temperature and filters).
            logp = torch.log_softmax(raw[0], dim=-1)
            top = []
            if spec.logprobs > 0:
                values, idx = torch.topk(logp, min(spec.logprobs, self.vocab))
                top = list(zip(idx.tolist(), values.tolist()))
            lp = (float(logp[token]), top)
        now = time.perf_counter()
        if self.metrics is not None:
            if seq.last_token_at is None:
                self.metrics.ttft.observe(now - seq.submitted)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if seq.eos is not None and token == seq.eos:
            self._finish(seq, "stop")
            return
        seq.ids.append(token)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
        if seq.counts is not None:
            seq.counts[token] += 1
        if seq.seen is not None:
            seq.seen[0, token] = True
        piece = seq.tracker.add([token])
        seq.emit(TokenEvent(spec.index, piece, [token], [lp] if lp is not None else []))
        if seq.tracker.stopped:
            self._finish(seq, "stop")
        elif len(seq.ids) >= seq.params.max_new_tokens:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: _Running, reason: str) -> None:
        if seq.finished:
            return
        seq.finished = True
        tail = seq.tracker.flush() if reason != "cancelled" else ""
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
            if self.prefix_reuse and seq.prefilled >= self.prefill_chunk:
                self.retained[seq.slot] = (seq.spec.prompt_ids, seq.prefilled)
        if self.metrics is not None:
            self.metrics.requests_finished.labels(reason).inc()
        seq.emit(FinishEvent(seq.spec.index, tail, reason, len(seq.spec.prompt_ids), len(seq.ids)))

    def _finish_all(self, reason: str) -> None:
        with self._lock:
            pending = list(self.waiting) + [s for s in self.slots if s is not None]
            self.waiting.clear()
        for seq in pending:
            self._finish(seq, reason)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(sum(s is not None for s in self.slots))
            self.metrics.waiting.set(len(self.waiting))


_ids = itertools.count()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}-{int(time.time() * 1000)}"

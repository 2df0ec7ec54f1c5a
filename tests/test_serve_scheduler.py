"""The continuous-batching scheduler in process: a request's tokens and logprobs are the same
bit for bit alone or among others (and the negative control shows the check can fail),
chunked prefill between decode steps keeps recurrent state intact, cancellation frees slots."""

import queue
import time

import pytest
import torch

from andromeda.data.tokenizer import ByteTokenizer
from andromeda.infer.engine import Engine
from andromeda.infer.sampling import SamplingParams
from andromeda.model.transformer import Transformer
from andromeda.presets import get_preset
from andromeda.serve.scheduler import FinishEvent, Scheduler, SequenceSpec, TokenEvent

TIMEOUT_S = 30


def tiny_engine(preset="llama-tiny", max_seq_len=96, head_scale=8.0):
    cfg = get_preset(preset)
    cfg.max_seq_len = max_seq_len
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.head.weight.mul_(head_scale)  # peaked distributions: no near-ties decide a test
    return Engine(model, ByteTokenizer())


def run_requests(scheduler, requests):
    """requests: list of (prompt, params); returns per request (token ids, logprobs, finish)."""
    events: queue.Queue = queue.Queue()
    specs = [SequenceSpec(f"r{i}", i, list(prompt.encode()), params, logprobs=0)
             for i, (prompt, params) in enumerate(requests)]
    scheduler.submit(specs, events.put)
    ids = [[] for _ in specs]
    lps = [[] for _ in specs]
    finish = [None] * len(specs)
    deadline = time.monotonic() + TIMEOUT_S
    while any(f is None for f in finish):
        event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(event, TokenEvent):
            ids[event.index] += event.token_ids
            lps[event.index] += [lp for lp, _ in event.logprobs]
        elif isinstance(event, FinishEvent):
            finish[event.index] = event.finish_reason
    return list(zip(ids, lps, finish))


GREEDY = SamplingParams(max_new_tokens=10, temperature=0)
SEEDED = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11)
# The first of these runs past position 64 while the requests under test decode, so their
# steps read a longer span of the cache (96 slots) than alone (64): SPAN_MIN in the scheduler.
OTHERS = [("another prompt, longer than the first one, going well past the first span",
           SamplingParams(max_new_tokens=14, temperature=1.0, seed=3)),
          ("x", SamplingParams(max_new_tokens=6, temperature=0)),
          ("third", SamplingParams(max_new_tokens=12, temperature=0.7, top_k=5, seed=4)),
          ("fourth one here", SamplingParams(max_new_tokens=9, temperature=0))]


def alone_and_loaded(batch_invariant: bool, preset="llama-tiny", prefill_chunk=512, decode_group=None):
    engine = tiny_engine(preset)
    scheduler = Scheduler(engine, max_batch=6, prefill_chunk=prefill_chunk, batch_invariant=batch_invariant,
                          decode_group=decode_group)
    scheduler.start()
    try:
        mine = [("the quick brown fox", GREEDY), ("jumps over", SEEDED)]
        alone = [run_requests(scheduler, [r])[0] for r in mine]
        spans_alone = {span for _, _, span in scheduler._steps}
        loaded = run_requests(scheduler, OTHERS[:2] + mine[:1] + OTHERS[2:] + mine[1:])
        if batch_invariant:  # the load made the steps read more of the cache than alone
            assert spans_alone == {64} and {span for _, _, span in scheduler._steps} == {64, 96}
        return engine, mine, alone, [loaded[2], loaded[5]]
    finally:
        scheduler.stop(5)


@pytest.mark.parametrize("decode_group", [None, 2])
def test_a_request_is_bitwise_the_same_alone_or_among_others(decode_group):
    engine, mine, alone, loaded = alone_and_loaded(batch_invariant=True, decode_group=decode_group)
    assert alone == loaded  # token ids and float logprobs, exactly
    # ... and the same tokens as the engine behind `andromeda generate`.
    for (prompt, params), (ids, _, _) in zip(mine, alone):
        assert engine.generate([prompt], params)[0].token_ids == ids


@pytest.mark.parametrize("preset,dtype", [("llama-tiny", torch.float32), ("andromeda-tiny", torch.float32),
                                          ("llama-tiny", torch.bfloat16)])
def test_masked_slots_past_every_row_change_no_bit_of_a_decode_step(preset, dtype):
    """What the scheduler's span relies on: rows decoding at their own positions over the first
    `span` slots of the cache get the same logits, bit for bit, for every span the scheduler
    uses that covers the furthest row (slots past a row's position are masked and add exactly
    nothing). ALiBi + xPos and token shift (andromeda-tiny) included. The scheduler's spans
    are powers of two from 64 (or the whole cache): a span that is not a multiple of the
    kernel's vector width can round a row that reaches into its last slots differently."""
    from andromeda.infer.cache import batch_rows
    from andromeda.infer.generate import prefill

    engine = tiny_engine(preset, max_seq_len=256)
    model = engine.model.to(dtype)
    cache = model.new_cache(4, 256, device="cpu")
    lengths = [5, 17, 40, 3]
    torch.manual_seed(1)
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            prefill(model, torch.randint(0, 256, (1, n)), batch_rows(cache, row, row + 1), 0)
        saved = [b.clone() for b in cache.buffers()]
        tokens, pos = torch.randint(0, 256, (4, 1)), torch.tensor(lengths)
        results = []
        for span in (64, 128, 256):
            for buf, value in zip(cache.buffers(), saved):  # every span decodes the same state
                buf.copy_(value)
            results.append(model(tokens, cache=batch_rows(cache, 0, 4, span), start_pos=pos, last_only=True))
        for span in (40, 3):  # a span short of the furthest row cannot take its token
            with pytest.raises((IndexError, RuntimeError)):
                model(tokens, cache=batch_rows(cache, 0, 4, span), start_pos=pos, last_only=True)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_negative_control_decoding_only_busy_rows_changes_the_numbers():
    """Without the fixed-shape pool, a request's logprobs depend on the batch (matrix
    products round differently for 1 and 6 rows): the equality above is not vacuous."""
    _, _, alone, loaded = alone_and_loaded(batch_invariant=False)
    assert [lp for _, lp, _ in alone] != [lp for _, lp, _ in loaded]


def test_chunked_prefill_between_decode_steps_keeps_recurrent_state():
    """andromeda-tiny has token shift (recurrent state): a prompt prefilled in chunks of 4 while
    others decode must give the same tokens as `Engine.generate` in one piece."""
    engine, mine, alone, loaded = alone_and_loaded(batch_invariant=True, preset="andromeda-tiny", prefill_chunk=4)
    assert alone == loaded
    for (prompt, params), (ids, _, _) in zip(mine, alone):
        assert engine.generate([prompt], params)[0].token_ids == ids


def test_cancel_frees_the_slot_and_others_continue():
    engine = tiny_engine()
    scheduler = Scheduler(engine, max_batch=2)
    scheduler.start()
    try:
        events: queue.Queue = queue.Queue()
        long = SamplingParams(max_new_tokens=80, temperature=0, stop_at_eos=False)
        scheduler.submit([SequenceSpec("gone", 0, list(b"abc"), long)], events.put)
        first = events.get(timeout=TIMEOUT_S)
        assert isinstance(first, TokenEvent)
        scheduler.cancel("gone")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            event = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(event, FinishEvent):
                break
        assert event.finish_reason == "cancelled" and event.completion_tokens < 80
        assert scheduler.stats()["running"] == 0
        expected = engine.generate(["after"], GREEDY)[0].token_ids
        assert run_requests(scheduler, [("after", GREEDY)])[0][0] == expected
    finally:
        scheduler.stop(5)
    assert not scheduler.alive


@pytest.mark.parametrize("kind", ["queue", "fits"])
def test_refusals(kind):
    from andromeda.serve.scheduler import QueueFull, Unfittable
    engine = tiny_engine(max_seq_len=32)
    scheduler = Scheduler(engine, max_batch=2, max_queue=1)  # not started: nothing leaves the queue
    if kind == "queue":
        scheduler.submit([SequenceSpec("a", 0, [1], GREEDY)], lambda e: None)
        with pytest.raises(QueueFull, match="queue is full"):
            scheduler.submit([SequenceSpec("b", 0, [1], GREEDY)], lambda e: None)
    else:
        with pytest.raises(Unfittable, match="n=3"):
            scheduler.check_fits(3, 5, 5)
        with pytest.raises(Unfittable, match="context is 32"):
            scheduler.check_fits(1, 32, 1)
        with pytest.raises(Unfittable, match="max_tokens=30 does not fit"):
            scheduler.check_fits(1, 5, 30)
        scheduler.check_fits(2, 5, 27)


def test_penalties_and_logprobs_follow_their_definitions():
    """Greedy with OpenAI's presence/frequency penalties against a naive loop over full forwards
    (logit - frequency * count - presence * (count > 0), counts of generated tokens), and the
    reported logprob against log_softmax of the full forward's logits."""
    engine = tiny_engine(head_scale=1.0)  # flat logits: penalties change the choices
    model = engine.model
    prompt = list(b"abcabc")
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    scheduler = Scheduler(engine, max_batch=2)
    scheduler.start()
    try:
        events: queue.Queue = queue.Queue()
        scheduler.submit([SequenceSpec("p", 0, prompt, params, presence_penalty=1.5, frequency_penalty=-2.0,
                                       logprobs=0)], events.put)
        ids, lps = [], []
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            event = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(event, FinishEvent):
                break
            ids += event.token_ids
            lps += [lp for lp, _ in event.logprobs]
    finally:
        scheduler.stop(5)
    seq, counts, expected, expected_lps = list(prompt), torch.zeros(model.cfg.vocab_size), [], []
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([seq]))[0, -1].float()
            adjusted = logits + 2.0 * counts - 1.5 * (counts > 0).float()
            token = int(adjusted.argmax())
            expected.append(token)
            expected_lps.append(float(torch.log_softmax(logits, -1)[token]))
            counts[token] += 1
            seq.append(token)
    assert ids == expected
    assert lps == pytest.approx(expected_lps, abs=1e-4)
    # Negative control: the penalties changed the answer (a negative frequency penalty repeats).
    plain = engine.generate([prompt], params)[0].token_ids
    assert plain != expected


@pytest.mark.parametrize("argv,message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-batch", "8", "--decode-group", "3"], "--decode-group must divide"),
    (["--port", "70000"], "--port must be in"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
])
def test_serve_command_refuses_bad_options(tmp_path, capsys, argv, message):
    from andromeda.cli import main
    assert main(["serve", "--ckpt", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("chunk,least,most", [(4, 9, 99), (512, 0, 1)])
def test_long_prompt_is_prefilled_between_decode_steps(chunk, least, most):
    """A 40-token prompt in chunks of 4 takes 10 iterations, each of which also advances the
    running stream; in one chunk (the control) the stream waits for none."""
    engine = tiny_engine()
    scheduler = Scheduler(engine, max_batch=2, prefill_chunk=chunk)  # driven by hand, not started
    order: list[str] = []

    def emit(name):
        return lambda event: order.append(name) if isinstance(event, TokenEvent) else None

    long = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
    with torch.inference_mode():
        scheduler.submit([SequenceSpec("a", 0, list(b"go"), long)], emit("a"))
        for _ in range(3):
            scheduler.iterate()
        before = order.count("a")
        scheduler.submit([SequenceSpec("b", 0, list(range(40)), long)], emit("b"))
        for _ in range(20):
            scheduler.iterate()
            if "b" in order:
                break
    between = order[:order.index("b")].count("a") - before
    assert least <= between <= most


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_compile_reaches_every_decode_path(batch_invariant):
    """`serve --compile` compiles the decode step with and without batch invariance, every
    shape at warm-up (serving then makes no new one), and the compiled steps give the eager
    tokens."""
    answers = []
    for compile in (False, True):
        engine = tiny_engine()
        engine.compile = compile
        scheduler = Scheduler(engine, max_batch=4, batch_invariant=batch_invariant)
        if compile:
            scheduler.warm_up()
            assert set(scheduler._steps) == set(scheduler.step_shapes())
        scheduler.start()
        try:
            answers.append([ids for ids, _, _ in run_requests(scheduler, [("the quick brown fox", GREEDY),
                                                                          ("jumps over", GREEDY),
                                                                          ("and a third", GREEDY)])])
        finally:
            scheduler.stop(5)
        assert scheduler._steps and all(step.compiled == compile for step in scheduler._steps.values())
        if compile:
            assert set(scheduler._steps) == set(scheduler.step_shapes())
    assert answers[0] == answers[1]


def test_step_shapes_cover_what_decoding_asks_for():
    engine = tiny_engine(max_seq_len=300)
    invariant = Scheduler(engine, max_batch=8, decode_group=4)
    assert invariant.step_shapes() == [(lo, 4, span) for lo in (0, 4) for span in (64, 128, 256, 300)]
    assert [invariant.decode_rows(n) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    engine.compile = True
    loose = Scheduler(engine, max_batch=6, batch_invariant=False)
    assert [loose.decode_rows(n) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert {rows for _, rows, _ in loose.step_shapes()} == {1, 2, 4, 6}
    engine.compile = False
    assert [Scheduler(engine, max_batch=6, batch_invariant=False).decode_rows(n) for n in (3, 5)] == [3, 5]


def answer_without_reuse(engine, prompt, params, max_batch):
    """(ids, logprobs, finish) of `prompt` from a scheduler that prefills every prompt itself."""
    plain = Scheduler(engine, max_batch=max_batch, prefill_chunk=8, prefix_reuse=False)
    plain.start()
    try:
        answer = run_requests(plain, [(prompt, params)])[0]
    finally:
        plain.stop(5)
    assert plain.reused_tokens == 0
    return answer


def test_a_shared_prompt_prefix_is_copied_from_a_running_sequence_bit_for_bit():
    """B starts with whole prefill chunks that A, still running, has prefilled: B copies their
    keys/values instead of computing them, and gets exactly the tokens and logprobs it gets
    with reuse off. A prompt that differs inside the second chunk copies only the first;
    prompts admitted together copy what the first of them computes."""
    engine = tiny_engine()
    system = "You are a terse assistant. "  # 27 bytes: three whole chunks of 8
    b_prompt = system + "Say hi."
    params = SamplingParams(max_new_tokens=8, temperature=0.8, seed=5)
    alone = answer_without_reuse(engine, b_prompt, params, max_batch=4)
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=8)
    scheduler.start()
    try:
        events: queue.Queue = queue.Queue()
        long_a = SamplingParams(max_new_tokens=60, temperature=0)
        scheduler.submit([SequenceSpec("a", 0, list((system + "Answer at length.").encode()), long_a)], events.put)
        assert isinstance(events.get(timeout=TIMEOUT_S), TokenEvent)  # A is prefilled and decoding
        assert run_requests(scheduler, [(b_prompt, params)])[0] == alone  # ids, float logprobs, finish
        assert scheduler.reused_tokens == 24
        other = run_requests(scheduler, [(system[:12] + "X" + system[13:] + "Hm.", params)])[0]
        assert scheduler.reused_tokens == 24 + 8 and other[2] == "length"  # only the first chunk matched
    finally:
        scheduler.stop(5)
    fresh = Scheduler(engine, max_batch=4, prefill_chunk=8)
    fresh.start()
    try:
        together = run_requests(fresh, [(system + "Go on.", params), (b_prompt, params)])
        assert fresh.reused_tokens == 24 and together[1] == alone
    finally:
        fresh.stop(5)


def test_a_finished_requests_prompt_stays_reusable_through_other_traffic():
    """A slot keeps what its finished sequence prefilled: the same prompt later takes that slot
    and prefills only its last chunk, bit for bit as without reuse, even after other requests
    ran beside the idle slot (whose dummy decode writes land past what it keeps)."""
    engine = tiny_engine()
    prompt = "You are a terse assistant. Say hi."  # 34 bytes: 32 reusable, the last 2 prefilled
    params = SamplingParams(max_new_tokens=6, temperature=0)
    alone = answer_without_reuse(engine, prompt, params, max_batch=3)
    scheduler = Scheduler(engine, max_batch=3, prefill_chunk=8)
    scheduler.start()
    try:
        assert run_requests(scheduler, [(prompt, params)])[0] == alone and scheduler.reused_tokens == 0
        assert scheduler.retained[0] == (list(prompt.encode()), 34)
        busy = SamplingParams(max_new_tokens=20, temperature=1.0, seed=1)
        run_requests(scheduler, [("zzzz unrelated prompt here", busy), ("and another", busy)])
        assert run_requests(scheduler, [(prompt, params)])[0] == alone
        assert scheduler.reused_tokens == 32
    finally:
        scheduler.stop(5)


def test_prefix_reuse_is_off_for_models_with_recurrent_state():
    """Token shift keeps state that summarises the whole past: a copy of keys/values alone
    would not reproduce it, so andromeda-tiny never reuses."""
    assert not Scheduler(tiny_engine("andromeda-tiny"), max_batch=2, prefill_chunk=8).prefix_reuse
    assert not Scheduler(tiny_engine(), max_batch=2, prefill_chunk=8, prefix_reuse=False).prefix_reuse


def test_a_warm_up_that_fails_is_reported_and_the_thread_ends():
    """serve --compile waits for the scheduler thread to compile its steps; a model that cannot
    be compiled must end that wait with the error (the serve command prints it in one line)."""
    from andromeda.errors import UserError

    scheduler = Scheduler(tiny_engine(), max_batch=2)

    def refuse(*args):
        raise UserError("this model's decode step cannot be compiled (test)")

    scheduler.decode_step = refuse
    scheduler.start(threads=1, warm_up=True)
    assert scheduler.wait_ready(timeout=TIMEOUT_S) is False
    assert isinstance(scheduler.error, UserError) and not scheduler.alive and not scheduler.ready.is_set()


@pytest.mark.parametrize("batch_invariant,decode_group,unrelated_slot",
                         [(True, None, 1), (True, 2, 0), (False, None, 0)])
def test_slot_choice_keeps_prefixes_only_where_rows_cost_nothing(batch_invariant, decode_group, unrelated_slot):
    """A prompt takes the free slot that holds its prefix. An unrelated prompt spares a slot
    that holds one only when every step computes the whole pool anyway; otherwise it takes
    the lowest free slot, since rows up to the highest busy one are computed."""
    scheduler = Scheduler(tiny_engine(), max_batch=4, prefill_chunk=8, batch_invariant=batch_invariant,
                          decode_group=decode_group)
    kept = list(b"You are a terse assistant. ")
    scheduler.retained[0] = (kept, 24)
    params = SamplingParams(max_new_tokens=4, temperature=0)
    scheduler.submit([SequenceSpec("u", 0, list(b"something else entirely"), params)], lambda e: None)
    scheduler._admit()
    assert scheduler.slots[unrelated_slot].spec.request_id == "u"
    if unrelated_slot == 0:
        return  # the prefix was given up for the lower slot
    scheduler.submit([SequenceSpec("m", 0, kept + list(b"Say hi."), params)], lambda e: None)
    scheduler._admit()
    assert scheduler.slots[0].spec.request_id == "m" and scheduler.slots[0].prefilled == 24

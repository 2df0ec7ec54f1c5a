"""`andromeda serve` as a user meets it: a real server process on 127.0.0.1, called with the
official `openai` client (and httpx for raw bodies). Completions and chat, streamed and not,
n > 1, seeds, stop, logprobs, the same text as `andromeda generate` (also with a shared
system prompt reused from other requests), determinism among concurrent streams, a client
disconnecting mid-stream, every bad input, API key, full queue, graceful shutdown."""

import concurrent.futures
import json
import signal
import time

import httpx
import openai
import pytest

from andromeda.cli import main
from tests.serve_helpers import running_server, tiny_checkpoint, wait_until

HTTP_TIMEOUT_S = 30
MODEL = "tiny"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(ckpt, "--max-batch", "8", "--max-queue", "32") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=HTTP_TIMEOUT_S, max_retries=0)


def generate_cli(ckpt, capsys, *args):
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--json", "--threads", "1", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server.url + "/health", timeout=HTTP_TIMEOUT_S).json()
    assert health["status"] == "ok" and health["max_batch"] == 8


@pytest.mark.parametrize("settings", [
    {"temperature": 0.0},
    {"temperature": 0.9, "top_p": 0.9, "seed": 7},
])
def test_completion_is_what_generate_prints(ckpt, client, capsys, settings):
    prompt = "To be, or not to be"
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, **settings)
    args = ["--prompt", prompt, "--max-new-tokens", "20", "--temperature", str(settings["temperature"])]
    if "seed" in settings:
        args += ["--top-p", str(settings["top_p"]), "--seed", str(settings["seed"])]
    expected = generate_cli(ckpt, capsys, *args)
    assert got.choices[0].text == expected["text"]
    assert got.usage.prompt_tokens == expected["prompt_tokens"]
    assert got.usage.completion_tokens == expected["new_tokens"]
    assert got.choices[0].finish_reason == ("length" if expected["finish_reason"] == "length" else "stop")


def test_streamed_equals_not_streamed_completion_and_chat(client):
    kw = dict(model=MODEL, max_tokens=16, temperature=0.8, seed=3)
    whole = client.completions.create(prompt="hello there", **kw)
    chunks = list(client.completions.create(prompt="hello there", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=messages, **kw)
    assert chat.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 10  # the rendered template, not only the words


def test_n_choices_use_seed_plus_index(client):
    kw = dict(model=MODEL, prompt="once upon", max_tokens=12, temperature=1.0)
    many = client.completions.create(n=3, seed=5, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [client.completions.create(seed=5 + i, **kw) for i in range(3)]
    assert [c.text for c in many.choices] == [s.choices[0].text for s in singles]
    assert len({s.choices[0].text for s in singles}) > 1  # different seeds, different samples
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens


def test_stop_and_max_tokens(client):
    free = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0).choices[0].text
    stop = free[5:7]
    got = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0, stop=[stop, "\x00\x01"])
    assert got.choices[0].text == free[:free.index(stop)]
    assert got.choices[0].finish_reason == "stop"
    short = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


def test_logprobs(client):
    got = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and len(lp.top_logprobs) == 6
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        # (a dict keyed by token text: undecodable bytes share the key '\ufffd', so <= 3 entries)
        assert 1 <= len(top) <= 3 and value <= 0
        assert value >= max(top.values()) - 1e-6  # greedy picks the most likely token
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    for c in content:
        assert c.logprob == c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob


def test_concurrent_streams_get_exactly_their_alone_answers(client):
    """Greedy and seeded requests among 11 others give the same tokens and logprobs as alone."""
    requests = [dict(prompt=f"request number {i} " * (1 + i % 3), max_tokens=10 + i % 7,
                     temperature=0.0 if i % 2 else 0.9, seed=100 + i, logprobs=1) for i in range(12)]

    def ask(kw):
        chunks = client.completions.create(model=MODEL, stream=True, **kw)
        text, lps = "", []
        for c in chunks:
            if c.choices:
                text += c.choices[0].text
                if c.choices[0].logprobs:
                    lps += c.choices[0].logprobs.token_logprobs
        return text, lps

    alone = [ask(kw) for kw in requests[:4]]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, requests))
    assert together[:4] == alone


def test_disconnect_mid_stream_frees_the_slot(server, client):
    body = {"model": MODEL, "prompt": "a long answer", "max_tokens": 100, "temperature": 0, "stream": True,
            "ignore_eos": True}
    reference = client.completions.create(model=MODEL, prompt="other", max_tokens=30, temperature=0).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(lambda: "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt="other", max_tokens=30, temperature=0, stream=True) if c.choices))
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            with http.stream("POST", server.url + "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
        assert other.result(HTTP_TIMEOUT_S) == reference

    def idle():
        return httpx.get(server.url + "/health", timeout=HTTP_TIMEOUT_S).json()["running"] == 0
    assert wait_until(idle, timeout=10)
    metrics = httpx.get(server.url + "/metrics", timeout=HTTP_TIMEOUT_S).text
    assert 'andromeda_sequences_finished_total{finish_reason="cancelled"}' in metrics


BAD = [
    ("not json", b"{bad", 400, None),
    ("wrong type", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("unknown model", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("empty prompt", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("prompt too long", {"model": MODEL, "prompt": "y" * 200}, 400, "prompt"),
    ("chat too long", {"model": MODEL, "messages": [{"role": "user", "content": "y" * 200}]}, 400, "messages"),
    ("token id outside the vocabulary", {"model": MODEL, "prompt": [1, 2, 99999]}, 400, "prompt"),
    ("max_tokens too many", {"model": MODEL, "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),
    ("n too large", {"model": MODEL, "prompt": "x", "n": 9}, 400, "n"),
    ("bad temperature", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("unsupported", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ("bad chat role", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
]


@pytest.mark.parametrize("name,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, client, name, body, status, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server.url + path, timeout=HTTP_TIMEOUT_S, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert param in (error["param"] or "")
    after = client.completions.create(model=MODEL, prompt="ok", max_tokens=2, extra_body={"ignore_eos": True})
    assert after.usage.completion_tokens == 2


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="does not fit"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1000)


def test_api_key_full_queue_and_graceful_shutdown(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / MODEL, max_seq_len=1024)
    with running_server(ckpt, "--max-batch", "1", "--max-queue", "1", "--api-key", "sesame",
                        "--shutdown-timeout", "1") as server:
        url = server.url
        assert httpx.get(url + "/v1/models", timeout=HTTP_TIMEOUT_S).status_code == 401
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", timeout=HTTP_TIMEOUT_S, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sesame", timeout=HTTP_TIMEOUT_S, max_retries=0)
        assert good.models.list().data[0].id == MODEL

        # One slot, one queue place: a long stream and a waiting one fill the server.
        long = dict(model=MODEL, prompt="p", max_tokens=1000, temperature=0, extra_body={"ignore_eos": True})

        def consume():
            text = ""
            try:
                for c in good.completions.create(stream=True, **long):
                    text += c.choices[0].text if c.choices else ""
            except openai.APIError as e:  # cancelled at shutdown: an error event ends the stream
                return text, str(e)
            return text, None

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(consume)
            assert wait_until(lambda: httpx.get(url + "/health", timeout=HTTP_TIMEOUT_S).json()["running"] == 1)
            waiting = pool.submit(consume)
            assert wait_until(lambda: httpx.get(url + "/health", timeout=HTTP_TIMEOUT_S).json()["waiting"] == 1)
            raw = {**{k: v for k, v in long.items() if k != "extra_body"}, "ignore_eos": True}
            full = httpx.post(url + "/v1/completions", json=raw, headers={"Authorization": "Bearer sesame"},
                              timeout=HTTP_TIMEOUT_S)
            assert full.status_code == 429 and full.headers["Retry-After"] == "1"
            assert full.json()["error"]["code"] == "rate_limit_exceeded"

            # SIGTERM: running requests get --shutdown-timeout (1 s) to finish, the rest are
            # cancelled with an error event, and the process exits cleanly.
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(20) == 0
            assert time.monotonic() - started < 10
            for future in (running, waiting):
                text, error = future.result(HTTP_TIMEOUT_S)
                assert error is None or "shutting down" in error
            assert len(running.result()[0]) > 0


def test_chat_answers_as_andromeda_chat_does(ckpt, client):
    """The same template, end-of-turn stop and system prompt as `andromeda chat`."""
    import io

    from andromeda.checkpoint import load_checkpoint
    from andromeda.commands.chat import Chat
    from andromeda.infer.engine import Engine
    from andromeda.infer.sampling import SamplingParams

    model, tokenizer, _ = load_checkpoint(ckpt)
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=5)
    chat = Chat(Engine(model, tokenizer), params, system="be brief", out=io.StringIO(), err=io.StringIO())
    first = chat.answer("hello")
    second = chat.answer("and then?")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    kw = dict(model=MODEL, max_tokens=6, temperature=0.7, seed=5)
    got = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    assert got.strip() == first
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
    got = client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    assert got.strip() == second


def test_a_shared_system_prompt_is_reused_and_answers_as_generate_prints(ckpt, capsys):
    """Through HTTP with prefix reuse at work (chunks of 8; one after another, then together):
    every answer is the text `andromeda generate` prints with the same prefill chunks, and the
    server's metrics show the shared positions were copied, not prefilled again."""
    system = "You are a terse assistant who answers in one line. "  # 51 bytes: 6 whole chunks
    prompts = [system + "Greet me.", system + "Name a colour.", system + "Count to three."]
    with running_server(ckpt, "--max-batch", "4", "--prefill-chunk", "8") as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", timeout=HTTP_TIMEOUT_S, max_retries=0)

        def ask(prompt):
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

        one_by_one = [ask(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(ask, prompts))
        metrics = httpx.get(s.url + "/metrics", timeout=HTTP_TIMEOUT_S).text
    reused = next(float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("andromeda_prompt_tokens_reused_total "))
    assert reused >= 48 * (len(prompts) - 1)  # at least every prompt after the first, one by one
    for prompt, first, second in zip(prompts, one_by_one, together):
        expected = generate_cli(ckpt, capsys, "--prompt", prompt, "--max-new-tokens", "12", "--temperature", "0",
                                "--prefill-chunk", "8")["text"]
        assert first == second == expected

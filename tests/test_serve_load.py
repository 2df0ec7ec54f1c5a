"""Load tests of `andromeda serve` (slow): a request among 63 others gets exactly its alone
answer, and benchmarks/serve_load.py runs end to end on a tiny model."""

import concurrent.futures
import os
import shutil

import openai
import pytest

from tests.benchmark_scripts import load_benchmark
from tests.serve_helpers import running_server, tiny_checkpoint

HTTP_TIMEOUT_S = 120


@pytest.mark.slow
def test_64_concurrent_streams_each_get_their_alone_answer(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    with running_server(ckpt, "--max-batch", "16", "--max-queue", "128") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=HTTP_TIMEOUT_S, max_retries=0)
        requests = [dict(prompt=f"{i} " * (1 + i % 9), max_tokens=8 + i % 13, temperature=0.0 if i % 2 else 1.0,
                         seed=i, logprobs=1, extra_body={"ignore_eos": True}) for i in range(64)]

        def ask(kw):
            text, lps = "", []
            for c in client.completions.create(model="tiny", stream=True, **kw):
                if c.choices:
                    text += c.choices[0].text
                    lps += (c.choices[0].logprobs.token_logprobs if c.choices[0].logprobs else [])
            return text, lps

        alone = [ask(kw) for kw in requests]
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            together = list(pool.map(ask, requests))
        assert together == alone
        assert all(len(lps) == kw["max_tokens"] for (_, lps), kw in zip(alone, requests))


def test_benchmark_summary_counts_tokens_and_percentiles():
    bench = load_benchmark("serve_load")
    results = [{"start": 0.0, "stamps": [0.1, 0.2, 0.4], "tokens": 3},
               {"start": 1.0, "stamps": [1.3, 1.4], "tokens": 2}]
    out = bench.summarise(results, wall=2.0)
    assert out["tokens"] == 5 and out["tokens_per_s"] == 2.5
    assert out["ttft_p50_ms"] in (100.0, 300.0) and out["ttft_p99_ms"] == 300.0
    assert out["itl_p99_ms"] == 200.0
    requests = bench.make_requests(6)
    assert len(requests) == 6 and all(16 <= r["max_tokens"] <= 96 and r["ignore_eos"] for r in requests)
    shared = bench.make_requests(6, system=40)
    assert len({r["prompt"][:40] for r in shared}) == 1 and len({r["prompt"] for r in shared}) == 6
    assert [r["prompt"][40:] for r in shared] == [r["prompt"] for r in requests]
    with pytest.raises(SystemExit):  # a prefix that leaves no room in the context
        bench.main(["--system-prompt", "400", "--ctx", "512"])


def test_benchmark_refuses_a_server_that_generated_other_than_the_budget():
    """Throughput counts the budgets asked for; a peer whose `usage` disagrees is refused."""
    bench = load_benchmark("serve_load")
    results = [{"start": 0.0, "stamps": [0.1], "tokens": 3, "used": 3},
               {"start": 0.0, "stamps": [0.1], "tokens": 5, "used": 4}]
    with pytest.raises(SystemExit, match="1 requests generated other than their max_tokens"):
        bench.summarise(results, wall=1.0)


def test_benchmark_refuses_a_missing_llama_server(tmp_path):
    bench = load_benchmark("serve_load")
    with pytest.raises(SystemExit, match="not an executable file"):
        bench.LlamaServer(str(tmp_path / "llama-server"), tmp_path, tmp_path, slots=2, threads=1, ctx=64)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(os.environ.get("LLAMA_SERVER", "llama-server")),
                    reason="llama.cpp's llama-server is not on PATH (or in $LLAMA_SERVER)")
def test_benchmark_runs_the_same_load_against_llama_server(capsys):
    bench = load_benchmark("serve_load")
    binary = shutil.which(os.environ.get("LLAMA_SERVER", "llama-server"))
    assert bench.main(["--dim", "32", "--depth", "1", "--heads", "2", "--hidden", "64", "--ctx", "256",
                       "--clients", "1,2", "--per-client", "8", "--max-batch", "2", "--threads", "1",
                       "--max-seconds", "60", "--skip-baselines", "--llama-server", binary, "--json"]) == 0
    import json
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Every request generated exactly its budget on both servers (summarise checks usage).
    assert out["llama_server"]["2"]["tokens"] == out["levels"]["2"]["tokens"]
    assert out["ratio_vs_llama_server"]["2"] > 0


@pytest.mark.slow
def test_benchmark_runs_end_to_end_on_a_tiny_model(capsys):
    bench = load_benchmark("serve_load")
    assert bench.main(["--dim", "32", "--depth", "1", "--heads", "2", "--hidden", "64", "--ctx", "256",
                       "--clients", "1,2", "--per-client", "1", "--max-batch", "2", "--threads", "1",
                       "--max-seconds", "60", "--json"]) == 0
    import json
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["invariant_under_load"] is True
    assert out["levels"]["2"]["requests"] == 16 and out["ratio_vs_one_at_a_time"] > 0


@pytest.mark.slow
def test_compiled_server_answers_as_the_eager_one(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    answers = []
    for extra in ([], ["--compile"]):
        with running_server(ckpt, "--max-batch", "4", *extra) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)
            got = client.completions.create(model="tiny", prompt="hello there", max_tokens=12, temperature=0, n=2,
                                            logprobs=0)
            answers.append([(c.text, c.logprobs.token_logprobs) for c in got.choices])
    assert [t for t, _ in answers[0]] == [t for t, _ in answers[1]]
    for (_, eager), (_, compiled) in zip(*answers):
        assert compiled == pytest.approx(eager, abs=1e-4)

"""Load on `andromeda serve`: C concurrent streaming clients against one-at-a-time and static batches.

Builds a Llama-shaped model (6 layers, dim 384, 6 heads, SwiGLU 1024, byte vocabulary, random
weights, float32, context 512), saves it as a checkpoint and starts `andromeda serve` on
127.0.0.1 (a free port). A fixed list of requests with varied prompt lengths (lines of
Tiny Shakespeare when ../shared/data has it, else generated text) and varied output lengths
(`ignore_eos`, so every request generates exactly its budget) is then served:

- at each concurrency C in --clients: C clients stream requests (C x --per-client of them);
  generated tokens/s over the wall time, time to first token and inter-token latency p50/p99;
- one at a time: the requests of the largest C <= 16 level, sequentially, through a second
  server started with --baseline-args (default `--no-batch-invariance`: the fastest way to
  serve one request) and through the measured server itself;
- static batches: the same requests in batches of C through `Engine.generate` in this
  process (each batch runs until its longest request is done; only requested tokens count);
- batch-invariance check: a greedy request's logprobs alone and among the C=16 load, bitwise;
- with --llama-server PATH: the same levels and requests against llama.cpp's own server binary
  (`llama-server`, built from llama.cpp's source) on the same weights exported as an f32 GGUF,
  with --max-batch parallel slots of --ctx tokens each (continuous batching) and the same
  thread count. It holds back partial UTF-8 characters and sends no per-token chunk for them,
  so for it only throughput is measured (tokens counted from its `usage`), not TTFT or ITL.

Every wait has a timeout; each level stops after --max-seconds.

    .venv/bin/python benchmarks/serve_load.py [--clients 1,4,16,64] [--max-batch 16] [--threads 2] [--json]
    .venv/bin/python benchmarks/serve_load.py --server-args="--no-batch-invariance"   (the cost of invariance)
    .venv/bin/python benchmarks/serve_load.py --llama-server ~/llama.cpp/build/bin/llama-server --clients 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from andromeda.threads import choose_wait_policy

# The same OpenMP wait policy as the CLI, chosen before torch loads; the servers inherit it
# through the environment, so both sides of every comparison wait the same way.
choose_wait_policy()

import httpx  # noqa: E402
import torch  # noqa: E402

from andromeda.checkpoint import save_checkpoint  # noqa: E402
from andromeda.data.tokenizer import ByteTokenizer  # noqa: E402
from andromeda.model.config import ModelConfig  # noqa: E402
from andromeda.model.transformer import Transformer  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MODEL = "bench"
# httpx's async transport leaves Nagle's algorithm on: it writes a request's headers and body
# separately, and the body then waits for the server's delayed ACK (~40 ms on Linux). curl and
# the sync client do not; every client of this benchmark turns it off.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def build_checkpoint(folder: Path, dim: int, depth: int, heads: int, hidden: int, ctx: int) -> Path:
    from andromeda.presets import get_preset

    cfg: ModelConfig = get_preset("llama-tiny")
    cfg.dim, cfg.depth, cfg.max_seq_len = dim, depth, ctx
    cfg.attention.heads, cfg.attention.kv_heads = heads, heads
    cfg.mlp.hidden_dim = hidden
    torch.manual_seed(0)
    save_checkpoint(folder, Transformer(cfg), ByteTokenizer())
    return folder


def make_requests(n: int, seed: int = 0, system: int = 0) -> list[dict]:
    """Prompts of 8..160 bytes, outputs of 16..96 tokens, half greedy, half seeded sampling;
    with `system`, every prompt starts with the same `system` bytes (a shared system prompt)."""
    rng = random.Random(seed)
    text = SHAKESPEARE.read_text()[:200_000] if SHAKESPEARE.exists() else " ".join(
        f"word{i % 97}" for i in range(40_000))
    prefix = text[-system:] if system else ""
    out = []
    for i in range(n):
        start = rng.randrange(0, len(text) - 200)
        prompt = prefix + text[start:start + rng.randint(8, 160)]
        sampled = i % 2 == 1
        out.append({"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(16, 96),
                    "temperature": 0.8 if sampled else 0.0, "seed": i, "ignore_eos": True, "stream": True,
                    # A random byte-level model writes partial UTF-8 characters, whose text is
                    # held back until complete; with logprobs every token sends a chunk at once.
                    "logprobs": 0})
    return out


class Server:
    def __init__(self, ckpt: Path, max_batch: int, threads: int, extra: list[str], start_timeout: float = 300):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "andromeda", "serve", "--ckpt", str(ckpt), "--port", "0", "--max-batch",
               str(max_batch), "--max-queue", "1024", "--threads", str(threads), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        found: list[str] = []

        def read():
            for line in self.proc.stdout:
                found.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + start_timeout  # with --compile it compiles before listening
        while not any("http://" in line for line in found):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"the server did not start within {start_timeout:.0f} s (--start-timeout)")
            time.sleep(0.1)
        self.url = re.search(r"http://[0-9.]+:\d+", "".join(found)).group(0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """llama.cpp's `llama-server` on an f32 GGUF export of the same checkpoint: `slots`
    parallel sequences of `ctx` tokens each, continuous batching (its default)."""

    def __init__(self, binary: str, ckpt: Path, folder: Path, slots: int, threads: int, ctx: int,
                 start_timeout: float = 120):
        from andromeda.checkpoint import load_checkpoint
        from andromeda.interop.gguf import export_gguf

        if not (Path(binary).is_file() and os.access(binary, os.X_OK)):
            raise SystemExit(f"--llama-server {binary}: not an executable file (build llama.cpp's `llama-server`)")
        model, tokenizer, _ = load_checkpoint(ckpt)
        gguf = folder / f"{MODEL}-f32.gguf"
        export_gguf(model, tokenizer, gguf, "f32")
        port = free_port()
        cmd = [binary, "-m", str(gguf), "-a", MODEL, "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(ctx * slots), "-t", str(threads), "-tb", str(threads), "--no-webui"]
        self.command = " ".join(cmd[:1] + ["-m", "FILE.gguf"] + cmd[3:])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet: ask again until the deadline
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise SystemExit(f"llama-server did not start within {start_timeout:.0f} s")
            time.sleep(0.2)

    stop = Server.stop


async def sse_lines(response: httpx.Response):
    """The lines of an event stream, split at \\n only: JSON may carry U+2028 or U+0085 raw,
    where httpx's aiter_lines (str.splitlines) would cut a chunk in two."""
    pending = b""
    async for data in response.aiter_bytes():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8")
    if pending:
        yield pending.decode("utf-8")


async def stream_one(http: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed request: arrival time of every token chunk, the logprobs if asked, and the
    completion tokens the server's `usage` reports (when it sends one)."""
    start = time.perf_counter()
    stamps, logprobs, text, used = [], [], "", None
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in sse_lines(response):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                text += choice["text"]
                if choice.get("logprobs"):  # one entry per token: the token's arrival time
                    stamps += [time.perf_counter()] * len(choice["logprobs"]["token_logprobs"])
                    logprobs += choice["logprobs"]["token_logprobs"]
    return {"start": start, "stamps": stamps, "text": text, "logprobs": logprobs, "tokens": body["max_tokens"],
            "used": used}


async def run_clients(url: str, requests: list[dict], clients: int, max_seconds: float,
                      keepalive: bool = True) -> list[dict]:
    """`clients` workers take requests from the list in order until it is empty or time is up.
    keepalive=False opens a connection per request (llama-server closes a kept-alive connection
    after a few requests, which a client that has just sent the next one sees as a failure)."""
    todo = list(enumerate(requests))
    results: list = [None] * len(requests)
    deadline = time.perf_counter() + max_seconds
    timeout = httpx.Timeout(max_seconds + 60)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=None if keepalive else 0)
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=NODELAY)
    async with httpx.AsyncClient(timeout=timeout, transport=transport) as http:
        async def worker():
            while todo and time.perf_counter() < deadline:
                i, body = todo.pop(0)
                results[i] = await stream_one(http, url, body)
        await asyncio.gather(*(worker() for _ in range(clients)))
    return [r for r in results if r is not None]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarise(results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    short = [r for r in results if r.get("used") is not None and r["used"] != r["tokens"]]
    if short:  # a server that generated other than the budget is not comparable
        raise SystemExit(f"{len(short)} requests generated other than their max_tokens (usage)")
    ttft = [r["stamps"][0] - r["start"] for r in results if r["stamps"]]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1000 * pct(ttft, 0.5), 1), "ttft_p99_ms": round(1000 * pct(ttft, 0.99), 1),
            "itl_p50_ms": round(1000 * pct(itl, 0.5), 1), "itl_p99_ms": round(1000 * pct(itl, 0.99), 1)}


def level(url: str, requests: list[dict], clients: int, max_seconds: float, latencies: bool = True,
          keepalive: bool = True) -> dict:
    started = time.perf_counter()
    results = asyncio.run(run_clients(url, requests, clients, max_seconds, keepalive))
    summary = summarise(results, time.perf_counter() - started)
    if not latencies:
        summary = {k: v for k, v in summary.items() if not k.startswith(("ttft", "itl"))}
    return summary


def llama_server_levels(binary: str, ckpt: Path, folder: Path, args, levels: list[int]) -> dict:
    """The same levels and requests against llama.cpp's server (throughput only)."""
    peer = LlamaServer(binary, ckpt, folder, args.max_batch, args.threads, args.ctx, args.start_timeout)
    results = {"command": peer.command}
    try:
        level(peer.url, make_requests(2, seed=99), 2, args.max_seconds, keepalive=False)  # warm-up
        for c in levels:
            reqs = make_requests(max(16, c * args.per_client), seed=c, system=args.system_prompt)
            results[c] = level(peer.url, reqs, c, args.max_seconds, latencies=False, keepalive=False)
            print(f"llama-server C={c}: {results[c]}", file=sys.stderr, flush=True)
    finally:
        peer.stop()
    return results


def static_batches(ckpt: Path, requests: list[dict], batch: int, threads: int) -> dict:
    """The same requests through Engine.generate in static batches of `batch` (greedy, so one
    SamplingParams fits a batch; each batch decodes until its longest budget)."""
    from andromeda.checkpoint import load_checkpoint
    from andromeda.infer.engine import Engine
    from andromeda.infer.sampling import SamplingParams

    torch.set_num_threads(threads)
    model, tokenizer, _ = load_checkpoint(ckpt)
    engine = Engine(model, tokenizer)
    started = time.perf_counter()
    tokens = 0
    for lo in range(0, len(requests), batch):
        group = requests[lo:lo + batch]
        params = SamplingParams(max_new_tokens=max(r["max_tokens"] for r in group), temperature=0,
                                stop_at_eos=False)
        engine.generate([r["prompt"] for r in group], params)
        tokens += sum(r["max_tokens"] for r in group)  # what the clients asked for
    wall = time.perf_counter() - started
    return {"requests": len(requests), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1)}


def invariance_check(url: str, load: list[dict], max_seconds: float) -> bool:
    probe = {"model": MODEL, "prompt": "Invariance probe: the same request alone and under load.", "max_tokens": 24,
             "temperature": 0.0, "ignore_eos": True, "stream": True, "logprobs": 0}

    async def both():
        transport = httpx.AsyncHTTPTransport(socket_options=NODELAY)
        async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds + 60), transport=transport) as http:
            alone = await stream_one(http, url, probe)
            loaded = await asyncio.gather(stream_one(http, url, probe),
                                          *(stream_one(http, url, dict(r)) for r in load))
            return alone, loaded[0]

    alone, loaded = asyncio.run(both())
    return alone["logprobs"] == loaded["logprobs"] and alone["text"] == loaded["text"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,4,16,64")
    p.add_argument("--per-client", type=int, default=8,
                   help="requests per client at each level (at least 16 in all; fewer weigh the ramp up and down more)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=240, help="time limit of each level")
    p.add_argument("--server-args", default="", help="extra options for `andromeda serve`, e.g. --no-batch-invariance")
    p.add_argument("--baseline-args", default="--no-batch-invariance",
                   help="options of the server that serves the one-at-a-time baseline")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--start-timeout", type=float, default=300,
                   help="seconds a server may take to listen (with --compile it compiles every decode shape first)")
    p.add_argument("--system-prompt", type=int, default=0, metavar="BYTES",
                   help="start every prompt with the same BYTES bytes (prefix reuse; with a --prefill-chunk "
                        "in --server-args no longer than it)")
    p.add_argument("--llama-server", metavar="PATH", default=None,
                   help="llama.cpp's llama-server binary: also run the levels against it on the same weights")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    if args.system_prompt < 0 or args.system_prompt + 160 + 96 > args.ctx:
        p.error(f"--system-prompt {args.system_prompt}: prompts (system + up to 160 bytes) and outputs (up to 96 "
                f"tokens) must fit the context of {args.ctx}")

    out = {"machine": cpu_name(), "load_average_at_start": os.getloadavg()[0], "threads": args.threads,
           "max_batch": args.max_batch, "server_args": args.server_args, "system_prompt": args.system_prompt,
           "model": f"{args.depth}x{args.dim} llama, hidden {args.hidden}, ctx {args.ctx}, float32", "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(Path(tmp) / MODEL, args.dim, args.depth, args.heads, args.hidden, args.ctx)
        server = Server(ckpt, args.max_batch, args.threads, shlex.split(args.server_args), args.start_timeout)
        baseline = None
        try:
            if not args.skip_baselines:
                baseline = Server(ckpt, args.max_batch, args.threads, shlex.split(args.baseline_args),
                                  args.start_timeout)
                level(baseline.url, make_requests(2, seed=99), 1, args.max_seconds)  # warm-up
            level(server.url, make_requests(2, seed=99), 2, args.max_seconds)  # warm-up
            for c in levels:
                reqs = make_requests(max(16, c * args.per_client), seed=c, system=args.system_prompt)
                out["levels"][c] = level(server.url, reqs, c, args.max_seconds)
                print(f"C={c}: {out['levels'][c]}", file=sys.stderr, flush=True)
            base_c = max([c for c in levels if c <= 16] or [levels[0]])
            base_reqs = make_requests(max(16, base_c * args.per_client), seed=base_c, system=args.system_prompt)
            if not args.skip_baselines:
                one = level(baseline.url, base_reqs, 1, args.max_seconds)
                out["one_at_a_time"] = dict(one, clients_compared=base_c, server_args=args.baseline_args)
                print(f"one at a time ({args.baseline_args}): {one}", file=sys.stderr, flush=True)
                same = level(server.url, base_reqs, 1, args.max_seconds)
                out["one_at_a_time_same_server"] = same
                print(f"one at a time (measured server): {same}", file=sys.stderr, flush=True)
            out["invariant_under_load"] = invariance_check(server.url, make_requests(15, seed=7), args.max_seconds)
        finally:
            server.stop()
            if baseline is not None:
                baseline.stop()
        if args.llama_server:
            out["llama_server"] = llama_server_levels(args.llama_server, ckpt, Path(tmp), args, levels)
        if not args.skip_baselines:
            out["static_batches"] = dict(static_batches(ckpt, base_reqs, base_c, args.threads), batch=base_c)
            print(f"static batches: {out['static_batches']}", file=sys.stderr, flush=True)
    if not args.skip_baselines:
        served = out["levels"][base_c]["tokens_per_s"]
        out["ratio_vs_one_at_a_time"] = round(served / out["one_at_a_time"]["tokens_per_s"], 2)
        out["ratio_vs_one_at_a_time_same_server"] = round(served / out["one_at_a_time_same_server"]["tokens_per_s"], 2)
        out["ratio_vs_static_batches"] = round(served / out["static_batches"]["tokens_per_s"], 2)
    if args.llama_server:
        peer = out["llama_server"]
        out["ratio_vs_llama_server"] = {c: round(out["levels"][c]["tokens_per_s"] / peer[c]["tokens_per_s"], 2)
                                        for c in levels}
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

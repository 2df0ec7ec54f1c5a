"""Serve a checkpoint over HTTP with the OpenAI API (completions and chat completions).

Many clients at once share the model through continuous batching: every decode step advances
every running request, a new request joins at the next step, a finished or cancelled one
leaves at once. A request's tokens are the same whether it runs alone or among others
(see docs/serving.md). Prints the URL when ready; Ctrl-C or SIGTERM lets running requests
finish for up to --shutdown-timeout seconds, cancels the rest, and exits.

Needs the `serve` extra: pip install "andromeda[serve]".
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

from andromeda.devices import resolve_device, resolve_dtype
from andromeda.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL printed says which)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="cache slots: sequences decoding at once (memory: this many full-context KV caches)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences that may wait for a slot; beyond it requests get 429 with Retry-After")
    p.add_argument("--api-key", default=os.environ.get("ANDROMEDA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $ANDROMEDA_API_KEY, else none)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the checkpoint folder name)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step: every shape it takes (row groups x cache spans) is compiled "
                   "at start, before the server listens")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompts are prefilled in chunks of this many tokens, between decode steps; whole chunks "
                        "another slot holds (a shared system prompt, from a running or finished request) are "
                        "reused, not recomputed")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every prompt in full, even chunks another slot holds")
    p.add_argument("--no-batch-invariance", action="store_true",
                   help="decode only the busy rows of the pool: faster at low load, but a request's numbers "
                        "then depend on how many others run")
    p.add_argument("--decode-group", type=int, default=None,
                   help="batch-invariant decoding runs the pool in products of exactly this many rows (a divisor "
                        "of --max-batch; default: all of them); smaller costs less at low load")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests may take to finish after Ctrl-C / SIGTERM")


def _check(args) -> None:
    if args.max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 0:
        raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.api_key is not None and not args.api_key:
        raise UserError("--api-key must not be empty")
    if args.decode_group is not None and (args.decode_group < 1 or args.max_batch % args.decode_group):
        raise UserError(f"--decode-group must divide --max-batch ({args.max_batch}), got {args.decode_group}")
    if args.shutdown_timeout < 0:
        raise UserError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")


def run(args) -> int:
    _check(args)
    try:
        import uvicorn

        from andromeda.serve.app import create_app
        from andromeda.serve.metrics import ServeMetrics
    except ImportError as e:
        raise UserError(f"serving needs the 'serve' extra ({e.name} is missing): "
                        "pip install 'andromeda[serve]'") from None
    import torch

    from andromeda.checkpoint import load_checkpoint
    from andromeda.infer.engine import Engine
    from andromeda.serve.scheduler import Scheduler

    # All computing happens on the scheduler thread, with the thread count chosen for this
    # command; the main thread keeps one intra-op thread so that OpenMP makes no second team
    # of workers (Scheduler.start says why that matters).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer, _ = load_checkpoint(Path(args.ckpt))
    if tokenizer is None:
        raise UserError(f"checkpoint {args.ckpt} has no tokenizer; serving text needs one")
    engine = Engine(model, tokenizer, device=device, dtype=dtype, compile=args.compile,
                    prefill_chunk=args.prefill_chunk)
    metrics = ServeMetrics()
    scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue,
                          prefill_chunk=args.prefill_chunk, batch_invariant=not args.no_batch_invariance,
                          decode_group=args.decode_group, metrics=metrics, prefix_reuse=not args.no_prefix_reuse)
    # With --compile every decode shape is compiled before the server listens, so no request
    # waits on the compiler.
    from tqdm import tqdm

    with tqdm(total=len(scheduler.step_shapes()), desc="compiling decode steps", unit="shape", file=sys.stderr,
              dynamic_ncols=True, disable=not args.compile) as bar:
        scheduler.start(threads=threads, warm_up=args.compile, progress=lambda done, total: bar.update(1))
        ready = scheduler.wait_ready()  # until it serves or its warm-up fails
    if not ready:
        if isinstance(scheduler.error, UserError):
            raise scheduler.error
        raise UserError(f"the scheduler stopped before serving: {scheduler.error!r}")
    name = args.model_name or Path(args.ckpt).resolve().name
    # The scheduler thread runs Python between its tensor operations almost all the time; with
    # the default 5 ms switch interval the HTTP thread waits that long for the GIL at every
    # turn, and streamed tokens leave in bursts. 0.5 ms keeps them flowing.
    sys.setswitchinterval(0.0005)

    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # proto IPPROTO_TCP (not 0): asyncio turns Nagle's algorithm off only on sockets that say
    # they are TCP, and uvicorn writes headers and body separately (else +40 ms per response).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    url = f"http://{host}:{port}"

    def ready():
        print(f"andromeda serve: '{name}' on {url} (OpenAI API at {url}/v1; max batch {args.max_batch})", flush=True)

    app = create_app(engine, scheduler, metrics, name, api_key=args.api_key, on_ready=ready,
                     shutdown_timeout=args.shutdown_timeout)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # uvicorn stops accepting connections and waits for open ones; requests still
            # running after --shutdown-timeout are cancelled (their clients get an error
            # event or a 503) so that every connection closes before uvicorn's own deadline.
            if not self.should_exit:
                timer = threading.Timer(args.shutdown_timeout, scheduler.stop, (5.0,))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its shutdown (the process would die of it);
            # a shutdown asked for and completed is a clean exit, status 0.
            self._captured_signals.clear()

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout + 5,
                            access_log=False)
    server = Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        scheduler.stop(args.shutdown_timeout)
    print("andromeda serve: stopped", file=sys.stderr, flush=True)
    return 0

"""The HTTP side of `andromeda serve`: a FastAPI app over a running `Scheduler`.

`create_app(engine, scheduler, metrics, model_name, api_key=None, on_ready=None)` offers
GET /health, GET /metrics, GET /v1/models, POST /v1/completions and POST
/v1/chat/completions (JSON or server-sent events with `stream: true`), with OpenAI's error
bodies: 400 bad input, 401 missing or wrong key, 404 unknown model or path, 429 full queue
(with Retry-After), 503 while shutting down. A request is tokenized and checked here, then
its sequences (n per prompt) go to the scheduler; events come back through an asyncio queue.
A client that goes away has its sequences cancelled, which frees their cache slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from andromeda.data.chat_template import END_OF_TURN, render_chat
from andromeda.errors import UserError
from andromeda.infer.sampling import SamplingParams
from andromeda.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    completion_logprobs,
    error_body,
    usage,
)
from andromeda.serve.scheduler import QueueFull, SequenceSpec, TokenEvent, Unfittable, new_request_id

POLL_S = 0.5  # how often a waiting handler checks that its client and the scheduler are still there
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _error(e: ApiError, metrics=None) -> JSONResponse:
    if metrics is not None:
        metrics.http_errors.labels(str(e.status)).inc()
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)


class _Disconnected(Exception):
    pass


def create_app(engine, scheduler, metrics, model_name: str, api_key: Optional[str] = None,
               on_ready: Optional[Callable[[], None]] = None, shutdown_timeout: float = 10.0) -> FastAPI:
    tokenizer = engine.tokenizer
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not scheduler.alive:
            scheduler.start()
        if on_ready is not None:
            on_ready()
        yield
        await asyncio.to_thread(scheduler.stop, shutdown_timeout)

    app = FastAPI(title="andromeda", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e, metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return _error(ApiError(e.status_code, str(e.detail)), metrics)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "error", "error": repr(scheduler.error)}, status_code=503)
        return {"status": "ok", "model": model_name, **scheduler.stats()}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=metrics.content_type)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "andromeda",
                "max_model_len": engine.max_seq_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        check_key(request)
        if name != model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    async def parse(request: Request, kind):
        check_key(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = kind.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None
        if req.model != model_name:
            raise ApiError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        req.refuse_unsupported()
        return req

    vocab = engine.model.cfg.vocab_size

    def prompt_ids(prompt, param: str) -> list[int]:
        """Token ids of a text prompt (as `andromeda generate` encodes it) or a list of ids;
        its length is checked against the context by the scheduler."""
        ids = tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param=param)
        return ids

    def make_specs(rid: str, req, prompts: list, max_tokens: Optional[int], extra_stop: tuple,
                   logprobs: Optional[int]) -> tuple[list[SequenceSpec], int]:
        specs, prompt_tokens = [], 0
        stops = tuple(req.stop_list()) + extra_stop
        for p_index, prompt in enumerate(prompts):
            prompt_param = "prompt" if isinstance(req, CompletionRequest) else "messages"
            ids = prompt_ids(prompt, prompt_param)
            budget = max_tokens if max_tokens is not None else engine.max_seq_len - len(ids)
            try:
                scheduler.check_fits(req.n, len(ids), budget)
            except Unfittable as e:
                param = ("n" if req.n > scheduler.max_batch else
                         prompt_param if len(ids) >= engine.max_seq_len else "max_tokens")
                raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
            prompt_tokens += len(ids)
            for j in range(req.n):
                try:
                    params = SamplingParams(max_new_tokens=max(1, budget), temperature=req.temperature,
                                            top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                                            repetition_penalty=req.repetition_penalty, stop=stops,
                                            seed=None if req.seed is None else req.seed + j,
                                            stop_at_eos=not req.ignore_eos)
                except UserError as e:
                    raise ApiError(400, str(e)) from None
                specs.append(SequenceSpec(rid, p_index * req.n + j, ids, params, req.presence_penalty,
                                          req.frequency_penalty, logprobs))
        return specs, prompt_tokens

    def submit(specs) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event):
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, event)

        try:
            scheduler.submit(specs, emit)
        except QueueFull as e:
            raise ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return queue

    async def next_event(queue: asyncio.Queue, request: Optional[Request]):
        """The next event; bounded waits, checking the scheduler (and the client, when given)."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                if not scheduler.alive and queue.empty():
                    raise ApiError(503, "the server is shutting down") from None
                if request is not None and await request.is_disconnected():
                    raise _Disconnected() from None

    async def serve(request: Request, chat: bool):
        req = await parse(request, ChatRequest if chat else CompletionRequest)
        if chat:
            try:
                text = render_chat([{"role": m.role, "content": m.text(i)} for i, m in enumerate(req.messages)],
                                   add_generation_prompt=True).text
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
            prompts, max_tokens, extra_stop, logprobs = [text], req.token_limit(), (END_OF_TURN,), req.logprob_count()
        else:
            prompts = req.prompts()
            max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
            extra_stop, logprobs = (), req.logprobs
        rid = new_request_id("chatcmpl" if chat else "cmpl")
        specs, prompt_tokens = make_specs(rid, req, prompts, max_tokens, extra_stop, logprobs)
        queue = submit(specs)
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(rid, queue, head, len(specs), prompt_tokens, chat, logprobs, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await collect(request, rid, queue, head, len(specs), prompt_tokens, chat, logprobs)

    async def collect(request, rid, queue, head, count, prompt_tokens, chat, logprobs):
        texts, entries = [[] for _ in range(count)], [[] for _ in range(count)]
        finish, completion_tokens = [None] * count, 0
        try:
            while any(f is None for f in finish):
                event = await next_event(queue, request)
                texts[event.index].append(event.text)
                if isinstance(event, TokenEvent):
                    entries[event.index].extend(zip(event.token_ids, event.logprobs))
                else:
                    if event.finish_reason == "cancelled":
                        raise ApiError(503, "the server is shutting down; the request was cancelled")
                    finish[event.index] = event.finish_reason
                    completion_tokens += event.completion_tokens
        except _Disconnected:
            scheduler.cancel(rid)
            return Response(status_code=499)  # nobody reads it: the client has gone
        except (ApiError, asyncio.CancelledError):
            scheduler.cancel(rid)
            raise
        choices = []
        for i in range(count):
            text = "".join(texts[i])
            lp = None
            if logprobs is not None:
                lp = chat_logprobs(tokenizer, entries[i]) if chat else completion_logprobs(tokenizer, entries[i])
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish[i]})
        return dict(head, choices=choices, usage=usage(prompt_tokens, completion_tokens))

    async def stream(rid, queue, head, count, prompt_tokens, chat, logprobs, include_usage):
        head = dict(head, object="chat.completion.chunk" if chat else "text_completion")
        offsets = [0] * count

        def chunk(choices, **extra) -> str:
            body = dict(head, choices=choices, **extra)
            if include_usage and "usage" not in body:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def choice(index, text, entries, finish_reason=None) -> dict:
            lp = None
            if logprobs is not None and entries:
                if chat:
                    lp = chat_logprobs(tokenizer, entries)
                else:
                    lp = completion_logprobs(tokenizer, entries, offsets[index])
                    offsets[index] += sum(len(t) for t in lp["tokens"])
            if chat:
                delta = {"content": text} if text or finish_reason is None else {}
                return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

        done, completion_tokens = 0, 0
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(count)])
            while done < count:
                event = await next_event(queue, None)
                if isinstance(event, TokenEvent):
                    if event.text or event.logprobs:
                        yield chunk([choice(event.index, event.text, list(zip(event.token_ids, event.logprobs)))])
                    continue
                if event.finish_reason == "cancelled":
                    body = error_body(503, "the server is shutting down; the request was cancelled")
                    yield f"data: {json.dumps(body)}\n\n"
                    return
                done += 1
                completion_tokens += event.completion_tokens
                yield chunk([choice(event.index, event.text, [], event.finish_reason)])
            if include_usage:
                yield chunk([], usage=usage(prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield f"data: {json.dumps(error_body(e.status, e.message))}\n\n"
        finally:
            if done < count:  # the client went away (or the server stops): free the slots now
                scheduler.cancel(rid)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app

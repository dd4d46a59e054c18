"""The HTTP side: FastAPI routes in OpenAI's shapes, SSE streaming, errors, the API key.

Handlers tokenize, queue a Request with the scheduler and turn the token ids it sends back into
text (incrementally, holding back what could still become a `stop` string or an unfinished
UTF-8 character). Every error leaves as {"error": {...}} with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loralab.engine.continuous import Sampling
from loralab.serve import schemas
from loralab.serve.scheduler import Request as Job
from loralab.serve.schemas import ServeError
from loralab.serve.text import TextSink

DISCONNECT_POLL_S = 0.5  # a non-streaming handler checks this often whether its client left


@dataclass
class ServerState:
    tokenizer: Any
    scheduler: Any
    registry: Any
    metrics: Any
    stop_ids: list[int]
    max_len: int
    default_max_tokens: int
    timeout_s: float
    api_key: str | None
    engine: str


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="loralab serve", docs_url=None, redoc_url=None)
    app.state.serve = state
    _error_handlers(app)
    auth = [Depends(_authorize)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "engine": state.engine, "models": state.registry.names()}

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> PlainTextResponse:
        sched = state.scheduler
        text = state.metrics.render(sched.queue_length(), len(sched.running),
                                    len(state.registry.adapters))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        reg, now = state.registry, int(state.metrics.started)
        data = [{"id": reg.base_name, "object": "model", "created": now, "owned_by": "loralab",
                 "root": reg.base_path, "parent": None}]
        data += [{"id": a.name, "object": "model", "created": now, "owned_by": "loralab",
                  "root": str(a.path), "parent": reg.base_name}
                 for a in reg.listed()]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters", dependencies=auth)
    async def adapters() -> dict[str, Any]:
        reg = state.registry
        return {"adapters": [{"name": a.name, "path": str(a.path), "bytes": a.nbytes,
                              "system_prompt": a.system_prompt}
                             for a in reg.listed()],
                "max_adapters": reg.max_adapters, "max_bytes": reg.max_bytes}

    @app.post("/v1/adapters", dependencies=auth, status_code=201)
    async def load_adapter(body: schemas.AdapterLoad) -> dict[str, Any]:
        from pathlib import Path

        loaded = await state.registry.load(body.name, Path(body.path))
        return {"loaded": [a.name for a in loaded]}

    @app.delete("/v1/adapters/{name:path}", dependencies=auth)
    async def unload_adapter(name: str) -> dict[str, Any]:
        adapter = await state.registry.unload(name)
        return {"unloaded": adapter.name}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: schemas.ChatRequest, request: Request) -> Any:
        return await _chat(state, body, request)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: schemas.CompletionRequest, request: Request) -> Any:
        return await _completion(state, body, request)

    return app


async def _authorize(request: Request) -> None:
    key = request.app.state.serve.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise ServeError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                         "invalid_api_key")


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif where:
            message = f"{'.'.join(where)}: {message}"
        body = schemas.error_body(400, message, first.get("type"), ".".join(where) or None)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(schemas.error_body(exc.status_code, str(exc.detail)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        message = f"internal error: {type(exc).__name__}: {exc}"[:300]
        return JSONResponse(schemas.error_body(500, message), status_code=500)


# ---------------------------------------------------------------- generation


def _submit(state: ServerState, model: str, prompt_ids: list[int], body: Any) -> Job:
    """Check the request against the model and the context, then queue it (429 when full)."""
    adapter = state.registry.resolve(model)
    n, limit = len(prompt_ids), body.limit()
    if n == 0:
        raise ServeError(400, "the prompt is empty", "invalid_prompt", "prompt")
    if n >= state.max_len or (limit is not None and n + limit > state.max_len):
        raise ServeError(400, f"the prompt has {n} tokens and {limit or 1} new ones were asked: "
                         f"the context is {state.max_len} tokens (--max-len)",
                         "context_length_exceeded", "messages")
    max_tokens = min(limit or state.default_max_tokens, state.max_len - n)
    job = Job(prompt_ids, model, adapter.id if adapter else 0, max_tokens,
              Sampling(body.temperature, body.top_p, body.seed),
              time.monotonic() + state.timeout_s, asyncio.get_running_loop())
    state.metrics.received(model, n)
    if not state.scheduler.submit(job):
        state.metrics.rejected(model, "rejected")
        raise ServeError(429, "the server is busy: its request queue is full, retry later",
                         "queue_full")
    return job


async def _pump(state: ServerState, job: Job, sink: TextSink, request: Request | None):
    """(new text, finish reason or None) as the scheduler's events come in."""
    check_at = time.monotonic() + DISCONNECT_POLL_S
    while True:
        if request is None:  # streamed: sse-starlette notices a disconnect and cancels us
            event = await job.events.get()
        else:
            try:
                event = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
        if request is not None and time.monotonic() >= check_at:
            check_at = time.monotonic() + DISCONNECT_POLL_S
            if await request.is_disconnected():
                state.scheduler.cancel(job)
                return
        if event is None:
            continue
        while event[0] == "tokens" and not job.events.empty():
            # behind the scheduler (a busy server): take every token waiting, one decode
            # and one chunk for all of them
            following = job.events.get_nowait()
            if following[0] != "tokens":
                job.events.put_nowait(following)  # nothing else is queued behind it
                break
            event = ("tokens", event[1] + following[1])
        if event[0] == "tokens":
            delta = sink.feed(event[1])
            if sink.stopped:
                job.stopped_by_text = True
                state.scheduler.cancel(job)
                yield delta, "stop"
                return
            yield delta, None
        elif event[0] == "done":
            yield sink.flush(), event[1]
            return
        else:
            raise ServeError(event[1], event[2], "engine_error" if event[1] >= 500 else None)


def _usage(job: Job) -> dict[str, int]:
    return schemas.usage(len(job.prompt_ids), job.generated)


async def _collect(state: ServerState, job: Job, sink: TextSink, request: Request
                   ) -> tuple[str, str]:
    parts, finish = [], "length"
    try:
        async for delta, reason in _pump(state, job, sink, request):
            parts.append(delta)
            finish = reason or finish
    finally:
        state.scheduler.cancel(job)  # a no-op once it finished; frees its row otherwise
    return "".join(parts), finish


def _render_chat(state: ServerState, body: schemas.ChatRequest) -> list[int]:
    from loralab.data.render import render_prompt

    adapter = state.registry.resolve(body.model)
    try:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
    except ValueError as exc:
        raise ServeError(400, str(exc), "invalid_content", "messages") from None
    has_system = any(m["role"] == "system" for m in messages)
    system = None if has_system or adapter is None else adapter.system_prompt
    text = render_prompt(state.tokenizer, system, messages)
    return state.tokenizer(text, add_special_tokens=False)["input_ids"]


async def _chat(state: ServerState, body: schemas.ChatRequest, request: Request) -> Any:
    job = _submit(state, body.model, _render_chat(state, body), body)
    sink = TextSink(state.tokenizer, body.stops(), state.stop_ids)
    rid = schemas.new_id("chatcmpl")
    if not body.stream:
        text, finish = await _collect(state, job, sink, request)
        return schemas.chat_response(rid, body.model, text, finish, _usage(job))

    def chunk(delta: str | None, finish: str | None, usage: dict | None = None) -> dict:
        if usage is not None:
            return schemas.chat_chunk(rid, body.model, {}, None, usage)
        return schemas.chat_chunk(rid, body.model, {"content": delta} if delta else {}, finish)

    first = schemas.chat_chunk(rid, body.model, {"role": "assistant", "content": ""}, None)
    return _stream(state, job, sink, chunk, body.include_usage(), first)


def _stream(state: ServerState, job: Any, sink: TextSink, chunk: Any, with_usage: bool,
            first: dict | None = None) -> EventSourceResponse:
    """Server-sent events of one request: `first`, a chunk per piece of text (and the finish
    reason), the usage chunk when asked for, [DONE]; an error mid-stream ends it in OpenAI's
    error shape. `chunk(delta, finish, usage=None)` shapes a chunk for the endpoint."""

    text = _TextFrames(chunk)

    async def events():
        try:
            if first is not None:
                yield _frame(json.dumps(first))
            async for delta, finish in _pump(state, job, sink, None):
                if finish:
                    yield _frame(json.dumps(chunk(delta, finish), ensure_ascii=False))
                elif delta:
                    yield text.frame(delta)
            if with_usage:
                yield _frame(json.dumps(chunk(None, None, _usage(job))))
            yield _frame("[DONE]")
        except ServeError as exc:
            yield _frame(json.dumps(exc.body()))
        finally:
            state.scheduler.cancel(job)

    return _EventStream(events(), ping=15)


def _frame(data: str) -> bytes:
    """One SSE event of one data line (JSON or [DONE]: no line break), as sse-starlette's."""
    return b"data: " + data.encode() + b"\r\n\r\n"


class _TextFrames:
    """The SSE frames of a stream's text chunks, chunk(delta, None): the chunk's JSON is cut
    around a mark once a second (its "created" changes) and each delta is one json.dumps
    between the two halves, the bytes json.dumps(chunk(delta, None)) would give."""

    MARK = "\x00loralab-delta\x00"

    def __init__(self, chunk: Any) -> None:
        self.chunk, self.second, self.halves = chunk, -1, None

    def frame(self, delta: str) -> bytes:
        second = int(time.time())
        if second != self.second:
            whole = json.dumps(self.chunk(self.MARK, None), ensure_ascii=False)
            mark = json.dumps(self.MARK, ensure_ascii=False)
            self.halves = whole.split(mark) if whole.count(mark) == 1 else None
            self.second = second
        if self.halves is None:
            return _frame(json.dumps(self.chunk(delta, None), ensure_ascii=False))
        head, tail = self.halves
        return _frame(head + json.dumps(delta, ensure_ascii=False) + tail)


class _EventStream(EventSourceResponse):
    """Without sse-starlette's anyio cancel scope per event when no send timeout is set."""

    async def _send_with_timeout(self, send: Any, message: Any) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def _completion_ids(state: ServerState, body: schemas.CompletionRequest) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        vocab = len(state.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise ServeError(400, "a prompt token id is outside the vocabulary", None, "prompt")
        return list(prompt)
    text = prompt[0] if isinstance(prompt, list) else prompt
    return state.tokenizer(text, add_special_tokens=False)["input_ids"]


async def _completion(state: ServerState, body: schemas.CompletionRequest,
                      request: Request) -> Any:
    job = _submit(state, body.model, _completion_ids(state, body), body)
    sink = TextSink(state.tokenizer, body.stops(), state.stop_ids)
    rid = schemas.new_id("cmpl")
    if not body.stream:
        text, finish = await _collect(state, job, sink, request)
        return schemas.completion_response(rid, body.model, text, finish, _usage(job))

    def chunk(delta: str | None, finish: str | None, usage: dict | None = None) -> dict:
        return schemas.completion_response(rid, body.model, delta, finish, usage)

    return _stream(state, job, sink, chunk, body.include_usage())

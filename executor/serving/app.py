"""The HTTP endpoints: OpenAI's chat and text completions (streamed as server-sent events or not),
the model list, health and Prometheus metrics, in front of one `EngineLoop`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from executor.engine import Sampling
from executor.serving.detokenize import IncrementalText
from executor.serving.loop import Delta, Done, EngineLoop, Event, Failed, Job
from executor.serving.metrics import CONTENT_TYPE, ServingMetrics
from executor.serving.protocol import (SESSION_HEADER, ApiError, ChatRequest, CompletionRequest, parse)
from executor.tokenizer import render_chat

log = logging.getLogger("pensieve.serve")
DISCONNECT_POLL_S = 0.2  # how often a waiting non-streamed request checks that its client is still there


@dataclass
class ServeState:
    """What the endpoints need: the engine loop, text to ids and back, and the defaults of a request."""

    loop: EngineLoop
    metrics: ServingMetrics
    tokenizer: Any
    model_name: str
    max_context: int
    vocab_size: int
    max_tokens: int = 256  # when a request gives none (capped to the context left)
    temperature: float = 0.0  # when a request gives none: greedy unless the server says otherwise
    top_p: float = 1.0


def build_app(state: ServeState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield  # whoever serves the app runs the engine loop (pensieve serve: on the main thread)
        # In-flight requests had the graceful-shutdown time to finish; what is left is cancelled.
        await asyncio.to_thread(state.loop.stop)

    app = FastAPI(title="pensieve serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {exc!r}").body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if state.loop.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped", "error": repr(state.loop.failure)}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "pensieve", "max_model_len": state.max_context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatRequest, await _json(request))
        _check_model(state, body.model)
        text = render_chat(state.tokenizer, body.chat(), add_generation_prompt=True)
        ids = state.tokenizer.encode(text, add_special_tokens=False)
        return await _serve(state, request, body, ids, "messages", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await _json(request))
        _check_model(state, body.model)
        if isinstance(body.prompt, str):
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=True)
        else:
            ids = list(body.prompt)
            bad = [t for t in ids if not 0 <= t < state.vocab_size]
            if bad:
                raise ApiError(400, f"prompt token ids must be in [0, {state.vocab_size}); got {bad[0]}", "prompt",
                               "invalid_value")
        return await _serve(state, request, body, ids, "prompt", chat=False)

    return app


async def _json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    return body


def _check_model(state: ServeState, name: str) -> None:
    if name != state.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                       "model", "model_not_found")


def _job(state: ServeState, request: Request, body, ids: list[int], param: str, sink: _Events) -> Job:
    """The engine's job for a request, after the checks that need no engine (context, limits)."""
    if not ids:
        raise ApiError(400, "the prompt is empty", param, "invalid_value")
    room = state.max_context - len(ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(state.max_tokens, room)
    if room < 1 or max_tokens > room:
        raise ApiError(400, f"this model's context is {state.max_context} tokens, but the prompt has {len(ids)} "
                            f"and max_tokens asks for {max_tokens} more ({len(ids) + max_tokens}); shorten the "
                            "prompt or lower max_tokens", param, "context_length_exceeded")
    if body.min_tokens > max_tokens:
        raise ApiError(400, f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens",
                       "invalid_value")
    sampling = Sampling(temperature=state.temperature if body.temperature is None else body.temperature,
                        top_p=state.top_p if body.top_p is None else body.top_p, seed=body.seed,
                        min_tokens=body.min_tokens)
    session = request.headers.get(SESSION_HEADER) or body.session_id
    return Job(list(ids), max_tokens, sampling, sink, IncrementalText(state.tokenizer, body.stop),
               ignore_eos=body.ignore_eos, session=session, arrival=time.perf_counter())


async def _serve(state: ServeState, request: Request, body, ids: list[int], param: str, chat: bool) -> Response:
    if not state.loop.alive:
        raise ApiError(503, "the engine is not running", None, "engine_stopped")
    events = _Events(asyncio.get_running_loop())
    job = _job(state, request, body, ids, param, events)
    state.loop.submit(job)
    shape = _Shape(state.model_name, chat, body.return_token_ids, ids)
    # The first event decides the status: a turn the engine refuses is a 4xx, not a broken stream.
    first = await events.next(request, state, job)
    if first is None:
        return Response(status_code=499)  # the client left; nobody reads this
    if isinstance(first, Failed):
        raise ApiError(first.status, first.message, first.param)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(state, request, job, events, first, shape, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, token_ids, event = [], [], first
    while not isinstance(event, Done):
        if isinstance(event, Failed):
            raise ApiError(event.status, event.message, event.param)
        text.append(event.text)
        token_ids += event.token_ids
        event = await events.next(request, state, job)
        if event is None:
            return Response(status_code=499)
    return JSONResponse(shape.whole("".join(text), token_ids, event))


class _Events:
    """A job's events, put by the engine thread and read on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._getter: asyncio.Future | None = None

    def emit(self, event: Event) -> None:
        """From the engine thread."""
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def put(self, event: Event) -> None:
        """On the event loop."""
        self.queue.put_nowait(event)

    async def next(self, request: Request, state: ServeState, job: Job) -> Event | None:
        """The next event; None (and the job cancelled) when the client disconnects while waiting.
        One `get` stays pending across the polls, so that no event is lost to a timeout."""
        while True:
            if self._getter is None:
                self._getter = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._getter}, timeout=DISCONNECT_POLL_S)
            if done:
                event, self._getter = self._getter.result(), None
                return event
            if await request.is_disconnected():
                self._getter.cancel()
                state.loop.cancel(job)
                return None

    async def get(self) -> Event:
        return await self.queue.get()


async def _stream(state: ServeState, request: Request, job: Job, events: _Events, first: Event,
                  shape: _Shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the role, text deltas, the finish reason, usage if asked, then [DONE].

    A client that disconnects cancels this generator (Starlette does); the job is then cancelled
    and ends at its next token, its text so far kept as the conversation's history."""
    done = False
    try:
        if shape.chat:
            yield _sse(shape.chunk({"role": "assistant", "content": ""}, None))
        event = first
        while True:
            if isinstance(event, Delta):
                if event.text or (shape.token_ids and event.token_ids):
                    yield _sse(shape.chunk_text(event.text, event.token_ids))
            elif isinstance(event, Failed):
                yield _sse(ApiError(event.status, event.message, event.param).body())
                break
            else:
                yield _sse(shape.chunk_end(event.finish_reason))
                if include_usage:
                    yield _sse(shape.usage_chunk(event.usage))
                break
            event = await events.get()
        done = True
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            state.loop.cancel(job)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _Shape:
    """OpenAI's response objects for one request (chat or text completion)."""

    def __init__(self, model: str, chat: bool, token_ids: bool, prompt_ids: list[int]) -> None:
        self.model, self.chat, self.token_ids, self.prompt_ids = model, chat, token_ids, prompt_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, delta: dict, finish_reason: str | None) -> dict:
        return self._envelope([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], True)

    def chunk_text(self, text: str, token_ids: list[int]) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        if self.token_ids:
            choice["token_ids"] = token_ids
        return self._envelope([choice], True)

    def chunk_end(self, finish_reason: str) -> dict:
        if self.chat:
            return self.chunk({}, finish_reason)
        return self._envelope([{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}], True)

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope([], True), "usage": usage}

    def whole(self, text: str, token_ids: list[int], done: Done) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        if self.token_ids:
            choice["token_ids"] = token_ids
        out = {**self._envelope([choice], False), "usage": done.usage}
        if self.token_ids:
            out["prompt_token_ids"] = self.prompt_ids
        return out

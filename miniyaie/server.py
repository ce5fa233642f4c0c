"""OpenAI-compatible HTTP API over an EngineThread.

``create_api(engine_thread)`` returns a FastAPI app with ``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, ``/health`` and ``/metrics``. The demo mounts Gradio onto
the same app, so API traffic shows up live in the engine views.

How a request flows here: validate the body (pydantic) and build SamplingParams (bad values →
400) → tokenize under the engine lock, so the prompt length is known before anything is queued →
submit one engine request per (prompt, choice) → merge their output queues → answer as JSON or
as SSE chunks. Whatever way the exchange ends (done, client gone, server stopping), requests
still running are aborted so their KV blocks go back at once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import math
import os
import re
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from miniyaie.engine import QueueFull
from miniyaie.engine_thread import EngineThread, RequestHandle
from miniyaie.request import RequestOutput, SamplingParams, TokenChoice

API_KEY_ENV = "MINIYAIE_API_KEY"
MODEL_NAME_ENV = "MINIYAIE_SERVED_MODEL_NAME"
MAX_BODY_BYTES_ENV = "MINIYAIE_MAX_BODY_BYTES"
MAX_CONCURRENT_ENV = "MINIYAIE_API_MAX_CONCURRENT_PER_CLIENT"
DEBUG_ROUTES_ENV = "MINIYAIE_DEBUG_ROUTES"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 8k-token prompt as text or ids is ~50 kB
MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI-style servers clip to this
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


# ---- errors ------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bad_value(err: ValueError, default_param: Optional[str] = None) -> APIError:
    """SamplingParams / Engine.add_request raise ValueError naming the field: point `param` at it."""
    message = str(err)
    match = re.search(r"SamplingParams\.(\w+)", message)
    param = match.group(1) if match else ("max_tokens" if "max_tokens" in message else default_param)
    return APIError(400, message, param=param)


def _validation_error(err: RequestValidationError) -> APIError:
    first = err.errors()[0] if err.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}")
    return APIError(400, f"{where}: {first.get('msg', 'invalid request')}" if where else
                    f"invalid request body: {first.get('msg', '')}", param=loc[0] if loc else None)


# ---- limits --------------------------------------------------------------------------------------


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before anything parses it —
    at once when ``Content-Length`` says so; a chunked body is read here up to the cap (then
    handed on whole), so an endless upload never reaches JSON parsing or Gradio's upload route."""

    def __init__(self, app, max_bytes: int, on_refuse: Optional[Callable[[], None]] = None) -> None:
        self.app, self.max_bytes, self.on_refuse = app, max_bytes, on_refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                return await self._refuse(scope, send, int(declared))
            return await self.app(scope, receive, send)  # the server holds the client to its length
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # gone before the body was complete
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, send, size, exact=False)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()  # later calls: disconnect detection

        await self.app(scope, replayed, send)

    async def _refuse(self, scope, send, size: int, exact: bool = True) -> None:
        if self.on_refuse is not None:
            self.on_refuse()
        got = f"{size} bytes" if exact else f"more than {self.max_bytes} bytes"
        await APIError(413, f"request body is {got}; this server accepts at most {self.max_bytes} bytes",
                       code="request_too_large").response()(scope, None, send)


class ClientSlots:
    """At most ``limit`` generation requests in flight per client (its IP address) on the API;
    0 turns it off. One event loop touches it, so no lock. Behind a proxy every user shares
    the proxy's address: leave it off there (the default)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, client: str) -> Callable[[], None]:
        """Take a slot or raise 429; returns the (idempotent) release."""
        if self.limit <= 0:
            return lambda: None
        held = self.open.get(client, 0)
        if held >= self.limit:
            raise APIError(429, f"this client already has {held} requests in flight (limit {self.limit} per "
                                f"client); wait for one to finish", type="rate_limit_error",
                           code="too_many_concurrent_requests", headers={"Retry-After": "1"})
        self.open[client] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self.open.get(client, 1) - 1
                if left > 0:
                    self.open[client] = left
                else:
                    self.open.pop(client, None)

        return release


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


# ---- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as most OpenAI servers do."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None  # extension (vLLM/SGLang)
    ignore_eos: bool = False  # extension (vLLM/SGLang)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))


class ChatBody(_Body):
    messages: list[dict[str, Any]]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None


class CompletionBody(_Body):
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked by _completion_prompts
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


def _sampling_params(body: _Body, max_tokens: Optional[int], logprobs: Optional[int],
                     seed_offset: int) -> SamplingParams:
    """OpenAI fields → SamplingParams; unset fields keep OpenAI's defaults (temperature 1)."""
    given = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
        "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
    }
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    if body.seed is not None:
        kwargs["seed"] = body.seed + seed_offset  # n choices with one seed must still differ
    return SamplingParams(stop=body.stop or [], stop_token_ids=body.stop_token_ids or [],
                          ignore_eos=body.ignore_eos, logprobs=logprobs, **kwargs)


def _chat_prompt(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages → the engine's ``{"role", "content": str}``; content parts are joined text."""
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None:
            content = ""
        if not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(400, "each message needs a string 'role' and text 'content'", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _completion_prompts(prompt: Any) -> list[Union[str, list[int]]]:
    """A string, a list of strings, token ids, or a list of token-id lists → a list of prompts."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                or all(is_ids(p) for p in prompt)):
        return list(prompt)
    raise APIError(400, "prompt must be a non-empty string, a list of strings, a list of token ids "
                        "or a list of token-id lists", param="prompt")


# ---- metrics -----------------------------------------------------------------------------------


@dataclass
class Histogram:
    """A Prometheus histogram kept in plain Python (one event loop writes it)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


@dataclass
class ServerStats:
    """What the HTTP layer itself observes (the engine's own counters live in its telemetry)."""

    requests: dict[str, int] = field(default_factory=dict)  # by endpoint
    errors: dict[int, int] = field(default_factory=dict)  # by HTTP status
    finished: dict[str, int] = field(default_factory=dict)  # choices by finish reason
    disconnects: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))


def _engine_stats(engine) -> dict[str, float]:
    """Read under the engine lock: telemetry counters, queues and the KV pool."""
    c = engine.telemetry.counters
    kv = engine.runner.kv
    return {
        "requests_finished": c.requests_finished, "generation_tokens": c.tokens_generated,
        "prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens,
        "computed_tokens": engine.num_forward_tokens, "preemptions": engine.scheduler.num_preemptions,
        "evicted_blocks": c.evicted_blocks, "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting), "kv_usage": kv.usage,
        "kv_blocks": kv.num_blocks, "kv_free_blocks": kv.num_free_blocks,
    }


def _prometheus(stats: ServerStats, engine: dict[str, float], up: bool) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[str]) -> None:
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *samples])

    metric("miniyaie_up", "gauge", "1 while the engine thread is running.", [f"miniyaie_up {int(up)}"])
    metric("miniyaie_requests_total", "counter", "Generation requests received by the API, by endpoint.",
           [f'miniyaie_requests_total{{endpoint="{k}"}} {v}' for k, v in sorted(stats.requests.items())])
    metric("miniyaie_request_errors_total", "counter", "API requests answered with an error, by HTTP status.",
           [f'miniyaie_request_errors_total{{status="{k}"}} {v}' for k, v in sorted(stats.errors.items())])
    metric("miniyaie_choices_finished_total", "counter", "API choices finished, by finish reason.",
           [f'miniyaie_choices_finished_total{{reason="{k}"}} {v}' for k, v in sorted(stats.finished.items())])
    metric("miniyaie_client_disconnects_total", "counter", "Clients that left before their answer was done.",
           [f"miniyaie_client_disconnects_total {stats.disconnects}"])
    counters = [("requests_finished", "Engine requests finished (API and demo)."),
                ("generation_tokens", "Tokens generated."),
                ("prompt_tokens", "Prompt tokens of admitted requests."),
                ("cached_tokens", "Prompt tokens served from the radix cache."),
                ("computed_tokens", "Tokens fed to the network (prefill + decode)."),
                ("preemptions", "Requests preempted for lack of KV blocks."),
                ("evicted_blocks", "KV blocks evicted from the prefix cache.")]
    for key, help in counters:
        metric(f"miniyaie_{key}_total", "counter", help, [f"miniyaie_{key}_total {int(engine[key])}"])
    hit_rate = engine["cached_tokens"] / engine["prompt_tokens"] if engine["prompt_tokens"] else 0.0
    gauges = [("num_requests_running", engine["running"], "Requests in the running batch."),
              ("num_requests_waiting", engine["waiting"], "Requests in the waiting queue."),
              ("kv_cache_usage_ratio", engine["kv_usage"], "Share of KV blocks in use (requests or cache)."),
              ("kv_blocks", engine["kv_blocks"], "KV blocks in the pool."),
              ("kv_free_blocks", engine["kv_free_blocks"], "Free KV blocks."),
              ("prefix_cache_hit_ratio", hit_rate, "Cached prompt tokens / prompt tokens.")]
    for key, value, help in gauges:
        metric(f"miniyaie_{key}", "gauge", help, [f"miniyaie_{key} {value:g}"])
    metric("miniyaie_time_to_first_token_seconds", "histogram",
           "Time from API request arrival to the first generated token, per choice.",
           stats.ttft.lines("miniyaie_time_to_first_token_seconds"))
    metric("miniyaie_e2e_request_latency_seconds", "histogram", "Time from API request arrival to its last token.",
           stats.latency.lines("miniyaie_e2e_request_latency_seconds"))
    return "\n".join(lines) + "\n"


# ---- the app -----------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


@dataclass
class _Job:
    """One HTTP generation request: its engine handles (prompt-major, n per prompt) and timing."""

    handles: list[RequestHandle]
    n: int
    arrival: float
    first_token: list[Optional[float]]
    release: Callable[[], None] = lambda: None  # gives back the client's concurrency slot

    def prompt_usage(self) -> tuple[int, int]:
        """(prompt tokens, cached tokens), counting each prompt once however many choices it has."""
        firsts = self.handles[::self.n]
        return sum(h.prompt_tokens for h in firsts), sum(h.cached_tokens for h in firsts)

    def usage(self) -> dict[str, Any]:
        prompt, cached = self.prompt_usage()
        completion = sum(len(h.token_ids) for h in self.handles)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}


class _AbortOnExit(StreamingResponse):
    """A streaming response that runs ``on_exit`` however the stream ends — finished, client
    disconnected (Starlette cancels the body), or server shutdown. The body generator's own
    ``finally`` is not enough: a generator abandoned mid-``yield`` is closed only when collected."""

    def __init__(self, content: AsyncIterator[str], on_exit: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_exit = on_exit

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_exit()


def create_api(engine_thread: EngineThread, api_key: Optional[str] = None, model_name: Optional[str] = None, *,
               default_max_tokens: int = 1024, max_choices: int = 64, disconnect_poll_s: float = 0.5,
               max_body_bytes: Optional[int] = None, max_concurrent_per_client: Optional[int] = None,
               debug_routes: Optional[bool] = None) -> FastAPI:
    """Build the OpenAI-compatible app over a running EngineThread.

    ``api_key``: required as ``Authorization: Bearer <key>`` on ``/v1`` (``None`` reads
    ``$MINIYAIE_API_KEY``; ``""`` turns auth off). ``model_name``: the served model id (``None``
    reads ``$MINIYAIE_SERVED_MODEL_NAME``, else the engine's model name); the engine's
    ``config.model`` is accepted as an alias. The environment fallbacks let ``python -m miniyaie
    serve`` configure the API however app.py builds it. Limits:
    ``default_max_tokens`` when a request sets none (clipped to the context left),
    ``max_choices`` engine requests per HTTP request (prompts × n); ``max_body_bytes`` per request
    body on every route, the page's included (413; ``None`` reads ``$MINIYAIE_MAX_BODY_BYTES``, else
    1 MiB; 0 = off); ``max_concurrent_per_client`` generation requests in flight per client IP on
    ``/v1`` (429; ``None`` reads ``$MINIYAIE_API_MAX_CONCURRENT_PER_CLIENT``, else 0 = off). The
    engine's own limits (``max_waiting``, ``max_prompt_tokens``, ``max_tokens_cap``) answer 429/400.
    ``debug_routes`` (``None``: ``$MINIYAIE_DEBUG_ROUTES=1``) adds ``POST /debug/drain`` for soak
    tests: clear the cache, check integrity, report blocks and locks. Never on a public server.
    """
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    engine = engine_thread.engine
    served = model_name or os.environ.get(MODEL_NAME_ENV) or engine.model_name
    aliases = {served, engine.model_name, engine.config.model,
               os.path.basename(str(engine.config.model).rstrip("/"))}
    stats = ServerStats()
    created = int(time.time())
    if max_body_bytes is None:
        max_body_bytes = _env_int(MAX_BODY_BYTES_ENV, DEFAULT_MAX_BODY_BYTES)
    if max_concurrent_per_client is None:
        max_concurrent_per_client = _env_int(MAX_CONCURRENT_ENV, 0)
    if debug_routes is None:
        debug_routes = os.environ.get(DEBUG_ROUTES_ENV) == "1"
    slots = ClientSlots(max_concurrent_per_client)
    tokens_cap = engine.config.max_tokens_cap or default_max_tokens

    app = FastAPI(title="Mini-YAIE OpenAI-compatible API", version="0.1.0")
    app.state.engine_thread = engine_thread
    app.state.stats = stats
    app.state.served_model = served
    app.state.client_slots = slots

    def count_413() -> None:
        stats.errors[413] = stats.errors.get(413, 0) + 1

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes, on_refuse=count_413)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        stats.errors[err.status] = stats.errors.get(err.status, 0) + 1
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return await _api_error(request, _validation_error(err))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        # Starlette still logs the traceback; the client gets the error in the usual shape
        return await _api_error(request, APIError(500, f"internal error: {type(err).__name__}: {err}",
                                                  type="server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return await _api_error(request, APIError(err.status_code, str(err.detail), type=kind))

    async def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           type="authentication_error", code="invalid_api_key")

    def check_model(model: Optional[str]) -> None:
        if model is not None and model not in aliases:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'.",
                           type="not_found_error", param="model", code="model_not_found")

    def check_alive() -> None:
        if not engine_thread.alive:
            raise APIError(503, "the engine thread is not running", type="server_error", code="engine_down")

    def model_card() -> dict[str, Any]:
        return {"id": served, "object": "model", "created": created, "owned_by": "miniyaie",
                "max_model_len": engine.max_model_len}

    async def start(endpoint: str, body: _Body, prompts: list[Any], logprobs: Optional[int],
                    max_tokens: Optional[int], request: Request) -> _Job:
        """Validate, tokenize and submit every (prompt, choice); all or nothing."""
        stats.requests[endpoint] = stats.requests.get(endpoint, 0) + 1
        arrival = time.perf_counter()
        check_model(body.model)
        check_alive()
        release = slots.acquire(request.client.host if request.client else "unknown")
        try:
            job = await submit_job(body, prompts, logprobs, max_tokens, arrival, endpoint)
        except BaseException:
            release()
            raise
        job.release = release
        return job

    async def submit_job(body: _Body, prompts: list[Any], logprobs: Optional[int], max_tokens: Optional[int],
                         arrival: float, endpoint: str) -> _Job:
        if body.n < 1:
            raise APIError(400, f"n must be >= 1 (got {body.n})", param="n")
        if len(prompts) * body.n > max_choices:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} exceeds this server's limit of "
                                f"{max_choices} choices per request", param="n")
        try:  # parameter errors first: no engine work for a request that will be refused
            params = [_sampling_params(body, max_tokens, logprobs, j) for j in range(body.n)]
        except ValueError as err:
            raise _bad_value(err) from None
        param_name = "messages" if endpoint == "chat" else "prompt"
        loop = asyncio.get_running_loop()

        def submit_all() -> list[RequestHandle]:
            # runs in a worker thread: the engine lock may be held for a whole step
            try:
                token_lists = engine_thread.call(lambda e: [e.tokenize(p) for p in prompts])
            except ValueError as err:
                raise _bad_value(err, param_name) from None
            except Exception as err:
                if type(err).__module__.startswith("jinja2"):  # the chat template refused the messages
                    raise APIError(400, f"chat template: {err}", param=param_name) from None
                raise
            for ids in token_lists:
                if len(ids) >= engine.max_model_len:
                    raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens, "
                                        f"but the prompt has {len(ids)} tokens. Shorten the prompt.",
                                   param=param_name, code="context_length_exceeded")
            handles: list[RequestHandle] = []
            try:
                for ids in token_lists:
                    room = {} if max_tokens is not None else {
                        "max_tokens": max(1, min(default_max_tokens, tokens_cap, engine.max_model_len - len(ids)))}
                    for sp in params:  # a copy each: the engine keeps the object it was given
                        handles.append(engine_thread.submit(list(ids), dataclasses.replace(sp, **room), loop=loop))
            except BaseException as err:
                for h in handles:  # all or nothing: a refused choice takes its siblings with it
                    engine_thread.abort(h.request_id)
                if isinstance(err, ValueError):
                    raise _bad_value(err, param_name) from None
                if isinstance(err, QueueFull):
                    raise APIError(429, str(err), type="rate_limit_error", code="queue_full",
                                   headers={"Retry-After": "1"}) from None
                if isinstance(err, RuntimeError) and not engine_thread.alive:
                    raise APIError(503, str(err), type="server_error", code="engine_down") from None
                raise
            return handles

        submitting = asyncio.ensure_future(run_in_threadpool(submit_all))
        try:
            handles = await asyncio.shield(submitting)
        except asyncio.CancelledError:  # the client left while we were queueing: abort what was queued
            def abort_all(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    for h in done.result():
                        loop.run_in_executor(None, engine_thread.abort, h.request_id)
            submitting.add_done_callback(abort_all)
            raise
        return _Job(handles, body.n, arrival, [None] * len(handles))

    def abort_unfinished(job: _Job) -> None:
        # engine_thread.abort is a no-op for finished requests; it waits at most one engine step
        try:
            for h in job.handles:
                if h.finish_reason is None:
                    engine_thread.abort(h.request_id)
        finally:
            job.release()

    async def outputs(job: _Job, request: Request) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merge the job's output queues; raise _ClientGone as soon as the client has left."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle: RequestHandle) -> None:
            async for out in handle:
                queue.put_nowait((i, out))

        async def watch() -> None:
            # a queued request produces nothing for a while: poll, so it is not left waiting in vain
            while not await request.is_disconnected():
                await asyncio.sleep(disconnect_poll_s)
            queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(job.handles)]
        tasks.append(asyncio.create_task(watch()))
        try:
            remaining = len(job.handles)
            while remaining:
                item = await queue.get()
                if item is None:
                    stats.disconnects += 1
                    raise _ClientGone()
                i, out = item
                now = time.perf_counter()
                if out.new_token_ids and job.first_token[i] is None:
                    job.first_token[i] = now
                    stats.ttft.observe(now - job.arrival)
                if out.finished:
                    remaining -= 1
                    stats.finished[out.finish_reason] = stats.finished.get(out.finish_reason, 0) + 1
                    stats.latency.observe(now - job.arrival)
                yield i, out
        finally:
            for t in tasks:
                t.cancel()

    async def finish(job: _Job, request: Request) -> bool:
        """Wait for every choice of a non-streaming job; False if the client left first."""
        try:
            async with aclosing(outputs(job, request)) as events:
                async for _, out in events:
                    if out.finish_reason == "error":
                        raise engine_error(out)
        except _ClientGone:
            return False
        finally:
            abort_unfinished(job)
        return True

    def engine_error(out: RequestOutput) -> APIError:
        return APIError(500, out.error or "the engine failed this request", type="server_error",
                        code="engine_error")

    # ---- routes --------------------------------------------------------------------------------

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        top = None  # no per-token record unless asked: it costs time on every step
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise APIError(400, f"top_logprobs must be in [0, 20] (got {body.top_logprobs})", param="top_logprobs")
        if body.logprobs:
            top = body.top_logprobs or 0
        elif body.top_logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = await start("chat", body, [_chat_prompt(body.messages)], top, max_tokens, request)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return _AbortOnExit(chat_stream(job, body, request, rid, now), lambda: abort_unfinished(job))
        if not await finish(job, request):
            return Response(status_code=499)  # nobody is listening any more
        choices = [{"index": i, "message": {"role": "assistant", "content": h.text},
                    "logprobs": {"content": [_chat_logprob(c, top) for c in h.choices]} if body.logprobs else None,
                    "finish_reason": h.finish_reason} for i, h in enumerate(job.handles)]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": now, "model": served,
                             "choices": choices, "usage": job.usage(), "system_fingerprint": None})

    async def chat_stream(job: _Job, body: ChatBody, request: Request, rid: str, now: int) -> AsyncIterator[str]:
        chunk = _chunker(rid, "chat.completion.chunk", now, served, body.include_usage)
        top = body.top_logprobs or 0
        for i in range(len(job.handles)):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])

        def choices(i: int, out: RequestOutput) -> Iterator[dict]:
            logprobs = ({"content": [_chat_logprob(c, top) for c in out.new_choices]}
                        if body.logprobs and out.new_choices else None)
            if out.delta_text or logprobs:
                yield {"index": i, "delta": {"content": out.delta_text}, "logprobs": logprobs, "finish_reason": None}
            if out.finished:
                yield {"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}

        async with aclosing(sse(job, request, chunk, body.include_usage, choices)) as events:
            async for event in events:
                yield event

    async def sse(job: _Job, request: Request, chunk: Callable[..., str], include_usage: bool,
                  choices: Callable[[int, RequestOutput], Iterator[dict]]) -> AsyncIterator[str]:
        """The event stream both endpoints send: one chunk per choice that ``choices`` makes of
        each engine output, an error event if the engine failed, the usage chunk if asked, then
        ``[DONE]``. A client that left gets nothing more."""
        try:
            async with aclosing(outputs(job, request)) as events:
                async for i, out in events:
                    if out.finish_reason == "error":
                        yield _sse_error(out)
                        break
                    for choice in choices(i, out):
                        yield chunk([choice])
        except _ClientGone:
            return
        if include_usage:
            yield chunk([], job.usage())
        yield "data: [DONE]\n\n"

    @v1.post("/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        want_logprobs = body.logprobs is not None
        job = await start("completions", body, _completion_prompts(body.prompt), body.logprobs,
                          body.max_tokens, request)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            return _AbortOnExit(completion_stream(job, body, request, rid, now, want_logprobs),
                                lambda: abort_unfinished(job))
        if not await finish(job, request):
            return Response(status_code=499)  # nobody is listening any more
        choices = [{"index": i, "text": h.text,
                    "logprobs": _completion_logprobs(h.choices, body.logprobs or 0, 0) if want_logprobs else None,
                    "finish_reason": h.finish_reason} for i, h in enumerate(job.handles)]
        return JSONResponse({"id": rid, "object": "text_completion", "created": now, "model": served,
                             "choices": choices, "usage": job.usage(), "system_fingerprint": None})

    async def completion_stream(job: _Job, body: CompletionBody, request: Request, rid: str, now: int,
                                want_logprobs: bool) -> AsyncIterator[str]:
        chunk = _chunker(rid, "text_completion", now, served, body.include_usage)
        offsets = [0] * len(job.handles)  # text_offset continues across chunks

        def choices(i: int, out: RequestOutput) -> Iterator[dict]:
            logprobs = None
            if want_logprobs and out.new_choices:
                logprobs = _completion_logprobs(out.new_choices, body.logprobs or 0, offsets[i])
                offsets[i] += sum(len(c.text) for c in out.new_choices)
            if out.delta_text or logprobs or out.finished:
                yield {"index": i, "text": out.delta_text, "logprobs": logprobs,
                       "finish_reason": out.finish_reason if out.finished else None}

        async with aclosing(sse(job, request, chunk, body.include_usage, choices)) as events:
            async for event in events:
                yield event

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        state = engine_thread.health()
        # "degraded" (a step failed recently, the loop goes on) still serves: only "stopped" is down
        return JSONResponse(state, status_code=503 if state["status"] == "stopped" else 200)

    if debug_routes:
        @app.post("/debug/drain")
        async def debug_drain() -> dict[str, Any]:
            """Soak tests only: clear the prefix cache, then report what is still held."""
            def drain(e) -> dict[str, Any]:
                freed = e.clear_cache()
                try:
                    e.check_integrity()
                    integrity = "ok"
                except AssertionError as err:
                    integrity = f"broken: {err}"
                kv = e.runner.kv
                return {"freed_blocks": freed, "free_blocks": kv.num_free_blocks, "num_blocks": kv.num_blocks,
                        "nonzero_ref_counts": sum(1 for c in kv.ref_counts if c),
                        "locked_nodes": sum(1 for n in e.scheduler.tree.nodes() if n.lock_ref),
                        "tree_blocks": e.scheduler.tree.num_blocks, "running": len(e.scheduler.running),
                        "waiting": len(e.scheduler.waiting), "requests": len(e.requests),
                        "handles": len(engine_thread.handles), "integrity": integrity,
                        "preemptions": e.scheduler.num_preemptions,
                        "evicted_blocks": e.telemetry.counters.evicted_blocks}
            return await run_in_threadpool(engine_thread.call, drain)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        up = engine_thread.alive
        engine_stats = await run_in_threadpool(engine_thread.call, _engine_stats)
        return PlainTextResponse(_prometheus(stats, engine_stats, up),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ---- response pieces ---------------------------------------------------------------------------


def _chunker(rid: str, kind: str, created: int, model: str, include_usage: bool) -> Callable[..., str]:
    """One SSE event per call, in OpenAI's chunk shape; with include_usage every chunk carries a
    ``usage`` field (null until the last one), as OpenAI's stream_options asks."""
    def chunk(choices: list[dict], usage: Any = None) -> str:
        data: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model,
                                "system_fingerprint": None, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return _sse(data)
    return chunk


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _sse_error(out: RequestOutput) -> str:
    """Mid-stream the status line is long gone: an engine failure travels as an error event."""
    return _sse({"error": {"message": out.error or "the engine failed this request", "type": "server_error",
                           "param": None, "code": "engine_error"}})


def _logprob(value: float) -> float:
    return value if math.isfinite(value) and value > MIN_LOGPROB else MIN_LOGPROB


def _prob_to_logprob(p: float) -> float:
    return _logprob(math.log(p)) if p > 0 else MIN_LOGPROB


def _chat_logprob(choice: TokenChoice, top: int) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {**entry(choice.text, _logprob(choice.logprob)),
            "top_logprobs": [entry(t, _prob_to_logprob(p)) for _, t, p in choice.top[:top]]}


def _completion_logprobs(choices: list[TokenChoice], top: int, offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, top alternatives as {token: logprob}."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for c in choices:
        tokens.append(c.text)
        token_logprobs.append(_logprob(c.logprob))
        alts = {t: _prob_to_logprob(p) for _, t, p in c.top[:top]}
        alts.setdefault(c.text, _logprob(c.logprob))
        tops.append(alts)
        offsets.append(offset)
        offset += len(c.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}

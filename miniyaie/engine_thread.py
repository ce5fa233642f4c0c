"""EngineThread: one Engine stepping in a background thread, serving many clients at once."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Optional

from miniyaie.engine import Engine
from miniyaie.request import Prompt, RequestOutput, SamplingParams, TokenChoice
from miniyaie.telemetry import EngineSnapshot


@dataclass
class RequestHandle:
    """A client's view of one submitted request: its outputs arrive on a queue as the engine
    produces them. Iterate (sync or async) to stream; ``text`` accumulates."""

    request_id: str
    prompt_tokens: int
    _thread: "EngineThread"
    _queue: "queue.Queue[RequestOutput]" = field(default_factory=queue.Queue)
    _loop: Optional[asyncio.AbstractEventLoop] = None
    _async_queue: Optional[asyncio.Queue] = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    choices: list[TokenChoice] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    cached_tokens: int = 0

    def _deliver(self, out: RequestOutput) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, out)
            except RuntimeError:  # the client's event loop is closed: nobody is left to tell
                pass
        else:
            self._queue.put(out)

    def _record(self, out: RequestOutput) -> RequestOutput:
        self.text += out.delta_text
        self.token_ids += out.new_token_ids
        self.choices += out.new_choices
        self.cached_tokens = out.num_cached_tokens
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error
        return out

    def __iter__(self) -> Iterator[RequestOutput]:
        while self.finish_reason is None:
            yield self._record(self._queue.get())

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self.finish_reason is None:
            yield self._record(await self._async_queue.get())

    def result(self) -> str:
        for _ in self:
            pass
        return self.text

    def abort(self) -> None:
        self._thread.abort(self.request_id)


class EngineThread:
    """Owns an Engine and the thread that steps it. ``submit`` and ``abort`` are thread-safe;
    each request's outputs go to its own handle's queue.

    The engine is not thread-safe, so every call into it happens under ``lock``: the loop holds
    it for one step at a time, and a submit waits at most one step. If a step raises past the
    engine's own per-batch handling, every open request fails with the error, ``health()``
    reports it, and the loop keeps serving new requests. A failure the engine contains (a forward
    pass raising fails only that step's batch) is reported the same way: ``health()`` says
    "degraded" with ``last_error`` for ``ERROR_WINDOW_S``, then "ok" again.
    """

    ERROR_WINDOW_S = 30.0

    def __init__(self, engine: Engine, idle_wait: float = 0.05) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.handles: dict[str, RequestHandle] = {}
        self.error: Optional[str] = None  # the last step failure, shown on the page and in /health
        self.error_time: Optional[float] = None
        self.num_errors = 0
        self.steps = 0
        self.started_at = time.time()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait = idle_wait
        self._thread = threading.Thread(target=self._loop, name="miniyaie-engine", daemon=True)
        self.fault_hook: Optional[Callable[[], None]] = None  # tests inject faults here

    def start(self) -> "EngineThread":
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        if not self._thread.is_alive():  # nobody will step again: no client may wait forever
            for out in self._fail_all("the engine thread stopped"):
                handle = self.handles.pop(out.request_id, None)
                if handle is not None:
                    handle._deliver(out)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, prompt: Prompt, params: Optional[SamplingParams] = None,
               loop: Optional[asyncio.AbstractEventLoop] = None) -> RequestHandle:
        """Queue a request; raises ValueError (bad input) or QueueFull at once."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        with self.lock:
            request_id = self.engine.add_request(prompt, params)
            request = self.engine.requests[request_id]
            handle = RequestHandle(request_id, request.num_prompt_tokens, self, _loop=loop,
                                   _async_queue=asyncio.Queue() if loop is not None else None)
            self.handles[request_id] = handle
        self._wake.set()
        return handle

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.engine.abort(request_id)
        self._wake.set()

    def snapshot(self) -> EngineSnapshot:
        """The engine's current state for the demo (rebuilt only when the version changed)."""
        fresh = self.engine.telemetry.fresh_snapshot()  # most refreshes: no lock, no rebuild
        if fresh is not None:
            return fresh
        with self.lock:
            return self.engine.snapshot()

    def call(self, fn: Callable[[Engine], object]) -> object:
        """Run ``fn(engine)`` between steps (cache clearing, option switches, integrity checks)."""
        with self.lock:
            result = fn(self.engine)
        self._wake.set()
        return result

    def health(self) -> dict:
        # a failed step fails its requests and the loop goes on: "degraded" for a while, then ok
        recent = self.error_time is not None and time.time() - self.error_time < self.ERROR_WINDOW_S
        status = "stopped" if not self.alive else ("degraded" if recent else "ok")
        return {"status": status, "engine_thread_alive": self.alive, "last_error": self.error,
                "num_errors": self.num_errors, "steps": self.steps,
                "running": len(self.engine.scheduler.running), "waiting": len(self.engine.scheduler.waiting),
                "model": self.engine.model_name, "uptime_s": round(time.time() - self.started_at, 1)}

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished and not self.engine._pending:
                self._wake.wait(self._idle_wait)
                self._wake.clear()
                with self.lock:
                    self.engine.telemetry.on_idle()
                continue
            try:
                with self.lock:
                    if self.fault_hook is not None:
                        self.fault_hook()
                    outputs = self.engine.step()
                    self.steps += 1
                    failed = next((o for o in outputs if o.finish_reason == "error"), None)
                    if failed is not None:  # the engine failed one batch and went on: degraded
                        self._record_error(failed.error or "engine step failed")
                    for out in outputs:
                        if out.finished:  # its blocks are already back; forget the request
                            self.engine.requests.pop(out.request_id, None)
            except Exception as err:  # keep serving: fail what was in flight, report, go on
                self._record_error(f"{type(err).__name__}: {err}")
                traceback.print_exc()
                outputs = self._fail_all(self.error)
            for out in outputs:
                handle = self.handles.get(out.request_id)
                if handle is not None:
                    if out.finished:
                        del self.handles[out.request_id]
                    handle._deliver(out)

    def _record_error(self, message: str) -> None:
        self.error = message
        self.error_time = time.time()
        self.num_errors += 1

    def _fail_all(self, message: str) -> list[RequestOutput]:
        with self.lock:
            outputs = []
            for request_id in list(self.handles):
                self.engine.abort(request_id)
                outputs.append(RequestOutput(request_id, "", [], [], True, "error", message))
                self.engine.requests.pop(request_id, None)
            self.engine._pending.clear()
            return outputs

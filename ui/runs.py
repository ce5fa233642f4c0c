"""Conversations running against the engine: each in its own small thread, one turn at a time,
so the page can start dozens of real requests at once and simply poll their handles."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Optional

from miniyaie.engine import QueueFull
from miniyaie.engine_thread import EngineThread, RequestHandle
from miniyaie.request import SamplingParams
from ui.scenarios import Conversation

NUM_LANES = 4


def friendly_error(err: Exception) -> str:
    """What the page says when the engine refuses a request."""
    if isinstance(err, QueueFull):
        return ("The server is busy: too many requests are waiting already. Please try again in a few "
                f"seconds. ({err})")
    if isinstance(err, ValueError):
        return str(err)
    return f"{type(err).__name__}: {err}"


class ConversationRun:
    """Sends a conversation's turns in order. ``handle`` is the turn in flight (its ``text`` and
    ``choices`` grow as the engine streams); ``history`` holds finished (user, reply) pairs."""

    def __init__(self, engine_thread: EngineThread, conversation: Conversation, params: SamplingParams) -> None:
        self.engine_thread = engine_thread
        self.conversation = conversation
        self.params = params
        self.history: list[tuple[str, str]] = []
        self.handle: Optional[RequestHandle] = None
        self.turn = 0
        self.error: Optional[str] = None
        self.done = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"run-{conversation.label}", daemon=True)

    def start(self) -> "ConversationRun":
        self._thread.start()
        return self

    def prompt_for(self, user: str):
        c = self.conversation
        if c.raw:
            return "".join(f"{u}{a}\n" for u, a in self.history) + user
        messages = [{"role": "system", "content": c.system}] if c.system else []
        for u, a in self.history:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": user}]

    def _run(self) -> None:
        try:
            for self.turn, user in enumerate(self.conversation.turns):
                if self._stopped:
                    break
                # a fresh params object per turn: the engine may keep per-request state on it
                self.handle = self.engine_thread.submit(self.prompt_for(user), replace(self.params))
                reply = self.handle.result()
                if self.handle.finish_reason in ("abort", "error"):
                    self.error = self.handle.error if self.handle.finish_reason == "error" else None
                    break
                self.history.append((user, reply))
        except Exception as err:  # bad input or a full queue: show it in the lane
            self.error = friendly_error(err)
        finally:
            self.done.set()

    def stop(self) -> None:
        self._stopped = True
        handle = self.handle
        if handle is not None and handle.finish_reason is None:
            handle.abort()

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    @property
    def active(self) -> bool:
        """Holds (or is about to hold) an engine request: started, not stopped, not finished."""
        return not self._stopped and not self.done.is_set()


@dataclass
class Session:
    """What one browser tab has running: a run per lane, and its last scenario's runs."""

    lanes: list[Optional[ConversationRun]] = field(default_factory=lambda: [None] * NUM_LANES)
    scenario: list[ConversationRun] = field(default_factory=list)
    other: int = 0  # chat turns and /generate calls in flight

    def active(self) -> int:
        """Engine requests this tab has running (each conversation sends one turn at a time)."""
        runs = {id(r): r for r in [*self.lanes, *self.scenario] if r is not None}
        return sum(r.active for r in runs.values()) + self.other

    def refuse(self, wanted: int, limit: int) -> Optional[str]:
        """None if ``wanted`` more requests fit under ``limit`` (0 = no limit), else the reason."""
        running = self.active()
        if limit <= 0 or running + wanted <= limit:
            return None
        return (f"Too many requests from this tab: {running} running and {wanted} more asked for, but one "
                f"visitor may run at most {limit} at once. Wait for some to finish or press Stop all.")

    def stop_all(self) -> None:
        for run in [*self.lanes, *self.scenario]:
            if run is not None:
                run.stop()


class Sessions:
    """Sessions by Gradio session hash; the oldest are dropped (and stopped) past ``capacity``."""

    def __init__(self, capacity: int = 256) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()
        self._capacity = capacity

    def get(self, key: str) -> Session:
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = Session()
                while len(self._sessions) > self._capacity:
                    _, old = self._sessions.popitem(last=False)
                    old.stop_all()
            self._sessions.move_to_end(key)
            return session

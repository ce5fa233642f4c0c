"""Telemetry: immutable, versioned snapshots of the engine for the demo, and running metrics.

The step loop only bumps counters and appends to short deques (O(batch) per step); the
snapshot — tree, block map, requests — is built on demand by whoever wants to draw it, at most
once per engine version, and shared by all viewers.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from miniyaie.engine import Engine
    from miniyaie.request import Request
    from miniyaie.scheduler import SchedulerOutput

MAX_NODES = 400  # a snapshot lists at most this many tree nodes (most recently used first)
HISTORY = 240  # metric samples kept for the over-time charts


@dataclass(frozen=True)
class TreeNodeView:
    id: int
    parent_id: Optional[int]  # None for the root
    text: str  # decoded text of this edge's tokens
    num_tokens: int
    block_ids: tuple[int, ...]
    lock_ref: int  # running requests using this prefix right now
    hit_count: int
    last_access_age: float  # seconds since last match/insert
    created_tick: int
    state: str  # "root" | "locked" | "hit" (recently matched) | "new" (recently inserted) | "evictable"


@dataclass(frozen=True)
class EvictedNodeView:
    node_id: int
    parent_id: int
    text: str
    num_tokens: int
    age: float  # seconds since eviction (the UI fades these out)


@dataclass(frozen=True)
class BlockView:
    id: int
    state: str  # "free" | "request" (one running request) | "shared" (several holders) | "cache" (tree only)
    ref_count: int
    owners: tuple[str, ...]  # request ids holding it
    in_tree: bool
    token_range: Optional[tuple[int, int]]  # positions [start, end) in the first owner's sequence


@dataclass(frozen=True)
class RequestView:
    id: str
    status: str  # "waiting" | "running" | "finished"
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    computed_tokens: int
    num_blocks: int
    max_tokens: int
    ttft: Optional[float]
    finish_reason: Optional[str]
    preemptions: int


@dataclass(frozen=True)
class StepView:
    index: int
    time: float  # wall clock
    duration: float  # seconds
    prefill: tuple[tuple[str, int], ...]  # (request id, tokens) for each prefill chunk
    decode: tuple[str, ...]  # request ids that decoded one token
    preempted: tuple[str, ...]


@dataclass(frozen=True)
class MetricsView:
    tokens_per_s: float  # generated tokens/s over the last few seconds
    prefill_tokens_per_s: float
    ttft_mean: Optional[float]
    ttft_p50: Optional[float]
    cache_hit_rate: float  # cached prompt tokens / prompt tokens, over all admitted requests
    kv_usage: float
    running: int
    waiting: int
    requests_finished: int
    tokens_generated: int
    prompt_tokens: int
    cached_tokens: int
    computed_tokens: int  # tokens fed to the network
    preemptions: int
    evicted_blocks: int


@dataclass(frozen=True)
class MetricSample:
    time: float
    tokens_per_s: float
    kv_usage: float
    running: int
    waiting: int
    cache_hit_rate: float


@dataclass(frozen=True)
class EngineSnapshot:
    """Everything the demo draws, frozen at one engine version."""

    version: int
    time: float
    model: str
    device: str
    dtype: str
    block_size: int
    num_blocks: int
    free_blocks: int
    enable_prefix_cache: bool
    schedule_policy: str
    tree: tuple[TreeNodeView, ...]  # preorder from the root; truncated to MAX_NODES
    tree_truncated: int  # nodes left out
    evicted: tuple[EvictedNodeView, ...]
    blocks: tuple[BlockView, ...]
    requests: tuple[RequestView, ...]
    steps: tuple[StepView, ...]  # most recent last
    metrics: MetricsView
    history: tuple[MetricSample, ...]
    error: Optional[str]


@dataclass
class _Counters:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tokens_generated: int = 0
    requests_finished: int = 0
    evicted_blocks: int = 0
    ttfts: deque = field(default_factory=lambda: deque(maxlen=200))
    token_times: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, generated, prefilled)


class Telemetry:
    """Collects per-step facts from the engine and builds snapshots on demand.

    ``version`` changes whenever anything drawable changes; ``snapshot()`` rebuilds only then.
    Thread-safe for readers: the engine thread writes under ``lock``, UI threads read snapshots.
    """

    RECENT = 3.0  # seconds a node counts as "new" / "hit", a step as recent for throughput

    def __init__(self, engine: "Engine") -> None:
        # a weak reference: the engine freezes its start-up objects out of the garbage collector,
        # so a reference cycle would keep an engine (and its KV pool) alive forever once dropped
        self.engine = weakref.proxy(engine)
        self.version = 0
        self.counters = _Counters()
        self.steps: deque[StepView] = deque(maxlen=60)
        self.history: deque[MetricSample] = deque(maxlen=HISTORY)
        self.finished: deque[Request] = deque(maxlen=32)
        self.error: Optional[str] = None
        self.lock = threading.Lock()
        self._snapshot: Optional[EngineSnapshot] = None
        self._step_index = 0
        self._evicted: deque[tuple[float, object]] = deque(maxlen=64)
        self._last_tree_tick = 0
        self._node_state_time: dict[int, tuple[str, float]] = {}

    def touch(self) -> None:
        self.version += 1

    def on_add(self, request: "Request") -> None:
        self.touch()

    def on_admit(self, request: "Request") -> None:
        """First time a request is scheduled: count its prompt and what the cache served."""
        self.counters.prompt_tokens += request.num_prompt_tokens
        self.counters.cached_tokens += request.num_cached_tokens

    def on_finish(self, request: "Request") -> None:
        c = self.counters
        c.requests_finished += 1
        if request.metrics.ttft is not None:
            c.ttfts.append(request.metrics.ttft)
        self.finished.append(request)
        self.touch()

    def on_error(self, message: str) -> None:
        self.error = message
        self.touch()

    def on_step(self, plan: "SchedulerOutput", generated: int, duration: float) -> None:
        """Called once per engine step with the batch it launched."""
        now = time.time()
        c = self.counters
        prefill, decode = [], []
        for item in plan.scheduled:
            if item.is_decode:
                decode.append(item.request.request_id)
            else:
                prefill.append((item.request.request_id, item.num_new_tokens))
        c.tokens_generated += generated
        c.token_times.append((now, generated, sum(n for _, n in prefill)))
        self._step_index += 1
        self.steps.append(StepView(self._step_index, now, duration, tuple(prefill), tuple(decode),
                                   tuple(r.request_id for r in plan.preempted)))
        self._collect_tree_events(now)
        if not self.history or now - self.history[-1].time >= 0.5:
            m = self._metrics(now)
            self.history.append(MetricSample(now, m.tokens_per_s, m.kv_usage, m.running, m.waiting, m.cache_hit_rate))
        self.touch()

    def on_idle(self) -> None:
        """While nothing runs, keep time moving for the views: throughput falls to zero on the
        charts, and "new" / "hit" / evicted markings fade, instead of freezing at the last step."""
        now = time.time()
        last = self.history[-1] if self.history else None
        if last is None or now - last.time < 1.0:
            return
        m = self._metrics(now)
        if last.tokens_per_s > 0 or m.tokens_per_s > 0 or self._recent_marks(now):
            self.history.append(MetricSample(now, m.tokens_per_s, m.kv_usage, m.running, m.waiting, m.cache_hit_rate))
            self.touch()

    def _recent_marks(self, now: float) -> bool:
        """Whether some node or eviction is still drawn as recent (and so will change colour)."""
        marks = [t for _, t in self._node_state_time.values()] + [t for t, _ in self._evicted]
        return any(now - t <= 2 * self.RECENT + 1.0 for t in marks)

    def _collect_tree_events(self, now: float) -> None:
        tree = self.engine.scheduler.tree
        for event in tree.events_since(self._last_tree_tick):
            if event.kind == "evicted":
                self.counters.evicted_blocks += len(event.block_ids)
                self._evicted.append((now, event))
            elif event.kind in ("inserted", "hit"):
                self._node_state_time[event.node_id] = ("new" if event.kind == "inserted" else "hit", now)
        self._last_tree_tick = tree.tick
        if len(self._node_state_time) > 4 * MAX_NODES:  # forget marks long faded (bounded memory)
            self._node_state_time = {k: v for k, v in self._node_state_time.items() if now - v[1] <= self.RECENT}

    # ---- building snapshots ------------------------------------------------------------------------

    def fresh_snapshot(self) -> Optional[EngineSnapshot]:
        """The last snapshot if nothing changed since (safe to call without the engine lock)."""
        snap = self._snapshot
        return snap if snap is not None and snap.version == self.version else None

    def snapshot(self) -> EngineSnapshot:
        snap = self.fresh_snapshot()
        if snap is not None:
            return snap
        with self.lock:
            snap = self._build()
        self._snapshot = snap
        return snap

    def _metrics(self, now: float) -> MetricsView:
        c = self.counters
        sched = self.engine.scheduler
        recent = [(t, g, p) for t, g, p in c.token_times if now - t <= self.RECENT]
        span = max(now - recent[0][0], 0.5) if recent else 1.0
        ttfts = sorted(c.ttfts)
        return MetricsView(
            tokens_per_s=sum(g for _, g, _ in recent) / span,
            prefill_tokens_per_s=sum(p for _, _, p in recent) / span,
            ttft_mean=sum(ttfts) / len(ttfts) if ttfts else None,
            ttft_p50=ttfts[len(ttfts) // 2] if ttfts else None,
            cache_hit_rate=c.cached_tokens / c.prompt_tokens if c.prompt_tokens else 0.0,
            kv_usage=self.engine.runner.kv.usage,
            running=len(sched.running),
            waiting=len(sched.waiting),
            requests_finished=c.requests_finished,
            tokens_generated=c.tokens_generated,
            prompt_tokens=c.prompt_tokens,
            cached_tokens=c.cached_tokens,
            computed_tokens=self.engine.num_forward_tokens,
            preemptions=sched.num_preemptions,
            evicted_blocks=c.evicted_blocks,
        )

    def _build(self) -> EngineSnapshot:
        engine = self.engine
        now = time.time()
        sched = engine.scheduler
        kv = engine.runner.kv
        tree_nodes, truncated = self._tree_views(now)
        evicted = tuple(
            EvictedNodeView(e.node_id, e.parent_id, self._text(e.token_ids), e.num_tokens, now - t)
            for t, e in self._evicted if now - t <= 2 * self.RECENT)
        requests = [*sched.running, *sched.waiting, *self.finished]
        return EngineSnapshot(
            version=self.version, time=now, model=engine.model_name, device=str(engine.runner.device),
            dtype=str(engine.runner.dtype).removeprefix("torch."), block_size=kv.block_size,
            num_blocks=kv.num_blocks, free_blocks=kv.num_free_blocks,
            enable_prefix_cache=engine.config.enable_prefix_cache,
            schedule_policy=engine.config.schedule_policy,
            tree=tree_nodes, tree_truncated=truncated, evicted=evicted,
            blocks=self._block_views(), requests=tuple(self._request_view(r) for r in requests),
            steps=tuple(self.steps), metrics=self._metrics(now), history=tuple(self.history),
            error=self.error,
        )

    def _text(self, token_ids) -> str:
        tok = self.engine.tokenizer
        if tok is None:
            return " ".join(map(str, token_ids))
        return tok.decode(list(token_ids), skip_special_tokens=False)

    def _tree_views(self, now: float) -> tuple[tuple[TreeNodeView, ...], int]:
        tree = self.engine.scheduler.tree
        nodes = list(tree.nodes())
        keep = nodes
        if len(nodes) > MAX_NODES:
            # keep the most recently used nodes and every ancestor they need
            chosen: set[int] = set()
            for node in sorted(nodes, key=lambda n: -n.last_access):
                walk = node
                while walk is not None and walk.id not in chosen:
                    chosen.add(walk.id)
                    walk = walk.parent
                if len(chosen) >= MAX_NODES:
                    break
            keep = [n for n in nodes if n.id in chosen]
        views = []
        for node in keep:
            if node.parent is None:
                state = "root"
            elif node.lock_ref > 0:
                state = "locked"
            else:
                mark = self._node_state_time.get(node.id)
                state = mark[0] if mark and now - mark[1] <= self.RECENT else "evictable"
            views.append(TreeNodeView(
                node.id, node.parent.id if node.parent else None, self._text(node.token_ids),
                node.num_tokens, tuple(node.block_ids), node.lock_ref, node.hit_count,
                now - node.last_access_time, node.created_at, state))
        return tuple(views), len(nodes) - len(keep)

    def _block_views(self) -> tuple[BlockView, ...]:
        sched = self.engine.scheduler
        kv = sched.kv
        owners: dict[int, list[str]] = {}
        ranges: dict[int, tuple[int, int]] = {}
        for r in sched.running:
            for i, b in enumerate(r.block_table):
                owners.setdefault(b, []).append(r.request_id)
                ranges.setdefault(b, (i * kv.block_size, min((i + 1) * kv.block_size, r.num_tokens)))
        in_tree = set(sched.tree.all_block_ids())
        views = []
        for b in range(kv.num_blocks):
            refs = kv.ref_counts[b]
            held = owners.get(b, [])
            if refs == 0:
                state = "free"
            elif refs > 1:
                state = "shared"
            elif held:
                state = "request"
            else:
                state = "cache"
            views.append(BlockView(b, state, refs, tuple(held), b in in_tree, ranges.get(b)))
        return tuple(views)

    @staticmethod
    def _request_view(r: "Request") -> RequestView:
        return RequestView(r.request_id, r.status.value, r.num_prompt_tokens, len(r.output_token_ids),
                           r.num_cached_tokens, r.num_computed_tokens, len(r.block_table), r.params.max_tokens,
                           r.metrics.ttft, r.finish_reason, r.num_preemptions)

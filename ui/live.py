"""Live views: every figure and panel the page refreshes, built once per snapshot version and
shared by all viewers (ten open tabs cost one build, not ten)."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from html import escape
from typing import Callable, Optional

from gradio.components.plot import PlotData

from miniyaie.telemetry import EngineSnapshot
from ui.block_view import block_figure, block_stats
from ui.metrics_view import metrics_figure, metrics_html, requests_html, steps_figure
from ui.tree_view import tree_figure, tree_summary


@dataclass(frozen=True)
class LiveViews:
    version: int
    tree: PlotData
    tree_info: str
    blocks: PlotData
    blocks_info: str
    steps: PlotData
    metrics: PlotData
    cards: str
    requests: str
    engine_info: str
    build_seconds: float


def tree_info_html(snapshot: EngineSnapshot) -> str:
    s = tree_summary(snapshot)
    hidden = f' · <span id="tree-hidden">{s["hidden"]}</span> least-recent nodes not listed' if s["hidden"] else ""
    return (f'<div class="view-stats"><b id="tree-nodes">{s["nodes"]}</b> nodes · '
            f'<b id="tree-tokens">{s["cached_tokens"]}</b> cached tokens · '
            f'<b id="tree-shared">{s["shared"]}</b> shared · <b id="tree-locked">{s["locked"]}</b> locked · '
            f'<b id="tree-evicted">{s["evicted_recently"]}</b> just evicted{hidden}</div>')


def blocks_info_html(snapshot: EngineSnapshot) -> str:
    s = block_stats(snapshot)
    chips = [("free", "#eef1f4", s.free), ("one request", "linear-gradient(90deg,#7950f2,#12b886,#e64980)", s.request),
             ("shared", "#e8590c", s.shared), ("cache only", "#a5d8ff", s.cache)]
    legend = "".join(f'<span class="legend-item"><span class="swatch" style="background:{c}"></span>{label} '
                     f'<b id="blocks-{label.replace(" ", "-")}">{n}</b></span>' for label, c, n in chips)
    return (f'<div class="view-stats">{legend}</div><div class="view-stats">usage <b id="blocks-usage">{100 * s.usage:.0f}%</b>'
            f' of {s.num_blocks} blocks × {snapshot.block_size} tokens · fragmentation <b>{100 * s.fragmentation:.0f}%</b>'
            f' ({s.wasted_slots} empty slots in requests\' last blocks) · {s.owners} requests hold blocks</div>')


def engine_info_html(snapshot: EngineSnapshot, health: dict) -> str:
    """Model and settings, plus a red banner when the engine thread crashed or a step failed."""
    cache = "on" if snapshot.enable_prefix_cache else "off"
    info = (f'<div class="engine-info"><span class="pill">{escape(snapshot.model)}</span>'
            f'<span class="pill">{escape(snapshot.device)} · {escape(snapshot.dtype)}</span>'
            f'<span class="pill">{snapshot.num_blocks} blocks × {snapshot.block_size} tokens</span>'
            f'<span class="pill">prefix cache {cache} · policy {escape(snapshot.schedule_policy)}</span>'
            f'<span class="pill health-{escape(str(health.get("status")))}" id="engine-health">engine {escape(str(health.get("status")))}</span></div>')
    status = health.get("status", "ok")
    last_error = health.get("last_error") or health.get("error")
    if not health.get("engine_thread_alive", True) or status == "stopped":
        problem = f"the engine thread stopped{f' after: {last_error}' if last_error else ''}"
    else:
        problem = last_error if status != "ok" else None  # "degraded": a step failed recently
    if problem:
        info += (f'<div class="error-banner" id="engine-error"><b>Engine error:</b> {escape(str(problem))}. '
                 f'Requests in flight were failed; new requests are still accepted.</div>')
    elif snapshot.error:
        info += f'<div class="warn-banner">Last failed step: {escape(snapshot.error)}</div>'
    return info


def plot(figure: dict) -> PlotData:
    """A figure dict serialized once, in the form gr.Plot sends to the browser as is (so every
    viewer of this version shares one JSON string instead of re-encoding the figure)."""
    return PlotData(type="plotly", plot=json.dumps(figure, separators=(",", ":")))


def build_views(snapshot: EngineSnapshot, health: dict) -> LiveViews:
    """Snapshot in, every view out."""
    start = time.perf_counter()
    views = dict(tree=plot(tree_figure(snapshot)), tree_info=tree_info_html(snapshot),
                 blocks=plot(block_figure(snapshot)), blocks_info=blocks_info_html(snapshot),
                 steps=plot(steps_figure(snapshot)), metrics=plot(metrics_figure(snapshot)), cards=metrics_html(snapshot), requests=requests_html(snapshot),
                 engine_info=engine_info_html(snapshot, health))
    return LiveViews(version=snapshot.version, build_seconds=time.perf_counter() - start, **views)


class ViewCache:
    """Hands out the views for the newest snapshot, building them at most once per version.

    ``snapshot_fn`` is ``EngineThread.snapshot`` (itself cached per version); ``health_fn`` its
    ``health``. Counters let the UI benchmark report the cost per refresh.
    """

    def __init__(self, snapshot_fn: Callable[[], EngineSnapshot], health_fn: Callable[[], dict]) -> None:
        self._snapshot_fn = snapshot_fn
        self._health_fn = health_fn
        self._lock = threading.Lock()
        self._views: Optional[LiveViews] = None
        self._health_key: Optional[tuple] = None
        self.builds = 0
        self.build_seconds = 0.0  # figures + panels
        self.snapshot_seconds = 0.0  # engine snapshot (includes waiting for the engine lock)

    def get(self) -> LiveViews:
        t0 = time.perf_counter()
        snapshot = self._snapshot_fn()
        t1 = time.perf_counter()
        health = self._health_fn()
        key = (health.get("status"), health.get("last_error") or health.get("error"))
        views = self._views
        if views is not None and views.version == snapshot.version and key == self._health_key:
            return views
        with self._lock:  # one builder; the others wait and take its result
            views = self._views
            if views is None or views.version != snapshot.version or key != self._health_key:
                views = build_views(snapshot, health)
                self._views, self._health_key = views, key
                self.builds += 1
                self.build_seconds += views.build_seconds
                self.snapshot_seconds += t1 - t0
        return views

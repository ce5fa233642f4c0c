"""Scheduler and metrics: what each recent step batched, and throughput / latency / cache / memory
over time. Pure functions of a snapshot."""
from __future__ import annotations

from html import escape
from typing import Any, Optional


from miniyaie.telemetry import EngineSnapshot, RequestView
from ui.colors import request_color

STEPS_SHOWN = 40
FIG_HEIGHT = 250


Figure = dict[str, Any]


def steps_figure(snapshot: EngineSnapshot) -> Figure:
    """The last steps' batches: one stacked unit per request in the step, coloured by request,
    hatched when it was a prefill chunk. Tall bars = many requests sharing one forward pass."""
    steps = snapshot.steps[-STEPS_SHOWN:]
    per_request: dict[str, dict[str, list]] = {}
    for step in steps:
        ms = f"{step.duration * 1000:.0f} ms"
        for rid, n in step.prefill:
            row = per_request.setdefault(rid, {"x": [], "pattern": [], "hover": []})
            row["x"].append(step.index)
            row["pattern"].append("/")
            row["hover"].append(f"step {step.index} · {rid}: prefill chunk of {n} tokens · {ms}")
        for rid in step.decode:
            row = per_request.setdefault(rid, {"x": [], "pattern": [], "hover": []})
            row["x"].append(step.index)
            row["pattern"].append("")
            row["hover"].append(f"step {step.index} · {rid}: decode 1 token · {ms}")
    traces = [dict(type="bar", x=row["x"], y=[1] * len(row["x"]), name=rid, showlegend=False,
                   marker=dict(color=request_color(rid), pattern=dict(shape=row["pattern"], fgcolor="#ffffff"),
                               line=dict(width=0.5, color="#ffffff")),
                   hovertext=row["hover"], hovertemplate="%{hovertext}<extra></extra>")
              for rid, row in per_request.items()]
    traces.append(dict(type="bar", x=[None], y=[None], name="decode (1 token)", marker=dict(color="#868e96")))
    traces.append(dict(type="bar", x=[None], y=[None], name="prefill chunk",
                       marker=dict(color="#868e96", pattern=dict(shape="/", fgcolor="#ffffff"))))
    layout = dict(barmode="stack", bargap=0.15, height=FIG_HEIGHT, margin=dict(l=40, r=10, t=10, b=30),
                  plot_bgcolor="#ffffff", paper_bgcolor="#ffffff", uirevision="steps",
                  legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, font=dict(size=11)),
                  xaxis=dict(showgrid=False, tickfont=dict(size=10), title=dict(text="step", font=dict(size=10))),
                  yaxis=dict(gridcolor="#f1f3f5", rangemode="tozero", tickfont=dict(size=10),
                             title=dict(text="requests in step", font=dict(size=11))),
                  annotations=[] if steps else [dict(text="No steps yet.", showarrow=False, x=0.5, y=0.5,
                                                     xref="paper", yref="paper", font=dict(color="#868e96"))])
    return dict(data=traces, layout=layout)


def metrics_figure(snapshot: EngineSnapshot) -> Figure:
    """Throughput, queue and KV usage over the last minutes (samples every 0.5 s while busy).
    Two panels side by side; the right one has KV usage % on a second axis."""
    h = snapshot.history
    t0 = h[-1].time if h else snapshot.time
    xs = [round(s.time - t0, 2) for s in h]
    traces = [
        dict(type="scatter", x=xs, y=[s.tokens_per_s for s in h], name="tokens/s", mode="lines",
             line=dict(color="#7950f2", width=2), fill="tozeroy", fillcolor="rgba(121,80,242,0.12)",
             xaxis="x", yaxis="y"),
        dict(type="scatter", x=xs, y=[s.running for s in h], name="running", mode="lines",
             line=dict(color="#12b886", width=2, shape="hv"), xaxis="x2", yaxis="y2"),
        dict(type="scatter", x=xs, y=[s.waiting for s in h], name="waiting", mode="lines",
             line=dict(color="#fa5252", width=2, shape="hv"), xaxis="x2", yaxis="y2"),
        dict(type="scatter", x=xs, y=[100 * s.kv_usage for s in h], name="KV usage %", mode="lines",
             line=dict(color="#e8590c", width=1.5, dash="dot"), xaxis="x2", yaxis="y3"),
    ]
    axis = dict(tickfont=dict(size=10), gridcolor="#f1f3f5", zeroline=False)
    layout = dict(
        height=FIG_HEIGHT, margin=dict(l=40, r=40, t=30, b=30), plot_bgcolor="#ffffff", paper_bgcolor="#ffffff",
        uirevision="metrics", showlegend=True,
        legend=dict(orientation="h", yanchor="top", y=-0.12, x=0.56, font=dict(size=11)),
        xaxis=dict(domain=[0, 0.42], anchor="y", ticksuffix=" s", **axis),
        yaxis=dict(anchor="x", rangemode="tozero", **axis),
        xaxis2=dict(domain=[0.56, 0.94], anchor="y2", ticksuffix=" s", **axis),
        yaxis2=dict(anchor="x2", rangemode="tozero", **axis),
        yaxis3=dict(anchor="x2", overlaying="y2", side="right", range=[0, 100], showgrid=False,
                    tickfont=dict(size=10), ticksuffix="%"),
        annotations=[dict(text=t, x=x, y=1.0, xref="paper", yref="paper", xanchor="center", yanchor="bottom",
                          showarrow=False, font=dict(size=12))
                     for t, x in (("generated tokens / s (0 s = now)", 0.21), ("requests and KV usage", 0.75))],
    )
    return dict(data=traces, layout=layout)


def _fmt_s(value: Optional[float]) -> str:
    if value is None:
        return "–"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def metrics_html(snapshot: EngineSnapshot) -> str:
    """Headline numbers as cards (ids let tests and users find them)."""
    m = snapshot.metrics
    saved = f"{m.cached_tokens:,} of {m.prompt_tokens:,} prompt tokens served from cache"
    cards = [
        ("m-tps", f"{m.tokens_per_s:.1f}", "tokens / s", "generated over the last 3 s"),
        ("m-ttft", _fmt_s(m.ttft_p50), "TTFT p50", f"mean {_fmt_s(m.ttft_mean)}: arrival → first token"),
        ("m-hit", f"{100 * m.cache_hit_rate:.0f}%", "cache hit rate", saved),
        ("m-kv", f"{100 * m.kv_usage:.0f}%", "KV usage", f"{snapshot.num_blocks - snapshot.free_blocks} of {snapshot.num_blocks} blocks"),
        ("m-queue", f"{m.running} / {m.waiting}", "running / waiting", f"{m.requests_finished} finished"),
        ("m-evict", f"{m.evicted_blocks}", "blocks evicted", f"{m.preemptions} preemptions"),
    ]
    html = "".join(f'<div class="card" id="{cid}"><div class="card-value">{escape(v)}</div>'
                   f'<div class="card-label">{escape(label)}</div><div class="card-note">{escape(note)}</div></div>'
                   for cid, v, label, note in cards)
    return f'<div class="cards">{html}</div>'


def _request_row(r: RequestView) -> str:
    share = r.cached_tokens / r.prompt_tokens if r.prompt_tokens else 0.0
    bar = (f'<div class="bar"><div class="bar-fill" style="width:{100 * share:.0f}%"></div></div>')
    status = r.finish_reason or r.status
    return (f'<tr><td><span class="dot" style="background:{request_color(r.id)}"></span>{escape(r.id)}</td>'
            f'<td class="status-{escape(r.status)}">{escape(status)}</td>'
            f'<td>{bar}cached {r.cached_tokens} of {r.prompt_tokens} prompt tokens</td>'
            f'<td>{r.output_tokens} / {r.max_tokens}</td><td>{_fmt_s(r.ttft)}</td><td>{r.num_blocks}</td></tr>')


def requests_html(snapshot: EngineSnapshot, limit: int = 24) -> str:
    """Running, waiting and recently finished requests: what the cache saved each one."""
    reqs = snapshot.requests[:limit]
    if not reqs:
        return '<div class="muted">No requests yet.</div>'
    rows = "".join(_request_row(r) for r in reqs)
    return ('<table class="req-table"><thead><tr><th>request</th><th>status</th><th>prefix cache</th>'
            f'<th>tokens out</th><th>TTFT</th><th>blocks</th></tr></thead><tbody>{rows}</tbody></table>')

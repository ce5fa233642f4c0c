"""The KV block map: every block of the paged KV pool as one cell, coloured by who holds it.

A *block* is ``block_size`` token slots of keys and values in every layer. A request holds the
blocks of its block table; the radix tree holds the blocks of cached prefixes; a block held by
several (a cached system prompt used by 16 running requests) is *shared* and its cell shows the
reference count. Pure functions of a snapshot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


from miniyaie.telemetry import BlockView, EngineSnapshot
from ui.colors import BLOCK_COLORS, REQUEST_PALETTE, request_color

FIG_HEIGHT = 300


@dataclass(frozen=True)
class BlockStats:
    num_blocks: int
    free: int
    request: int  # held by exactly one running request
    shared: int  # held by several (requests and/or the tree)
    cache: int  # held only by the prefix cache
    usage: float  # share of blocks not free
    fragmentation: float  # unused slots in request blocks / slots of request blocks
    wasted_slots: int
    owners: int  # running requests holding blocks


def block_stats(snapshot: EngineSnapshot) -> BlockStats:
    """Usage and fragmentation. Paging means there is no external fragmentation (any free block
    fits any request); the only waste is the unfilled tail of each request's last block."""
    counts = {"free": 0, "request": 0, "shared": 0, "cache": 0}
    wasted = allocated = 0
    owners: set[str] = set()
    for b in snapshot.blocks:
        counts[b.state] = counts.get(b.state, 0) + 1
        owners.update(b.owners)
        if b.state == "request" and b.token_range is not None:
            allocated += snapshot.block_size
            wasted += snapshot.block_size - (b.token_range[1] - b.token_range[0])
    n = max(snapshot.num_blocks, 1)
    return BlockStats(snapshot.num_blocks, counts["free"], counts["request"], counts["shared"], counts["cache"],
                      1 - counts["free"] / n, wasted / allocated if allocated else 0.0, wasted, len(owners))


def grid_shape(num_blocks: int) -> tuple[int, int]:
    """Columns and rows: a wide grid that stays a fixed size for a given pool."""
    cols = 16 if num_blocks <= 128 else 32 if num_blocks <= 1024 else 64
    return cols, max(1, math.ceil(num_blocks / cols))


def _hover(b: BlockView, block_size: int) -> str:
    lines = [f"<b>block {b.id}</b> · {b.state}"]
    if b.state == "free":
        lines.append("free: ready for any request")
    else:
        lines.append(f"reference count {b.ref_count}")
        if b.owners:
            lines.append("held by " + ", ".join(b.owners[:6]) + (" …" if len(b.owners) > 6 else ""))
        if b.token_range is not None:
            lines.append(f"tokens {b.token_range[0]}–{b.token_range[1] - 1} of {b.owners[0]}")
        if b.in_tree:
            lines.append("in the prefix cache (radix tree)")
    return "<br>".join(lines)


def block_figure(snapshot: EngineSnapshot) -> dict[str, Any]:
    """Snapshot in, plotly figure (dict) out: a heatmap with one cell per block and a discrete
    colour per class (free / cache / shared / one colour per owning request)."""
    cols, rows = grid_shape(snapshot.num_blocks)
    colors = [BLOCK_COLORS["free"], BLOCK_COLORS["cache"], BLOCK_COLORS["shared"], *REQUEST_PALETTE]
    index = {c: i for i, c in enumerate(colors)}
    z: list[list] = [[None] * cols for _ in range(rows)]
    text = [[""] * cols for _ in range(rows)]
    hover = [[""] * cols for _ in range(rows)]
    for b in snapshot.blocks:
        r, c = divmod(b.id, cols)
        color = request_color(b.owners[0]) if b.state == "request" and b.owners else BLOCK_COLORS[b.state]
        z[r][c] = index[color]
        text[r][c] = str(b.ref_count) if b.state == "shared" else ""
        hover[r][c] = _hover(b, snapshot.block_size)
    k = len(colors)
    scale = []
    for i, color in enumerate(colors):  # step colour scale: value i -> colors[i] exactly
        scale += [[i / k, color], [(i + 1) / k, color]]
    heatmap = dict(type="heatmap", z=z, text=text, hovertext=hover, texttemplate="%{text}",
                   textfont=dict(size=9, color="#ffffff"), colorscale=scale, zmin=-0.5, zmax=k - 0.5,
                   showscale=False, xgap=2, ygap=2, hovertemplate="%{hovertext}<extra></extra>")
    layout = dict(height=max(140, min(FIG_HEIGHT, 28 + rows * 18)), margin=dict(l=4, r=4, t=4, b=4),
                  plot_bgcolor="#ffffff", paper_bgcolor="#ffffff", uirevision="blocks",
                  hoverlabel=dict(bgcolor="#ffffff", font=dict(size=12)),
                  xaxis=dict(visible=False, range=[-0.5, cols - 0.5]),
                  yaxis=dict(visible=False, autorange="reversed"))
    return dict(data=[heatmap], layout=layout)

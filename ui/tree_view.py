"""The radix tree as a plotly figure (a plain dict: building ``go.Figure`` objects validates every
property and costs ~10x more, which a 2-core machine pays twice a second): a tidy left-to-right tree, one marker per node (an edge of
cached tokens), coloured by state, sized by tokens, with the edge's decoded text beside it.

Pure functions of a snapshot. The layout depends only on the tree's shape and node ids (children
in creation order), never on a random seed, so a refresh that adds a leaf does not shuffle the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import networkx as nx

from miniyaie.telemetry import EngineSnapshot, EvictedNodeView, TreeNodeView
from ui.colors import NODE_COLORS, NODE_LABELS

MAX_VISIBLE_NODES = 120  # beyond this the least recently used nodes fold into "+N more" markers
MAX_CHILDREN = 8  # per parent; the rest fold into one "+N more" marker
FADE_SECONDS = 6.0  # evicted nodes fade out over this long
FIG_HEIGHT = 430


@dataclass(frozen=True)
class Collapsed:
    """Stand-in for siblings folded away to keep a big tree legible."""

    id: int  # negative, so it never clashes with a real node id
    parent_id: int
    count: int
    num_tokens: int


def is_shared(node: TreeNodeView) -> bool:
    """A node is shared when more than one request used its tokens: it was hit after being
    inserted, or several running requests hold it locked right now."""
    return node.parent_id is not None and (node.hit_count >= 1 or node.lock_ref >= 2)


def tree_summary(snapshot: EngineSnapshot) -> dict[str, int]:
    """Counts shown next to the figure (and checked by the browser test)."""
    nodes = [n for n in snapshot.tree if n.parent_id is not None]
    return {
        "nodes": len(nodes) + snapshot.tree_truncated,
        "cached_tokens": sum(n.num_tokens for n in nodes),
        "shared": sum(is_shared(n) for n in nodes),
        "locked": sum(n.lock_ref > 0 for n in nodes),
        "evicted_recently": len(snapshot.evicted),
        "hidden": snapshot.tree_truncated,
    }


def collapse(nodes: Sequence[TreeNodeView], max_nodes: int = MAX_VISIBLE_NODES,
             max_children: int = MAX_CHILDREN) -> tuple[list[TreeNodeView], list[Collapsed]]:
    """Keep at most ``max_children`` children per parent and about ``max_nodes`` nodes overall,
    preferring nodes in use (locked), then recently touched; fold the rest per parent."""
    children: dict[int, list[TreeNodeView]] = {}
    for n in nodes:
        if n.parent_id is not None:
            children.setdefault(n.parent_id, []).append(n)

    def importance(n: TreeNodeView) -> tuple:
        return (n.lock_ref > 0, n.state in ("new", "hit"), -n.last_access_age)

    # rank every node; a node is kept only if its parent is kept, so walk ranks top-down
    ranked = sorted((n for n in nodes if n.parent_id is not None), key=importance, reverse=True)
    budget = {n.id: True for n in ranked[:max_nodes]}
    kept: list[TreeNodeView] = []
    folded: list[Collapsed] = []
    root = next((n for n in nodes if n.parent_id is None), None)
    if root is None:
        return [], []
    stack = [root]
    while stack:
        node = stack.pop()
        kept.append(node)
        kids = sorted(children.get(node.id, []), key=importance, reverse=True)
        show = [k for k in kids if budget.get(k.id)][:max_children]
        hide = [k for k in kids if k not in show]
        if hide:
            folded.append(Collapsed(-node.id - 1, node.id, len(hide), sum(_subtree_tokens(h, children) for h in hide)))
        stack.extend(sorted(show, key=lambda k: k.id, reverse=True))
    return kept, folded


def _subtree_tokens(node: TreeNodeView, children: dict[int, list[TreeNodeView]]) -> int:
    return node.num_tokens + sum(_subtree_tokens(c, children) for c in children.get(node.id, []))


def tidy_layout(edges: Sequence[tuple[int, int]], root: int) -> dict[int, tuple[float, float]]:
    """Positions for a tree given (parent, child) edges: x = depth, y = leaf slot (leaves take
    consecutive rows, a parent sits at the middle of its children). Children go in id order
    (creation order), so new nodes land below older siblings and nothing else moves much."""
    graph = nx.DiGraph()
    graph.add_node(root)
    graph.add_edges_from(edges)
    pos: dict[int, tuple[float, float]] = {}
    next_row = 0

    def place(node: int, depth: int) -> float:
        nonlocal next_row
        kids = sorted(graph.successors(node), key=lambda k: (k < 0, k))  # folded markers last
        if not kids:
            row = float(next_row)
            next_row += 1
        else:
            rows = [place(k, depth + 1) for k in kids]
            row = (rows[0] + rows[-1]) / 2
        pos[node] = (float(depth), -row)
        return row

    # an explicit stack would be needed beyond Python's recursion limit; radix trees are shallow
    # (one level per branch point), so plain recursion reads better here
    place(root, 0)
    return pos


def _short(text: str, limit: int = 22) -> str:
    """Head…tail: siblings often start alike (the end of a shared block), so keep both ends."""
    text = text.replace("\n", "↵").replace("\t", "⇥")
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[-(limit - 1 - head):]


def _hover(n: TreeNodeView) -> str:
    from html import escape
    body = escape(_short(n.text, 60))
    return (f"<b>node {n.id}</b> · {n.state}<br>“{body}”<br>{n.num_tokens} tokens in {len(n.block_ids)} blocks"
            f"<br>locked by {n.lock_ref} running request(s)<br>hits: {n.hit_count}"
            f"<br>last access {n.last_access_age:.1f} s ago")


def _size(num_tokens: int) -> float:
    return min(34.0, 9.0 + 3.0 * math.sqrt(max(num_tokens, 1) / 4))


Figure = dict[str, Any]


def tree_figure(snapshot: EngineSnapshot) -> Figure:
    """Snapshot in, plotly figure (dict) out."""
    nodes, folded = collapse(snapshot.tree)
    if len(nodes) <= 1:
        return _style([], 0, 0, note="The prefix cache is empty. Run a prompt: its blocks are inserted here when it finishes.")
    root = next(n for n in nodes if n.parent_id is None)
    edges = [(n.parent_id, n.id) for n in nodes if n.parent_id is not None] + [(f.parent_id, f.id) for f in folded]
    pos = tidy_layout(edges, root.id)
    traces: list[dict] = []

    # edges as elbows: across from the parent, then down to the child's row
    ex, ey = [], []
    for parent, child in edges:
        (x0, y0), (x1, y1) = pos[parent], pos[child]
        ex += [x0, x0 + 0.12, x0 + 0.12, x1, None]
        ey += [y0, y0, y1, y1, None]
    traces.append(dict(type="scatter", x=ex, y=ey, mode="lines", line=dict(color="#ced4da", width=1.5),
                       hoverinfo="skip", showlegend=False))

    # edge labels: the decoded text of the node's tokens, on the edge just left of it
    labelled = [n for n in nodes if n.parent_id is not None]
    if len(labelled) > 60:  # too many to read: label only what is in use or just changed
        labelled = [n for n in labelled if n.state in ("locked", "hit", "new") or is_shared(n)]
    traces.append(dict(
        type="scatter", x=[pos[n.id][0] - 0.06 for n in labelled], y=[pos[n.id][1] + 0.28 for n in labelled],
        mode="text", text=[_short(n.text) for n in labelled], textposition="middle left",
        textfont=dict(size=10, color="#343a40"), hoverinfo="skip", showlegend=False))

    for state in ("root", "locked", "hit", "new", "evictable"):
        group = [n for n in nodes if n.state == state]
        if not group:
            continue
        traces.append(dict(
            type="scatter", x=[pos[n.id][0] for n in group], y=[pos[n.id][1] for n in group], mode="markers",
            name=f"{NODE_LABELS[state]} ({len(group)})" if state != "root" else "root",
            marker=dict(size=[_size(n.num_tokens) for n in group], color=NODE_COLORS[state],
                        # shared nodes get a heavy outline: that is where requests met
                        line=dict(width=[3 if is_shared(n) else 1 for n in group],
                                  color=["#212529" if is_shared(n) else "#ffffff" for n in group])),
            text=[_hover(n) for n in group], hovertemplate="%{text}<extra></extra>"))

    shared = [n for n in nodes if is_shared(n)]
    if shared:  # a legend entry that explains the heavy outline
        traces.append(dict(type="scatter", x=[None], y=[None], mode="markers",
                           name=f"shared by ≥2 requests ({len(shared)})",
                           marker=dict(size=12, color="#ffffff", line=dict(width=3, color="#212529"))))
    if folded:
        traces.append(dict(
            type="scatter", x=[pos[f.id][0] for f in folded], y=[pos[f.id][1] for f in folded], mode="markers+text",
            name=f"{NODE_LABELS['collapsed']} ({sum(f.count for f in folded)})",
            marker=dict(size=12, color=NODE_COLORS["collapsed"], symbol="square"),
            text=[f"+{f.count} more" for f in folded], textposition="middle right", textfont=dict(size=10),
            hovertext=[f"{f.count} less recently used branches, {f.num_tokens} tokens" for f in folded],
            hovertemplate="%{hovertext}<extra></extra>"))
    traces += _evicted_traces(snapshot.evicted, pos)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    return _style(traces, max(xs), min(ys))


def _evicted_traces(evicted: Sequence[EvictedNodeView], pos: dict[int, tuple[float, float]]) -> list[dict]:
    """Ghosts of evicted nodes just right of their parent, fading with age; they take no layout
    slot, so the live tree does not move when they vanish."""
    ghosts = [e for e in evicted if e.parent_id in pos and e.age < FADE_SECONDS]
    if not ghosts:
        return []
    return [dict(
        type="scatter", x=[pos[e.parent_id][0] + 0.5 for e in ghosts],
        y=[pos[e.parent_id][1] - 0.35 - 0.15 * (i % 3) for i, e in enumerate(ghosts)],
        mode="markers", name=f"{NODE_LABELS['evicted']} ({len(ghosts)})",
        marker=dict(size=[_size(e.num_tokens) for e in ghosts], color=NODE_COLORS["evicted"], symbol="x",
                    opacity=[max(0.1, 1 - e.age / FADE_SECONDS) for e in ghosts]),
        text=[f"evicted {e.age:.1f} s ago: “{_short(e.text, 40)}” ({e.num_tokens} tokens)" for e in ghosts],
        hovertemplate="%{text}<extra></extra>")]


def _style(traces: list[dict], max_x: float, min_y: float, note: str = "") -> Figure:
    layout = dict(
        height=FIG_HEIGHT, margin=dict(l=10, r=10, t=10, b=10), plot_bgcolor="#ffffff", paper_bgcolor="#ffffff",
        legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, font=dict(size=11)),
        uirevision="tree",  # keep the user's zoom across refreshes
        hoverlabel=dict(bgcolor="#ffffff", font=dict(size=12)),
        xaxis=dict(visible=False, range=[-0.6, max(max_x, 2) + 0.6]),
        yaxis=dict(visible=False, range=[min(min_y, -6) - 0.8, 0.9]),
        annotations=[dict(text=note, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                          font=dict(color="#868e96"))] if note else [],
    )
    return dict(data=traces, layout=layout)

"""One palette for every view, so a request has the same colour in the block map, the scheduler
chart and its lane, and a tree state means the same thing everywhere."""
from __future__ import annotations

import zlib

# Radix-tree node states (TreeNodeView.state) and block states (BlockView.state).
NODE_COLORS: dict[str, str] = {
    "root": "#495057",
    "new": "#37b24d",  # just inserted
    "hit": "#f59f00",  # just matched by a new request: its prefix was reused
    "locked": "#e8590c",  # in use by running requests right now
    "evictable": "#74c0fc",  # cached, unused: first to go under memory pressure
    "evicted": "#adb5bd",
    "collapsed": "#ced4da",
}
NODE_LABELS: dict[str, str] = {
    "root": "root",
    "new": "just inserted",
    "hit": "hit (reused)",
    "locked": "locked by running requests",
    "evictable": "cached, evictable",
    "evicted": "evicted",
    "collapsed": "collapsed siblings",
}
BLOCK_COLORS: dict[str, str] = {
    "free": "#eef1f4",
    "cache": "#a5d8ff",  # held only by the radix tree
    "shared": "#e8590c",  # several holders (ref count > 1)
}
# Owner colours for blocks held by exactly one running request; no blue/orange (taken above).
REQUEST_PALETTE: tuple[str, ...] = (
    "#7950f2", "#12b886", "#e64980", "#82c91e", "#be4bdb", "#15aabf",
    "#fab005", "#4c6ef5", "#40c057", "#f06595", "#20c997", "#94d82d",
)


def request_color(request_id: str) -> str:
    """A stable colour per request id (crc32, not hash(): stable across processes)."""
    return REQUEST_PALETTE[zlib.crc32(request_id.encode()) % len(REQUEST_PALETTE)]


def probability_color(p: float) -> str:
    """Background for a generated token: green when the model was sure, red when it was a long shot."""
    if p >= 0.8:
        return "#d3f9d8"
    if p >= 0.5:
        return "#e9fac8"
    if p >= 0.2:
        return "#fff3bf"
    if p >= 0.05:
        return "#ffe8cc"
    return "#ffc9c9"


PROBABILITY_LEGEND: tuple[tuple[str, str], ...] = (
    ("≥ 80%", "#d3f9d8"), ("50–80%", "#e9fac8"), ("20–50%", "#fff3bf"), ("5–20%", "#ffe8cc"), ("< 5%", "#ffc9c9"),
)

"""Radix tree over KV blocks: the prefix cache.

Maps token-id sequences to the KV block ids that hold their keys and values, so a new request whose
prompt starts like an earlier one can reuse those blocks instead of recomputing them. Pure data
structure: it never touches the KV pool or reference counts; the caller adjusts those from what
``match_prefix`` / ``insert`` / ``evict`` / ``reset`` return.
"""
from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence


@dataclass(eq=False)  # identity equality: nodes point at parents, a field-wise __eq__ would recurse
class TreeNode:
    """One edge of the tree: ``token_ids`` (whole blocks) and the ``block_ids`` that cache them."""

    id: int  # unique and increasing in creation order; the root is 0
    parent: Optional[TreeNode]
    children: dict[tuple[int, ...], TreeNode]  # keyed by the child's first block of tokens
    token_ids: list[int]  # a multiple of block_size long; empty only for the root
    block_ids: list[int]  # len(token_ids) // block_size entries
    lock_ref: int = 0  # running requests that locked a path through this node
    hit_count: int = 0  # match_prefix calls whose match ended in or under this node
    last_access: int = 0  # logical tick of the last match/insert touching it (the LRU key)
    created_at: int = 0  # logical tick when these tokens entered the tree
    last_access_time: float = 0.0  # wall clock of last_access, for display only
    evicted: bool = False  # set once the node leaves the tree; stale handles can check it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclass
class MatchResult:
    node: TreeNode  # deepest matched node; covers exactly the match (lock this one)
    block_ids: list[int]  # cached blocks of the match, root to node
    num_tokens: int  # == len(block_ids) * block_size


@dataclass
class InsertResult:
    node: TreeNode  # node that ends the inserted key
    block_ids: list[int]  # the tree's blocks for the whole key (existing ones for the shared part)
    num_existing_tokens: int  # tokens that were already cached; the caller frees its duplicates


@dataclass(frozen=True)
class TreeEvent:
    """Something the UI can animate. ``kind`` is "inserted" | "split" | "hit" | "evicted"."""

    kind: str
    node_id: int
    num_tokens: int
    tick: int
    parent_id: int = -1
    block_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    child_id: int = -1  # "split": the node that kept the tail of the edge


class RadixTree:
    """Page-aligned radix tree (prefix cache) from token ids to KV block ids.

    Owns: the nodes, their lock counts / hit counts / LRU ticks, an LRU heap of eviction
    candidates, running evictable/protected counters and a bounded event log.

    Invariants (``check_integrity`` verifies all of them):
      * every non-root edge is a non-empty multiple of ``block_size`` tokens with one block id per
        ``block_size`` tokens; a child is keyed by its first block of tokens; splits happen only at
        block boundaries, so a match is always a whole number of blocks;
      * ``lock_ref >= 0`` and a parent's ``lock_ref`` >= each child's (locks cover root-paths);
      * ``evictable_size`` / ``protected_size`` equal the tokens in unlocked / locked nodes;
      * no block id appears twice; every unlocked leaf has a live entry in the LRU heap.

    Cost (L = key length, B = block_size, D = tree depth): match/insert O(L) plus one dict lookup
    per edge; lock/unlock O(D); "how much could I evict" O(1) via ``evictable_size``; evict
    O(k log h) for k removed nodes and heap size h. The heap uses lazy deletion: entries go stale
    when a node is touched, locked or gains a child, and are skipped when popped.
    """

    def __init__(self, block_size: int, max_events: int = 256) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.tick = 0
        self.version = 0
        self.evictable_size = 0
        self.protected_size = 0
        self._ids = itertools.count()
        self.root = self._new_node(parent=None, token_ids=[], block_ids=[])
        self._num_nodes = 1
        # (last_access, node id, node): ids are unique, so nodes are never compared.
        self._heap: list[tuple[int, int, TreeNode]] = []
        self._events: deque[TreeEvent] = deque(maxlen=max_events)

    # ------------------------------------------------------------------ public API

    def match_prefix(self, token_ids: Sequence[int]) -> MatchResult:
        """Longest cached prefix of ``token_ids``, rounded down to whole blocks.

        If the match ends inside an edge, that node is split so the returned node covers exactly
        the match and the caller can lock just the matched path.
        """
        self.tick += 1
        path, num_tokens = self._walk(token_ids)
        block_ids = [b for node in path for b in node.block_ids]
        if num_tokens > 0:
            for node in path:
                node.hit_count += 1
                self._touch(node)
            end = path[-1]
            self._log("hit", end, num_tokens, block_ids=tuple(block_ids))
            self.version += 1
            self._maybe_compact_heap()
            return MatchResult(end, block_ids, num_tokens)
        return MatchResult(self.root, [], 0)

    def peek_prefix_len(self, token_ids: Sequence[int]) -> int:
        """Length of the cached prefix, without touching the tree (no split, hit or LRU update):
        what a scheduler sorts its queue by."""
        return self._walk(token_ids, split=False)[1]

    def empty_match(self) -> MatchResult:
        """The match of nothing: what a request gets when prefix caching is off."""
        return MatchResult(self.root, [], 0)

    def insert(self, token_ids: Sequence[int], block_ids: Sequence[int]) -> InsertResult:
        """Cache ``token_ids`` whose KV lives in ``block_ids``.

        Where the tree already has the tokens it keeps its own blocks (returned, together with how
        many tokens were present); the rest becomes a new leaf owning the given blocks.
        """
        bs = self.block_size
        if len(token_ids) != len(block_ids) * bs:
            raise ValueError(
                f"insert needs len(token_ids) == len(block_ids) * block_size, got "
                f"{len(token_ids)} tokens and {len(block_ids)} blocks of {bs}"
            )
        self.tick += 1
        path, existing = self._walk(token_ids)
        result_blocks = [b for node in path for b in node.block_ids]
        for node in path:
            self._touch(node)
        end = path[-1] if path else self.root
        if existing < len(token_ids):
            leaf = self._new_node(
                parent=end,
                token_ids=list(token_ids[existing:]),
                block_ids=list(block_ids[existing // bs :]),
            )
            end.children[tuple(leaf.token_ids[:bs])] = leaf
            self._num_nodes += 1
            self.evictable_size += leaf.num_tokens  # new nodes start unlocked
            self._push_candidate(leaf)
            result_blocks.extend(leaf.block_ids)
            self._log("inserted", leaf, leaf.num_tokens, block_ids=tuple(leaf.block_ids),
                      token_ids=tuple(leaf.token_ids))
            self.version += 1
            end = leaf
        self._maybe_compact_heap()
        return InsertResult(end, result_blocks, existing)

    def lock(self, node: TreeNode) -> None:
        """Protect the path root..node from eviction (one running request holds it)."""
        self._check_attached(node)
        n: Optional[TreeNode] = node
        while n is not None and n is not self.root:
            if n.lock_ref == 0:
                self.evictable_size -= n.num_tokens
                self.protected_size += n.num_tokens
            n.lock_ref += 1
            n = n.parent
        if node is not self.root:
            self.version += 1

    def unlock(self, node: TreeNode) -> None:
        """Undo one ``lock(node)``; an unlocked leaf becomes an eviction candidate again."""
        self._check_attached(node)
        # Check the whole path first so a bad call leaves the tree untouched.
        n: Optional[TreeNode] = node
        while n is not None and n is not self.root:
            if n.lock_ref <= 0:
                raise RuntimeError(f"unlock of node {n.id} whose lock_ref is {n.lock_ref}")
            n = n.parent
        n = node
        while n is not None and n is not self.root:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self.protected_size -= n.num_tokens
                self.evictable_size += n.num_tokens
                self._push_candidate(n)
            n = n.parent
        if node is not self.root:
            self.version += 1

    def evict(self, num_blocks: int) -> list[int]:
        """Remove least-recently-used unlocked leaves until ``num_blocks`` blocks are freed.

        Whole nodes go, so the result may overshoot; it falls short only when nothing unlocked is
        left. A parent left as an unlocked leaf joins the candidates.
        """
        self.tick += 1
        freed: list[int] = []
        while len(freed) < num_blocks and self._heap:
            last_access, _, node = heapq.heappop(self._heap)
            if not self._is_candidate(node) or node.last_access != last_access:
                continue  # stale entry (touched, locked, grew a child or already gone)
            parent = node.parent
            assert parent is not None
            self._remove_leaf(node)
            freed.extend(node.block_ids)
            if parent is not self.root:
                self._push_candidate(parent)
        if freed:
            self.version += 1
        self._maybe_compact_heap()
        return freed

    def reset(self) -> list[int]:
        """Drop every node; returns the block ids the tree held. Refuses while anything is locked."""
        if self.protected_size > 0 or any(n.lock_ref for n in self.nodes()):
            raise RuntimeError("cannot reset the radix tree while nodes are locked")
        self.tick += 1
        freed: list[int] = []
        for node in list(self.nodes())[1:]:
            freed.extend(node.block_ids)
            node.evicted = True
            self._log("evicted", node, node.num_tokens, block_ids=tuple(node.block_ids),
                      token_ids=tuple(node.token_ids))
        self.root.children = {}
        self._num_nodes = 1
        self.evictable_size = 0
        self._heap = []
        self.version += 1
        return freed

    @property
    def total_size(self) -> int:
        """Tokens cached in the tree."""
        return self.evictable_size + self.protected_size

    @property
    def num_blocks(self) -> int:
        return self.total_size // self.block_size

    @property
    def evictable_blocks(self) -> int:
        """Blocks ``evict`` could free right now (O(1))."""
        return self.evictable_size // self.block_size

    @property
    def num_nodes(self) -> int:
        """Nodes including the root."""
        return self._num_nodes

    def all_block_ids(self) -> list[int]:
        return [b for node in self.nodes() for b in node.block_ids]

    def nodes(self) -> Iterator[TreeNode]:
        """Preorder, root first, children in insertion order."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(list(node.children.values())))

    def events_since(self, tick: int) -> list[TreeEvent]:
        """Logged events with ``event.tick > tick`` (only the last ``max_events`` are kept)."""
        return [e for e in self._events if e.tick > tick]

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant (see the class docstring)."""
        bs = self.block_size

        def fail(msg: str) -> None:
            raise AssertionError(f"RadixTree integrity: {msg}")

        root = self.root
        if root.parent is not None or root.token_ids or root.block_ids:
            fail("root must have no parent, tokens or blocks")
        if root.lock_ref != 0:
            fail(f"root lock_ref is {root.lock_ref}, expected 0")
        seen_nodes: set[int] = set()
        seen_blocks: set[int] = set()
        evictable = protected = 0
        candidates: list[TreeNode] = []
        stack = [root]
        while stack:
            node = stack.pop()
            if id(node) in seen_nodes:
                fail(f"node {node.id} reached twice (cycle or shared child)")
            seen_nodes.add(id(node))
            if node.evicted:
                fail(f"node {node.id} is marked evicted but still in the tree")
            if node.last_access > self.tick or node.created_at > self.tick:
                fail(f"node {node.id} has a tick from the future")
            for key, child in node.children.items():
                where = f"node {child.id} (child of {node.id})"
                if child.parent is not node:
                    fail(f"{where}: parent pointer does not point back")
                if not child.token_ids or len(child.token_ids) % bs:
                    fail(f"{where}: edge of {len(child.token_ids)} tokens is not a positive "
                         f"multiple of block_size {bs}")
                if len(child.block_ids) != len(child.token_ids) // bs:
                    fail(f"{where}: {len(child.block_ids)} blocks for {len(child.token_ids)} tokens")
                if key != tuple(child.token_ids[:bs]):
                    fail(f"{where}: key {key} != first block {tuple(child.token_ids[:bs])}")
                if child.lock_ref < 0:
                    fail(f"{where}: negative lock_ref {child.lock_ref}")
                if node is not root and child.lock_ref > node.lock_ref:
                    fail(f"{where}: lock_ref {child.lock_ref} exceeds parent's {node.lock_ref}")
                if child.id <= 0:
                    fail(f"{where}: non-root node has id {child.id}")
                for b in child.block_ids:
                    if b in seen_blocks:
                        fail(f"block {b} appears twice in the tree (again in node {child.id})")
                    seen_blocks.add(b)
                if child.lock_ref:
                    protected += child.num_tokens
                else:
                    evictable += child.num_tokens
                    if child.is_leaf:
                        candidates.append(child)
                stack.append(child)
        if len(seen_nodes) != self._num_nodes:
            fail(f"node counter {self._num_nodes} != {len(seen_nodes)} reachable nodes")
        if evictable != self.evictable_size:
            fail(f"evictable_size {self.evictable_size} != recomputed {evictable}")
        if protected != self.protected_size:
            fail(f"protected_size {self.protected_size} != recomputed {protected}")
        heap = self._heap
        for i in range(1, len(heap)):
            if heap[(i - 1) // 2][:2] > heap[i][:2]:
                fail(f"LRU heap order broken at index {i}")
        live = {(e[0], e[1]) for e in heap}
        for node in candidates:
            if (node.last_access, node.id) not in live:
                fail(f"unlocked leaf {node.id} has no current entry in the LRU heap")
        for _, nid, node in heap:
            if node.id != nid:
                fail(f"heap entry id {nid} does not match node {node.id}")

    def pretty(self) -> str:
        """Readable dump, one node per line, indented by depth."""
        lines = [
            f"RadixTree(block_size={self.block_size}, nodes={self._num_nodes}, "
            f"evictable={self.evictable_size}, protected={self.protected_size}, tick={self.tick})"
        ]

        def walk(node: TreeNode, depth: int) -> None:
            toks = node.token_ids
            shown = " ".join(map(str, toks[:12])) + (" ..." if len(toks) > 12 else "")
            lines.append(
                f"{'  ' * depth}#{node.id} [{shown}] blocks={node.block_ids} lock={node.lock_ref} "
                f"hits={node.hit_count} last={node.last_access}"
            )
            for child in node.children.values():
                walk(child, depth + 1)

        for child in self.root.children.values():
            walk(child, 1)
        return "\n".join(lines)

    __str__ = pretty

    # ------------------------------------------------------------------ internals

    def _new_node(self, parent: Optional[TreeNode], token_ids: list[int],
                  block_ids: list[int]) -> TreeNode:
        return TreeNode(
            id=next(self._ids), parent=parent, children={}, token_ids=token_ids,
            block_ids=block_ids, last_access=self.tick, created_at=self.tick,
            last_access_time=time.time(),
        )

    def _walk(self, token_ids: Sequence[int], split: bool = True) -> tuple[list[TreeNode], int]:
        """Follow ``token_ids`` block by block; split the last edge if the match ends inside it
        (unless ``split`` is False: a read-only look).

        Returns the matched nodes (root excluded) and the matched length in tokens.
        """
        bs = self.block_size
        usable = len(token_ids) - len(token_ids) % bs
        node, pos, path = self.root, 0, []
        while pos < usable:
            child = node.children.get(tuple(token_ids[pos : pos + bs]))
            if child is None:
                break
            # The first block matches by construction; compare the rest block by block. `limit`
            # is a multiple of bs, so n stays block-aligned and never passes it.
            n = bs
            edge = child.token_ids
            limit = min(len(edge), usable - pos)
            while n < limit and edge[n : n + bs] == list(token_ids[pos + n : pos + n + bs]):
                n += bs
            if n < len(edge) and split:
                child = self._split(child, n)
            path.append(child)
            pos += n
            node = child
            if n < len(edge):
                break
        return path, pos

    def _split(self, node: TreeNode, n: int) -> TreeNode:
        """Cut ``node``'s edge after ``n`` tokens; return the new node holding the head.

        The head inherits lock_ref, hits and ticks, so locks and counters stay valid on both
        halves; ``node`` keeps its identity (and any heap entry) as the tail.
        """
        bs = self.block_size
        assert 0 < n < node.num_tokens and n % bs == 0
        parent = node.parent
        assert parent is not None
        head = TreeNode(
            id=next(self._ids), parent=parent, children={}, token_ids=node.token_ids[:n],
            block_ids=node.block_ids[: n // bs], lock_ref=node.lock_ref, hit_count=node.hit_count,
            last_access=node.last_access, created_at=node.created_at,
            last_access_time=node.last_access_time,
        )
        parent.children[tuple(head.token_ids[:bs])] = head
        node.token_ids = node.token_ids[n:]
        node.block_ids = node.block_ids[n // bs :]
        node.parent = head
        head.children[tuple(node.token_ids[:bs])] = node
        self._num_nodes += 1
        self._log("split", head, n, block_ids=tuple(head.block_ids), child_id=node.id)
        self.version += 1
        return head

    def _touch(self, node: TreeNode) -> None:
        node.last_access = self.tick
        node.last_access_time = time.time()
        self._push_candidate(node)  # the old heap entry is now stale

    def _is_candidate(self, node: TreeNode) -> bool:
        return (not node.evicted and node is not self.root and node.lock_ref == 0
                and not node.children)

    def _push_candidate(self, node: TreeNode) -> None:
        if self._is_candidate(node):
            heapq.heappush(self._heap, (node.last_access, node.id, node))

    def _maybe_compact_heap(self) -> None:
        # Lazy deletion lets stale entries pile up; rebuild when they dominate.
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._heap = [(n.last_access, n.id, n) for n in self.nodes() if self._is_candidate(n)]
            heapq.heapify(self._heap)

    def _remove_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None and node.is_leaf and node.lock_ref == 0
        del parent.children[tuple(node.token_ids[: self.block_size])]
        node.evicted = True
        self._num_nodes -= 1
        self.evictable_size -= node.num_tokens
        self._log("evicted", node, node.num_tokens, block_ids=tuple(node.block_ids),
                  token_ids=tuple(node.token_ids))

    def _check_attached(self, node: TreeNode) -> None:
        if node.evicted:
            raise RuntimeError(f"node {node.id} is no longer in the tree")

    def _log(self, kind: str, node: TreeNode, num_tokens: int, **extra: object) -> None:
        parent_id = node.parent.id if node.parent is not None else -1
        self._events.append(TreeEvent(kind, node.id, num_tokens, self.tick, parent_id=parent_id,
                                      **extra))  # type: ignore[arg-type]

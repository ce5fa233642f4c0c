"""RadixTree: unit tests for each contract, plus a stateful property test against a naive model."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from miniyaie.radix_tree import RadixTree, TreeNode

BS = 2


def make_tree(block_size: int = BS) -> RadixTree:
    return RadixTree(block_size)


# ----------------------------------------------------------------------------- unit tests


def test_match_on_empty_tree_returns_root() -> None:
    tree = make_tree()
    m = tree.match_prefix([1, 2, 3, 4])
    assert m.node is tree.root and m.block_ids == [] and m.num_tokens == 0
    assert tree.events_since(0) == []
    tree.check_integrity()


def test_insert_then_match_full_and_partial() -> None:
    tree = make_tree()
    r = tree.insert([1, 2, 3, 4, 5, 6], [10, 11, 12])
    assert r.block_ids == [10, 11, 12] and r.num_existing_tokens == 0
    assert tree.total_size == 6 and tree.num_blocks == 3 and tree.evictable_size == 6

    full = tree.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert full.block_ids == [10, 11, 12] and full.num_tokens == 6 and full.node is r.node

    # Ends mid-block: the partial block [5] does not count.
    part = tree.match_prefix([1, 2, 3, 4, 5])
    assert part.block_ids == [10, 11] and part.num_tokens == 4
    # Diverges inside the second block: only the first block matches.
    assert tree.match_prefix([1, 2, 3, 9]).num_tokens == 2
    assert tree.match_prefix([2, 1]).num_tokens == 0
    assert [e.kind for e in tree.events_since(0)].count("hit") == 3
    tree.check_integrity()


def test_split_keeps_blocks_and_locks_on_both_halves() -> None:
    tree = make_tree()
    leaf = tree.insert([1, 2, 3, 4, 5, 6], [10, 11, 12]).node
    tree.lock(leaf)
    assert tree.protected_size == 6 and tree.evictable_size == 0

    m = tree.match_prefix([1, 2, 3, 4, 0, 0])  # ends inside leaf's edge -> split
    head = m.node
    assert head is not leaf and leaf.parent is head and head.parent is tree.root
    assert head.token_ids == [1, 2, 3, 4] and head.block_ids == [10, 11]
    assert leaf.token_ids == [5, 6] and leaf.block_ids == [12]
    assert head.lock_ref == 1 and leaf.lock_ref == 1
    assert tree.protected_size == 6 and tree.evictable_size == 0
    assert any(e.kind == "split" and e.node_id == head.id and e.child_id == leaf.id
               for e in tree.events_since(0))
    tree.check_integrity()

    # Lock the head too (a second request), then unlock the original: head stays locked.
    tree.lock(head)
    tree.unlock(leaf)
    assert head.lock_ref == 1 and leaf.lock_ref == 0
    assert tree.protected_size == 4 and tree.evictable_size == 2
    assert tree.evict(10) == [12]  # only the unlocked tail goes
    tree.check_integrity()
    tree.unlock(head)
    assert tree.evict(10) == [10, 11]
    assert tree.total_size == 0
    tree.check_integrity()


def test_insert_partly_present_returns_existing_blocks() -> None:
    tree = make_tree()
    tree.insert([1, 2, 3, 4], [10, 11])
    r = tree.insert([1, 2, 3, 4, 5, 6], [20, 21, 22])
    assert r.block_ids == [10, 11, 22] and r.num_existing_tokens == 4
    assert r.node.token_ids == [5, 6] and r.node.block_ids == [22]
    # Diverging inside an existing edge splits it; only the shared block is "existing".
    r2 = tree.insert([1, 2, 7, 7], [30, 31])
    assert r2.block_ids == [10, 31] and r2.num_existing_tokens == 2
    # Fully present key: nothing new, returns the existing node.
    r3 = tree.insert([1, 2, 3, 4], [40, 41])
    assert r3.block_ids == [10, 11] and r3.num_existing_tokens == 4
    assert sorted(tree.all_block_ids()) == [10, 11, 22, 31]
    tree.check_integrity()


def test_evict_is_lru_and_frees_parents_after_children() -> None:
    tree = make_tree()
    tree.insert([1, 1], [1])
    tree.insert([2, 2], [2])
    tree.insert([3, 3], [3])
    tree.match_prefix([1, 1])  # 1 is now the most recent
    assert tree.evict(1) == [2]
    assert tree.evict(1) == [3]
    assert tree.evict(1) == [1]
    assert tree.evict(1) == []

    tree.insert([1, 1, 2, 2], [10, 11])
    tree.insert([1, 1, 3, 3], [12, 13])  # splits; the shared head [1,1] is internal
    tree.insert([5, 5], [14])
    tree.match_prefix([5, 5])
    # Leaves [2,2] then [3,3] go first; the head becomes a leaf, older than [5,5].
    assert tree.evict(3) == [11, 13, 10]
    assert tree.evict(5) == [14]
    kinds = [e.kind for e in tree.events_since(0)]
    assert kinds.count("evicted") == 7
    tree.check_integrity()


def test_locked_nodes_are_never_evicted() -> None:
    tree = make_tree()
    a = tree.insert([1, 1, 2, 2], [1, 2]).node
    tree.insert([3, 3], [3])
    tree.lock(a)
    assert tree.evict(100) == [3]
    assert tree.all_block_ids() == [1, 2] and tree.evictable_size == 0
    tree.unlock(a)
    assert sorted(tree.evict(100)) == [1, 2]
    with pytest.raises(RuntimeError):
        tree.unlock(tree.insert([4, 4], [4]).node)  # never locked
    tree.check_integrity()


def test_reset() -> None:
    tree = make_tree()
    n = tree.insert([1, 1, 2, 2], [1, 2]).node
    tree.insert([1, 1, 3, 3], [3, 4])
    tree.lock(n)
    with pytest.raises(RuntimeError):
        tree.reset()
    tree.unlock(n)
    assert sorted(tree.reset()) == [1, 2, 4]  # block 3 was the caller's duplicate of 1
    assert tree.total_size == 0 and list(tree.nodes()) == [tree.root]
    assert n.evicted
    with pytest.raises(RuntimeError):
        tree.lock(n)  # stale handle
    tree.check_integrity()
    assert tree.insert([1, 1], [9]).num_existing_tokens == 0


def test_misaligned_insert_raises() -> None:
    tree = make_tree()
    with pytest.raises(ValueError):
        tree.insert([1, 2, 3], [1, 2])
    with pytest.raises(ValueError):
        tree.insert([1, 2, 3, 4], [1])
    tree.check_integrity()


def test_version_tick_and_pretty() -> None:
    tree = make_tree()
    v0, t0 = tree.version, tree.tick
    tree.match_prefix([1, 2])
    assert tree.version == v0 and tree.tick == t0 + 1  # miss: nothing changed
    n = tree.insert([1, 2, 3, 4], [5, 6]).node
    assert tree.version > v0
    v1 = tree.version
    tree.lock(n)
    assert tree.version > v1
    text = tree.pretty()
    assert "lock=1" in text and "[1 2 3 4]" in text
    ids = [node.id for node in tree.nodes()]
    assert ids[0] == 0 and len(set(ids)) == len(ids)


def test_events_are_bounded() -> None:
    tree = RadixTree(BS, max_events=5)
    for i in range(10):
        tree.insert([i, i], [i])
    events = tree.events_since(0)
    assert len(events) == 5 and events[-1].tick == tree.tick
    assert tree.events_since(tree.tick) == []


def test_heap_stays_bounded_under_repeated_hits() -> None:
    tree = make_tree()
    tree.insert([1, 1], [1])
    for _ in range(1000):
        tree.match_prefix([1, 1])
    assert len(tree._heap) < 100
    tree.check_integrity()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda t, n: setattr(t, "evictable_size", t.evictable_size + 1),
        lambda t, n: setattr(t, "protected_size", 3),
        lambda t, n: setattr(n, "lock_ref", -1),
        lambda t, n: setattr(n.parent, "lock_ref", 0) or setattr(n, "lock_ref", 1),
        lambda t, n: n.block_ids.append(99),
        lambda t, n: n.token_ids.append(7),
        lambda t, n: setattr(n, "parent", t.root),
        lambda t, n: n.block_ids.__setitem__(0, t.root.children[(1, 1)].block_ids[0]),
        lambda t, n: t._heap.clear(),
        lambda t, n: t.root.children.__setitem__((9, 9), t.root.children.pop((1, 1))),
    ],
)
def test_check_integrity_catches_corruption(corrupt) -> None:
    tree = make_tree()
    tree.insert([1, 1, 2, 2], [1, 2])
    leaf = tree.insert([1, 1, 3, 3], [3, 4]).node
    tree.check_integrity()
    corrupt(tree, leaf)
    with pytest.raises(AssertionError):
        tree.check_integrity()


# ----------------------------------------------------------------------------- property test


class NaiveCache:
    """Every cached block-aligned prefix -> its block id. Prefix-closed by construction."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.blocks: dict[tuple[int, ...], int] = {}

    def match(self, seq: list[int]) -> list[int]:
        out = []
        for k in range(1, len(seq) // self.bs + 1):
            b = self.blocks.get(tuple(seq[: k * self.bs]))
            if b is None:
                break
            out.append(b)
        return out


class RadixTreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tree: RadixTree | None = None
        self.model: NaiveCache | None = None
        self.fresh = itertools.count(1)
        self.locks: list[tuple[TreeNode, list[int]]] = []  # (locked node, its path's blocks)
        self.freed: set[int] = set()  # blocks the "caller" got back (duplicates or evicted)

    @precondition(lambda self: self.tree is None)
    @rule(block_size=st.sampled_from([1, 2, 4]))
    def start(self, block_size: int) -> None:
        self.tree = RadixTree(block_size, max_events=16)
        self.model = NaiveCache(block_size)

    def seq(self, draw_tokens: list[int]) -> list[int]:
        bs = self.tree.block_size
        return draw_tokens[: len(draw_tokens) - len(draw_tokens) % bs]

    @precondition(lambda self: self.tree is not None)
    @rule(tokens=st.lists(st.integers(0, 2), max_size=12))
    def insert(self, tokens: list[int]) -> None:
        bs = self.tree.block_size
        tokens = self.seq(tokens)
        given = [next(self.fresh) for _ in range(len(tokens) // bs)]
        expected_existing = self.model.match(tokens)
        r = self.tree.insert(tokens, given)
        assert r.num_existing_tokens == len(expected_existing) * bs
        assert r.block_ids == expected_existing + given[len(expected_existing):]
        # The caller frees its duplicates for the part that was already cached.
        self.freed.update(given[: len(expected_existing)])
        for k in range(len(expected_existing), len(given)):
            self.model.blocks[tuple(tokens[: (k + 1) * bs])] = given[k]

    @precondition(lambda self: self.tree is not None)
    @rule(tokens=st.lists(st.integers(0, 2), max_size=14), lock=st.booleans())
    def match(self, tokens: list[int], lock: bool) -> None:
        expected = self.model.match(tokens)
        m = self.tree.match_prefix(tokens)
        assert m.block_ids == expected
        assert m.num_tokens == len(expected) * self.tree.block_size
        if m.num_tokens:
            assert m.node.block_ids == expected[-len(m.node.block_ids):]
        else:
            assert m.node is self.tree.root
        if lock:
            self.tree.lock(m.node)  # locking root (empty match) is a harmless no-op
            if m.num_tokens:
                self.locks.append((m.node, m.block_ids))

    @precondition(lambda self: self.tree is not None and self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1))
        node, _ = self.locks.pop(i)
        self.tree.unlock(node)

    @precondition(lambda self: self.tree is not None)
    @rule(n=st.integers(0, 8))
    def evict(self, n: int) -> None:
        evictable_before = self.tree.evictable_blocks
        freed = self.tree.evict(n)
        assert len(set(freed)) == len(freed)
        locked = {b for _, blocks in self.locks for b in blocks}
        assert not locked & set(freed), "evicted a block on a locked path"
        assert len(freed) >= min(n, evictable_before)
        if len(freed) < n:
            assert self.tree.evictable_size == 0
        gone = set(freed)
        self.model.blocks = {k: b for k, b in self.model.blocks.items() if b not in gone}
        # Evicting leaves keeps the naive model prefix-closed.
        bs = self.tree.block_size
        for key in self.model.blocks:
            assert len(key) == bs or key[:-bs] in self.model.blocks
        self.freed |= gone

    @precondition(lambda self: self.tree is not None)
    @rule()
    def reset(self) -> None:
        if self.locks:
            with pytest.raises(RuntimeError):
                self.tree.reset()
        else:
            freed = self.tree.reset()
            assert sorted(freed) == sorted(self.model.blocks.values())
            self.model.blocks.clear()
            self.freed.update(freed)

    @invariant()
    def consistent(self) -> None:
        if self.tree is None:
            return
        self.tree.check_integrity()
        assert sorted(self.tree.all_block_ids()) == sorted(self.model.blocks.values())
        assert self.tree.num_blocks == len(self.model.blocks)
        assert not self.freed & set(self.tree.all_block_ids())


RadixTreeMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRadixTreeProperties = RadixTreeMachine.TestCase

"""The scheduler: which requests run this step, how many tokens each, and where their KV lives.

Every step it builds one batch under two budgets (``max_num_seqs`` sequences,
``max_num_batched_tokens`` new tokens): running requests first — one token each when decoding,
the next chunk when still prefilling — then waiting requests in policy order. It owns the
radix tree and the block bookkeeping around it, so the rest of the engine never touches
reference counts.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from miniyaie.config import EngineConfig
from miniyaie.kv_cache import KVCacheManager
from miniyaie.radix_tree import RadixTree
from miniyaie.request import Request, RequestStatus

# Past this many waiting requests, matching every one against the tree costs more than the
# cache-aware order saves; fall back to arrival order (SGLang does the same).
LPM_MAX_QUEUE = 128
# A waiting request defers when a request ahead of it in this batch is about to compute at least
# this many of its (uncached) prompt blocks: next step it finds them in the cache instead.
IN_BATCH_SHARE_BLOCKS = 2


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens fed to the network this step, from num_computed_tokens on
    is_decode: bool = field(init=False)  # one generated token (else a prompt chunk or a recompute)

    def __post_init__(self) -> None:
        r = self.request
        self.is_decode = self.num_new_tokens == 1 and r.num_computed_tokens >= r.num_prompt_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so it yields logits to sample."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # extends first, then decodes
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Owns the waiting and running queues, the RadixTree and every block reference a request
    holds. Invariant: each block's reference count equals the number of running requests whose
    block table holds it plus one if the tree holds it (``check_integrity``)."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.block_size = kv.block_size
        self.tree = RadixTree(kv.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- queue -----------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of whichever queue holds it and give back everything it holds."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._release(request, cache=False)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED

    def finish(self, request: Request) -> None:
        """A request is done: its full blocks join the prefix cache, the rest is freed. (A request
        preempted while its last token was still being sampled finishes from the waiting queue.)"""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._release(request, cache=True)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # running requests, oldest first; a request that cannot get blocks preempts the newest
        for request in sorted(self.running, key=lambda r: r.arrival_index):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self._grow(request, request.num_computed_tokens + n):
                victim = max(self.running, key=lambda r: r.arrival_index)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            if request.status == RequestStatus.RUNNING:
                out.scheduled.append(ScheduledRequest(request, n))
                budget -= n
        if not out.preempted:
            budget = self._admit(out, budget)
        # extends first, decodes after: the layout ForwardBatch expects
        out.scheduled.sort(key=lambda s: s.num_new_tokens == 1)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        """Move waiting requests into the batch in policy order while budgets and blocks allow."""
        prefill_in_flight = RadixTree(self.block_size)  # prompts this step or earlier ones still compute
        for r in self.running:
            if r.is_prefilling:
                self._note_prefill(prefill_in_flight, r)
        deferred: list[Request] = []
        for request in self._waiting_in_policy_order():
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            match = self._match(request)
            if (self.config.enable_prefix_cache and
                    prefill_in_flight.match_prefix(request.prompt_token_ids).num_tokens
                    - match.num_tokens >= IN_BATCH_SHARE_BLOCKS * self.block_size):
                deferred.append(request)
                continue
            n = min(request.num_tokens - match.num_tokens, budget)
            needed = self._blocks_for(match.num_tokens + n) - len(match.block_ids)
            if needed > self.kv.num_free_blocks + self.tree.evictable_blocks:
                break  # head-of-line: keep the policy's order rather than skip ahead
            self._start(request, match)
            if not self._grow(request, request.num_computed_tokens + n):
                self._release(request, cache=False)  # lost the race with eviction; try next step
                request.status = RequestStatus.WAITING
                break
            self.waiting.remove(request)
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, n))
            self._note_prefill(prefill_in_flight, request)
            budget -= n
        return budget

    def _waiting_in_policy_order(self) -> list[Request]:
        queue = list(self.waiting)
        if self.config.schedule_policy == "lpm" and self.config.enable_prefix_cache and len(queue) <= LPM_MAX_QUEUE:
            # longest cached prefix first; arrival order breaks ties (and keeps preempted
            # requests, which return to the front, ahead)
            lengths = {id(r): self.tree.peek_prefix_len(self._prefix_key(r)) for r in queue}
            queue.sort(key=lambda r: -lengths[id(r)])
        return queue

    def _note_prefill(self, tree: RadixTree, request: Request) -> None:
        full = request.num_prompt_tokens // self.block_size
        if full:
            tree.insert(request.prompt_token_ids[:full * self.block_size], [-1 - i for i in range(full)])

    # ---- blocks ----------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_key(self, request: Request) -> list[int]:
        # at least the last token must be computed: it yields the logits of the next one
        return request.all_token_ids[:request.num_tokens - 1]

    def _match(self, request: Request):
        if not self.config.enable_prefix_cache:
            return self.tree.empty_match()
        return self.tree.match_prefix(self._prefix_key(request))

    def _start(self, request: Request, match) -> None:
        """Take the matched prefix: one reference per cached block and a lock on its path."""
        self.kv.incref(match.block_ids)
        request.block_table = list(match.block_ids)
        request.num_computed_tokens = match.num_tokens
        if request.num_preemptions == 0:
            request.num_cached_tokens = match.num_tokens
        request.tree_node = match.node
        self.tree.lock(match.node)
        request.status = RequestStatus.RUNNING

    def _grow(self, request: Request, num_tokens: int) -> bool:
        """Make the block table cover ``num_tokens`` slots, evicting cached prefixes if needed."""
        needed = self._blocks_for(num_tokens) - len(request.block_table)
        if needed <= 0:
            return True
        short = needed - self.kv.num_free_blocks
        if short > 0:
            self.kv.release(self.tree.evict(short))
        if needed > self.kv.num_free_blocks:
            return False
        request.block_table.extend(self.kv.allocate(needed))
        return True

    def _preempt(self, request: Request) -> None:
        """Give a running request's blocks back (caching what it computed) and requeue it first."""
        self.running.remove(request)
        self._release(request, cache=True)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def cache_prefill(self, request: Request) -> None:
        """After a prefill chunk: put the prompt's computed full blocks in the tree so requests
        arriving now can share them while this one is still running."""
        if self.config.enable_prefix_cache:
            self._insert(request, min(request.num_computed_tokens, request.num_prompt_tokens))

    def _insert(self, request: Request, num_tokens: int) -> None:
        full = num_tokens // self.block_size
        key = request.all_token_ids[:full * self.block_size]
        result = self.tree.insert(key, request.block_table[:full])
        existing = result.num_existing_tokens // self.block_size
        # where the tree already had these tokens (another request computed them first), keep the
        # tree's blocks and give ours back; blocks new to the tree gain the tree as a holder
        for i in range(existing):
            ours, theirs = request.block_table[i], result.block_ids[i]
            if ours != theirs:
                self.kv.incref([theirs])
                self.kv.release([ours])
                request.block_table[i] = theirs
        self.kv.incref(request.block_table[existing:full])
        self.tree.lock(result.node)
        if request.tree_node is not None:
            self.tree.unlock(request.tree_node)
        request.tree_node = result.node

    def _release(self, request: Request, cache: bool) -> None:
        if cache and self.config.enable_prefix_cache:
            self._insert(request, request.num_computed_tokens)
        if request.tree_node is not None:
            self.tree.unlock(request.tree_node)
            request.tree_node = None
        self.kv.release(request.block_table)
        request.block_table = []
        request.num_computed_tokens = 0

    # ---- cache control and checks ------------------------------------------------------------

    def clear_cache(self) -> int:
        """Drop every unlocked prefix; returns how many blocks went back to the pool."""
        freed = self.tree.evict(self.kv.num_blocks)
        self.kv.release(freed)
        return len(freed)

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        self.tree.check_integrity()
        expected = [0] * self.kv.num_blocks
        for b in self.tree.all_block_ids():
            expected[b] += 1
        for r in self.running:
            if len(set(r.block_table)) != len(r.block_table):
                raise AssertionError(f"request {r.request_id} holds a block twice")
            for b in r.block_table:
                expected[b] += 1
            if r.num_computed_tokens > len(r.block_table) * self.block_size:
                raise AssertionError(f"request {r.request_id} computed past its blocks")
        for r in self.waiting:
            if r.block_table or r.tree_node is not None:
                raise AssertionError(f"waiting request {r.request_id} holds blocks or a lock")
        for b, (want, have) in enumerate(zip(expected, self.kv.ref_counts)):
            if want != have:
                raise AssertionError(f"block {b}: reference count {have}, but {want} holders")
        locks = {}
        for r in self.running:
            node = r.tree_node
            while node is not None and node.parent is not None:
                locks[id(node)] = locks.get(id(node), 0) + 1
                node = node.parent
        for node in self.tree.nodes():
            if node.parent is not None and node.lock_ref != locks.get(id(node), 0):
                raise AssertionError(f"tree node {node.id}: lock count {node.lock_ref}, "
                                     f"{locks.get(id(node), 0)} running requests below it")

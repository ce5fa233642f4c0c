"""The scheduler alone, without a model: budgets, chunked prefill, policies, preemption, and a
hypothesis simulation that keeps every block and lock accounted for.

``Sim`` plays the engine's part: after each schedule it advances ``num_computed_tokens``,
caches finished prefill chunks, appends a fake token where the step samples and finishes
requests at their ``max_tokens``.
"""
from __future__ import annotations

import random

import torch
from hypothesis import given, settings, strategies as st

from miniyaie.config import EngineConfig
from miniyaie.kv_cache import KVCacheManager
from miniyaie.request import Request, RequestStatus, SamplingParams
from miniyaie.scheduler import Scheduler


class Sim:
    def __init__(self, num_blocks=64, block_size=4, **config) -> None:
        self.config = EngineConfig(model="none", device="cpu", block_size=block_size, num_blocks=num_blocks, **config)
        kv = KVCacheManager(1, 1, 2, num_blocks, block_size, torch.float32, torch.device("cpu"))
        self.sched = Scheduler(self.config, kv)
        self.count = 0
        self.finished: list[Request] = []
        self.steps = []

    def add(self, prompt: list[int], max_tokens: int = 4) -> Request:
        r = Request(f"r{self.count}", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0), self.count)
        self.count += 1
        self.sched.add(r)
        return r

    def step(self):
        plan = self.sched.schedule()
        self.steps.append(plan)
        assert plan.num_tokens <= self.config.max_num_batched_tokens
        assert len(plan.scheduled) <= self.config.max_num_seqs
        lens = [s.num_new_tokens for s in plan.scheduled]
        assert lens == sorted(lens, key=lambda n: n == 1), "extends must come before decodes"
        for s in plan.scheduled:
            assert s.num_new_tokens >= 1
            assert s.request.num_computed_tokens + s.num_new_tokens <= len(s.request.block_table) * self.sched.block_size
        sampling = [s.request for s in plan.scheduled if s.samples]
        for s in plan.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            if s.request.num_computed_tokens <= s.request.num_prompt_tokens:
                self.sched.cache_prefill(s.request)
        for r in sampling:
            # a deterministic "model": the next token depends on the sequence so far
            r.append_token(1000 + sum(r.all_token_ids) % 97)
            if len(r.output_token_ids) >= r.params.max_tokens:
                self.sched.finish(r)
                self.finished.append(r)
        self.sched.check_integrity()
        return plan

    def run(self, limit: int = 5000) -> None:
        n = 0
        while self.sched.has_work:
            self.step()
            n += 1
            assert n < limit, "scheduler made no progress"

    def drained(self) -> None:
        self.sched.check_integrity()
        self.sched.clear_cache()
        kv = self.sched.kv
        assert kv.num_free_blocks == kv.num_blocks
        assert all(node.lock_ref == 0 for node in self.sched.tree.nodes())


def test_chunked_prefill_never_stalls_decodes():
    sim = Sim(max_num_batched_tokens=16)
    short = sim.add(list(range(1, 6)), max_tokens=30)
    sim.step()  # short prefilled, now decoding
    long = sim.add(list(range(100, 200)))
    chunks = []
    while long.num_computed_tokens < long.num_prompt_tokens:
        plan = sim.step()
        by_request = {s.request.request_id: s.num_new_tokens for s in plan.scheduled}
        assert by_request.get(short.request_id) == 1, "the decode ran in every step of the long prefill"
        chunks.append(by_request[long.request_id])
    assert len(chunks) >= 100 // 16 and max(chunks) <= 15
    sim.run()
    sim.drained()


def test_lpm_admits_cached_prefix_first_and_fcfs_keeps_arrival_order():
    for policy, expect_first in (("lpm", "cached"), ("fcfs", "fresh")):
        sim = Sim(schedule_policy=policy, max_num_seqs=1)
        shared = list(range(500, 540))
        sim.add(shared + [1, 2])
        sim.run()  # shared prefix now cached
        fresh = sim.add(list(range(700, 730)))
        cached = sim.add(shared + [3, 4, 5])
        plan = sim.step()
        first = plan.scheduled[0].request
        assert first is (cached if expect_first == "cached" else fresh), policy
        if first is cached:
            assert cached.num_cached_tokens == 40
        sim.run()
        sim.drained()


def test_request_waits_for_a_prefix_being_computed_in_the_same_batch():
    sim = Sim(max_num_batched_tokens=256)
    shared = list(range(10, 60))
    a = sim.add(shared + [1])
    b = sim.add(shared + [2])
    plan = sim.step()
    assert [s.request for s in plan.scheduled] == [a], "b defers: a is computing its prefix"
    sim.step()
    assert b.status == RequestStatus.RUNNING and b.num_cached_tokens == 48
    sim.run()
    sim.drained()


def test_preemption_takes_newest_and_requeues_it_first():
    sim = Sim(num_blocks=10, max_num_batched_tokens=64)  # 40 token slots
    old = sim.add(list(range(1, 13)), max_tokens=20)  # grows to 32 tokens: 8 blocks
    new = sim.add(list(range(50, 62)), max_tokens=20)
    preempted = []
    while sim.sched.has_work:
        plan = sim.step()
        preempted += plan.preempted
        if plan.preempted:
            assert sim.sched.waiting[0] is plan.preempted[0]
    assert new in preempted and old not in preempted
    assert sim.sched.num_preemptions == len(preempted) and new.num_preemptions >= 1
    assert old.output_token_ids and len(new.output_token_ids) == 20
    sim.drained()


def test_cache_off_never_shares():
    sim = Sim(enable_prefix_cache=False)
    shared = list(range(10, 50))
    for i in range(4):
        sim.add(shared + [i])
    sim.run()
    assert all(r.num_cached_tokens == 0 for r in sim.finished)
    assert sim.sched.tree.num_blocks == 0
    sim.drained()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10 ** 6), num_blocks=st.integers(12, 40), budget=st.sampled_from([4, 8, 16, 64]),
       policy=st.sampled_from(["lpm", "fcfs"]), cache=st.booleans(), max_seqs=st.integers(1, 8))
def test_random_workloads_keep_every_block_accounted_for(seed, num_blocks, budget, policy, cache, max_seqs):
    """Random prompts sharing random prefixes, arriving while others run, under random pools and
    budgets: integrity after every step, everything finishes, the pool drains, and each request's
    tokens equal what it produces alone (the fake model is deterministic)."""
    rng = random.Random(seed)
    sim = Sim(num_blocks=num_blocks, max_num_batched_tokens=budget, schedule_policy=policy,
              enable_prefix_cache=cache, max_num_seqs=max_seqs)
    bases = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 20))] for _ in range(3)]
    capacity = num_blocks * 4
    requests = []
    for _ in range(rng.randrange(1, 12)):
        prompt = rng.choice(bases) + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 12))]
        max_tokens = rng.randrange(1, 8)
        if len(prompt) + max_tokens > capacity:
            continue
        requests.append(sim.add(prompt, max_tokens))
        for _ in range(rng.randrange(0, 3)):
            if sim.sched.has_work:
                sim.step()
    sim.run()
    assert len(sim.finished) == len(requests)
    for r in requests:
        alone = Sim(num_blocks=num_blocks, enable_prefix_cache=False)
        ref = alone.add(r.prompt_token_ids, r.params.max_tokens)
        alone.run()
        assert r.output_token_ids == ref.output_token_ids
    sim.drained()

"""Attention backends vs a dense reference on fresh random inputs.

The reference materialises each sequence's K/V (cached prefix gathered from the pool, then the
new tokens), and runs plain causal softmax attention with GQA head sharing — no paging, no SDPA.
Batches mix extends (with and without a cached prefix, prefixes ending mid-block) and decodes,
with random non-contiguous block tables.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from miniyaie.attention import ForwardBatch, available_backends, create_backend

from conftest import needs_cpu_kernel


def dense_reference(q, k_new, v_new, k_prefix, v_prefix):
    """One sequence: q/k_new/v_new ``[n, H|KVH, D]``, prefix K/V ``[p, KVH, D]`` -> ``[n, H, D]``."""
    k = torch.cat([k_prefix, k_new]).double()
    v = torch.cat([v_prefix, v_new]).double()
    n, heads, dim = q.shape
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [L, H, D]: query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    p = k_prefix.shape[0]
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) / math.sqrt(dim)
    query_pos = torch.arange(p, p + n)[:, None]
    key_pos = torch.arange(p + n)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)


def random_case(rng: random.Random, num_extends: int, num_decodes: int, block_size: int,
                max_len: int = 70) -> list[tuple[int, int]]:
    """(prefix_len, q_len) per sequence: extends first (some with no prefix, some ending
    mid-block), then decodes (q_len 1)."""
    seqs = []
    for i in range(num_extends):
        prefix = 0 if i == 0 else rng.choice([block_size, block_size * 2 + 1, rng.randrange(1, max_len)])
        seqs.append((prefix, rng.randrange(2, 24)))
    for i in range(num_decodes):
        seqs.append((rng.choice([0, 1, block_size - 1, block_size, rng.randrange(1, max_len)]), 1))
    return seqs


def check_backend(name: str, device: str, dtype: torch.dtype, seqs: list[tuple[int, int]],
                  num_heads: int, num_kv_heads: int, block_size: int, seed: int, atol: float,
                  head_dim: int = 32, strided_q: bool = False, shared_blocks: int = 0) -> None:
    """``shared_blocks``: every decoding sequence's table starts with the same blocks (a cached
    prefix they all share, as a chat burst's system prompt), so its prefix must cover them."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    decoding = [n == 1 for _, n in seqs]
    assert all(p >= shared_blocks * block_size for (p, _), d in zip(seqs, decoding) if d)
    blocks_needed = [-(-(p + n) // block_size) - (shared_blocks if d else 0) for (p, n), d in zip(seqs, decoding)]
    num_blocks = shared_blocks + sum(blocks_needed) + 7
    # random non-contiguous block tables: a shuffled pool, dealt out to the sequences
    pool_order = list(range(num_blocks))
    rng.shuffle(pool_order)
    tables, start = [], shared_blocks
    for need, d in zip(blocks_needed, decoding):
        tables.append((pool_order[:shared_blocks] if d else []) + pool_order[start:start + need])
        start += need

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    k_cache = randn(num_blocks * block_size, num_kv_heads, head_dim).to(device)
    v_cache = randn(num_blocks * block_size, num_kv_heads, head_dim).to(device)
    total = sum(n for _, n in seqs)
    q = randn(total, num_heads, head_dim).to(device)
    if strided_q:  # as the model passes it: the query heads of a [T, H + KVH, D] rotation
        q = torch.cat([q, randn(total, num_kv_heads, head_dim).to(device)], dim=1)[:, :num_heads]
    k = randn(total, num_kv_heads, head_dim).to(device)
    v = randn(total, num_kv_heads, head_dim).to(device)
    # the prefixes' K/V as they sit in the pool before the step
    prefix_kv = []
    for (p, _), table in zip(seqs, tables):
        slots = torch.tensor([table[i // block_size] * block_size + i % block_size for i in range(p)],
                             dtype=torch.long, device=device)
        prefix_kv.append((k_cache[slots].clone(), v_cache[slots].clone()))

    batch = ForwardBatch.build([[0] * n for _, n in seqs], [p for p, _ in seqs], tables,
                               [True] * len(seqs), block_size, torch.device(device))
    if sum(decoding) >= 2:
        assert batch.shared_prefix_len >= shared_blocks * block_size
    backend = create_backend(name, torch.device(device))
    backend.plan(batch)
    out = backend.forward(q, k, v, k_cache, v_cache, 1 / math.sqrt(head_dim), batch)
    assert out.shape == q.shape

    # new K/V landed in their slots
    torch.testing.assert_close(k_cache[batch.slot_mapping], k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache[batch.slot_mapping], v, atol=0, rtol=0)
    row = 0
    for i, (p, n) in enumerate(seqs):
        want = dense_reference(q[row:row + n].cpu(), k[row:row + n].cpu(), v[row:row + n].cpu(),
                               prefix_kv[i][0].cpu(), prefix_kv[i][1].cpu())
        got = out[row:row + n].double().cpu()
        err = (got - want).abs().max().item()
        assert err <= atol, f"sequence {i} (prefix {p}, new {n}): max abs error {err:.2e} > {atol}"
        row += n


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_torch_backend_matches_dense_reference(block_size, gqa, seed):
    rng = random.Random(seed * 100 + block_size + gqa)
    seqs = random_case(rng, num_extends=rng.randrange(1, 4), num_decodes=rng.randrange(0, 5), block_size=block_size)
    check_backend("torch", "cpu", torch.float32, seqs, num_heads=8, num_kv_heads=8 // gqa,
                  block_size=block_size, seed=seed, atol=1e-5)


@pytest.mark.parametrize("seqs", [
    [(0, 9)],  # plain prefill
    [(5, 1)],  # one decode
    [(0, 1), (3, 1), (4, 1), (17, 1)],  # decodes only, one of them the very first token
    [(7, 2), (0, 13), (1, 1)],  # tiny extends, prefix mid-block
    [(32, 16), (31, 17), (33, 15)],  # prefix ending exactly at, just before and just after a block edge
])
def test_torch_backend_edge_layouts(seqs):
    check_backend("torch", "cpu", torch.float32, seqs, num_heads=4, num_kv_heads=2, block_size=16,
                  seed=7, atol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("block_size", [2, 4, 16, 32])  # 2: smaller than the extend kernel's key tile
@pytest.mark.parametrize("gqa", [1, 2, 3, 8])
@pytest.mark.parametrize("head_dim", [16, 20, 64, 72, 128, 192])  # 20: not a multiple of 8, the torch path
def test_cpu_backend_matches_dense_reference(block_size, gqa, head_dim):
    for seed in range(2):
        rng = random.Random(seed * 100 + block_size + gqa + head_dim)
        seqs = random_case(rng, num_extends=rng.randrange(0, 3), num_decodes=rng.randrange(1, 20),
                           block_size=block_size, max_len=300)
        check_backend("cpu", "cpu", torch.float32, seqs, num_heads=gqa * 2, num_kv_heads=2,
                      block_size=block_size, seed=seed, atol=1e-5, head_dim=head_dim, strided_q=seed == 1)


@needs_cpu_kernel
@pytest.mark.parametrize("seqs", [
    [(0, 1)],  # the very first token: one key
    [(5, 1), (0, 1), (15, 1), (16, 1), (17, 1)],  # lengths around a block edge
    [(7, 2), (0, 13), (1, 1), (200, 1)],  # extends in front of decodes
])
def test_cpu_backend_edge_layouts(seqs):
    check_backend("cpu", "cpu", torch.float32, seqs, num_heads=6, num_kv_heads=2, block_size=16,
                  seed=3, atol=1e-5)


@needs_cpu_kernel
@pytest.mark.parametrize("block_size", [2, 16, 32])
@pytest.mark.parametrize("gqa", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [16, 64, 72, 128])
def test_cpu_decodes_sharing_a_prefix_match_dense_reference(block_size, gqa, head_dim):
    """The decode kernel takes a prefix every sequence shares once for all of them (16 query
    heads a vector) when there are heads enough to fill a vector: few and many sequences, lane
    counts around multiples of 16, prefixes just at and past the shared blocks, extends in front."""
    for seed, num_decodes in enumerate([2, 5, 6, 8, 16, 17, 33]):
        rng = random.Random(seed * 1000 + block_size + gqa + head_dim)
        shared_blocks = rng.choice([1, 3, 200 // block_size])
        shared = shared_blocks * block_size
        seqs = [(rng.randrange(0, 40), rng.randrange(2, 9)) for _ in range(rng.randrange(0, 2))]
        seqs += [(shared + rng.choice([0, 1, block_size - 1, block_size, rng.randrange(0, 60)]), 1)
                 for _ in range(num_decodes)]
        check_backend("cpu", "cpu", torch.float32, seqs, num_heads=gqa * 2, num_kv_heads=2,
                      block_size=block_size, seed=seed, atol=1e-5, head_dim=head_dim,
                      strided_q=seed % 2 == 1, shared_blocks=shared_blocks)


@needs_cpu_kernel
def test_cpu_backend_is_the_cpu_default_and_leaves_bf16_to_torch():
    backend = create_backend("auto", torch.device("cpu"))
    assert backend.name == "cpu"
    check_backend("cpu", "cpu", torch.bfloat16, [(3, 4), (9, 1), (40, 1)], num_heads=4, num_kv_heads=2,
                  block_size=16, seed=5, atol=3e-2)  # not the kernel's dtype: SDPA's path
    with pytest.raises(ValueError, match="runs on the CPU"):
        create_backend("cpu", torch.device("meta"))


def _gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return ["torch"]  # the parameter exists so the skip is reported
    return sorted(name for name in available_backends() if name != "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("gqa", [1, 2, 4])
def test_backend_on_cuda_matches_dense_reference(backend, dtype, block_size, gqa):
    for seed in range(3):
        rng = random.Random(seed * 100 + block_size + gqa)
        seqs = random_case(rng, num_extends=rng.randrange(1, 4), num_decodes=rng.randrange(0, 6),
                           block_size=block_size, max_len=300)
        check_backend(backend, "cuda", dtype, seqs, num_heads=8, num_kv_heads=8 // gqa,
                      block_size=block_size, seed=seed, atol=2e-3 if dtype == torch.float32 else 3e-2)


def test_shared_prefix_len_counts_the_leading_blocks_every_decode_shares():
    from miniyaie.attention.batch import shared_prefix_len
    bs = 16
    # three decodes share blocks 7, 8; the third block differs
    tables = [[7, 8, 1], [7, 8, 2, 5], [7, 8, 3]]
    batch = ForwardBatch.build([[0]] * 3, [40, 60, 35], tables, [True] * 3, bs, torch.device("cpu"))
    assert batch.shared_prefix_len == 32
    # an extend in front is not part of it; a single decode shares with nobody
    batch = ForwardBatch.build([[0, 0], [0], [0]], [0, 40, 60], [[9], [7, 8, 1], [7, 8, 2, 5]],
                               [True] * 3, bs, torch.device("cpu"))
    assert batch.shared_prefix_len == 32
    assert ForwardBatch.build([[0]], [40], [[7, 8, 1]], [True], bs, torch.device("cpu")).shared_prefix_len == 0
    # capped by the shortest sequence; nothing shared when the first blocks differ
    tables = np.array([[7, 8, 0], [7, 8, 4]])
    assert shared_prefix_len(tables, np.array([20, 45]), bs) == 20
    assert shared_prefix_len(np.array([[1, 2], [3, 2]]), np.array([30, 30]), bs) == 0
    assert shared_prefix_len(np.array([[1, 2], [1, 2]]), np.array([30, 32]), bs) == 30

"""Triton kernels for paged attention: KV store, paged decode (split-K, GQA-aware, cascade over a
shared prefix), prefix-aware extend.

The pool of one layer is ``[num_slots, kv_heads, head_dim]``; block ``b`` of a block table covers
slots ``b*page .. b*page+page-1``, so token ``n`` of sequence ``s`` lives in slot
``block_tables[s, n // page] * page + n % page``. Every kernel gathers K/V through that formula
(a tile of keys may span several pages), so any power-of-two page size works.

Softmax runs online (flash-attention style) in fp32, in base 2: scores are pre-multiplied by
``scale * log2(e)`` so ``exp2`` replaces ``exp``. Float32 inputs use IEEE dots (tests compare
bit-close to the torch backend); bf16/fp16 inputs use the tensor cores. Every kernel runs the same
inner loop, ``_attend``, over a range of one sequence's tokens; kernels that cover part of a context
write a partial result (output and log-sum-exp) that ``_decode_reduce_kernel`` merges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _store_kv_kernel(K, V, KCache, VCache, Slots,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per new token: copy its K and V rows (all kv heads) into its slot.
    A negative slot means "padding" (CUDA-graph batches) and is skipped."""
    t = tl.program_id(0)
    slot = tl.load(Slots + t)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_KH)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    k = tl.load(K + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(V + t * stride_vt + h * stride_vh + d, mask=mask)
    dst = slot.to(tl.int64) * stride_cs + h * stride_ch + d
    tl.store(KCache + dst, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + dst, v.to(VCache.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """Write ``k, v`` ``[T, kv_heads, head_dim]`` into ``slots`` ``[T]`` (negative = skip)."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.stride(2) == 1
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
        NUM_KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        BLOCK_KH=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4)

@triton.jit
def _attend(q, q_pos, KCache, VCache, table, start, end, kvh, qk_scale, stride_cs, stride_ch,
            m_i, l_i, acc,
            HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of the query rows ``q`` over tokens [start, end) of the sequence whose
    block table starts at ``table``, folded into the running (max, sum, output) ``m_i, l_i, acc``.
    With CAUSAL, row r only sees tokens at positions <= ``q_pos[r]``."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table + offs_n // PAGE, mask=n_mask, other=0)
        slot = block.to(tl.int64) * PAGE + offs_n % PAGE
        kv_off = slot[:, None] * stride_cs + kvh * stride_ch + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(KCache + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        allowed = n_mask[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # every tile has an allowed column: m_new is finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VCache + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_partial(MidO, MidLse, o_off, lse_off, acc, l_i, m_i, row_mask, d_mask):
    """Write a partial result: the normalised output (fp32) and its log2-sum-exp, -inf when the
    range was empty (its weight in the reduce is then 0)."""
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    tl.store(MidO + o_off, acc / safe_l[:, None], mask=row_mask[:, None] & d_mask[None, :])
    lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
    tl.store(MidLse + lse_off, lse, mask=row_mask)


@triton.jit
def _decode_kernel(Q, KCache, VCache, BlockTables, SeqLens, SharedLen, Out, MidO, MidLse,
                   q_row0, seq0, qk_scale,
                   stride_qt, stride_qh, stride_cs, stride_ch, stride_bt,
                   stride_ot, stride_oh, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, CASCADE: tl.constexpr, PRECISION: tl.constexpr):
    """Program (b, kv_head, split): the GROUP query heads sharing ``kv_head`` attend to one
    contiguous range of sequence b's context (the split), reading each K/V tile once for the
    whole group (padded to BLOCK_H >= 16 rows for the tensor cores). With CASCADE the context
    starts after the ``SharedLen`` tokens every sequence shares (``_shared_prefix_kernel`` covers
    those). With one split and no cascade the result is final; otherwise the partial output and
    its log-sum-exp go to MidO/MidLse for the reduce."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + seq0 + b)
    own_start = 0
    if CASCADE:
        own_start = tl.load(SharedLen)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + (q_row0 + b) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    # graph padding rows have seq_len 0 < own_start: their range is empty
    split_len = tl.cdiv(tl.cdiv(tl.maximum(seq_len - own_start, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = own_start + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table = BlockTables + (seq0 + b).to(tl.int64) * stride_bt
    m_i, l_i, acc = _attend(q, 0, KCache, VCache, table, start, end, kvh, qk_scale, stride_cs, stride_ch,
                            m_i, l_i, acc, HEAD_DIM, PAGE, BLOCK_N, BLOCK_D, False, PRECISION)

    if NUM_SPLITS == 1 and not CASCADE:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + (q_row0 + b) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    else:
        _store_partial(MidO, MidLse, b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :],
                       b * stride_lb + heads * stride_lh + split, acc, l_i, m_i, h_mask, d_mask)


@triton.jit
def _shared_prefix_kernel(Q, KCache, VCache, BlockTables, SharedLen, PreO, PreLse,
                          q_row0, seq0, num_seqs, qk_scale,
                          stride_qt, stride_qh, stride_cs, stride_ch, stride_bt,
                          stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                          GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Cascade attention, shared part. Program (row tile, kv_head, split): BLOCK_M query rows —
    (sequence, query head) pairs of every decoding sequence, all heads of ``kv_head`` — attend to
    one split of the first ``SharedLen`` tokens, which every decoding sequence reads from the same
    blocks. Those K/V tiles are read once for the whole batch instead of once per sequence, and the
    many rows make it a matrix product for the tensor cores. Writes partials for the reduce."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    shared_len = tl.load(SharedLen)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    b = offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    m_mask = b < num_seqs
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + (q_row0 + b)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    split_len = tl.cdiv(tl.cdiv(shared_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, shared_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = BlockTables + seq0 * stride_bt  # any decoding row: the shared blocks are the same
    m_i, l_i, acc = _attend(q, 0, KCache, VCache, table, start, end, kvh, qk_scale, stride_cs, stride_ch,
                            m_i, l_i, acc, HEAD_DIM, PAGE, BLOCK_N, BLOCK_D, False, PRECISION)
    _store_partial(PreO, PreLse, b[:, None] * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                   b * stride_lb + heads * stride_lh + split, acc, l_i, m_i, m_mask, d_mask)


@triton.jit
def _decode_reduce_kernel(MidO, MidLse, PreO, PreLse, Out, q_row0,
                          stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                          stride_pb, stride_ph, stride_ps, stride_qb, stride_qh,
                          stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, PRE_SPLITS: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """Program (b, head): merge the partial outputs — the sequence's own splits and, when
    PRE_SPLITS > 0, the shared prefix's — weighting each by exp2(lse - max)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + offs_s)
    parts = tl.load(MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                    mask=d_mask[None, :], other=0.0)
    m = tl.max(lse, 0)
    if PRE_SPLITS > 0:
        offs_p = tl.arange(0, PRE_SPLITS)
        pre_lse = tl.load(PreLse + b * stride_qb + h * stride_qh + offs_p)
        pre_parts = tl.load(PreO + b * stride_pb + h * stride_ph + offs_p[:, None] * stride_ps + offs_d[None, :],
                            mask=d_mask[None, :], other=0.0)
        m = tl.maximum(m, tl.max(pre_lse, 0))
    m = tl.where(m == float("-inf"), 0.0, m)  # empty sequence: every weight is 0
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0)
    if PRE_SPLITS > 0:
        pre_w = tl.exp2(pre_lse - m)
        total += tl.sum(pre_w, 0)
        out += tl.sum(pre_parts * pre_w[:, None], 0)
    out = out / tl.where(total > 0, total, 1.0)
    tl.store(Out + (q_row0 + b) * stride_ot + h * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=d_mask)


@triton.jit
def _extend_kernel(Q, KCache, VCache, BlockTables, SeqLens, CuQLens, Out, qk_scale,
                   stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Program (query tile, sequence, head): BLOCK_M new tokens of one sequence attend to the
    sequence's cached prefix and to the new tokens up to themselves (causal), all read from the
    paged pool (the new tokens' K/V were stored before this runs). Query row m sits at position
    ``prefix_len + m``; keys past the tile's last position are never loaded."""
    tile = tl.program_id(0)
    s_idx = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(CuQLens + s_idx)
    q_len = tl.load(CuQLens + s_idx + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SeqLens + s_idx)
    prefix_len = seq_len - q_len
    kvh = h // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = BlockTables + s_idx.to(tl.int64) * stride_bt
    end = tl.minimum(seq_len, prefix_len + (tile + 1) * BLOCK_M)
    # column 0 is visible to every row, so no row ends with an empty softmax
    m_i, l_i, acc = _attend(q, prefix_len + offs_m, KCache, VCache, table, 0, end, kvh, qk_scale,
                            stride_cs, stride_ch, m_i, l_i, acc, HEAD_DIM, PAGE, BLOCK_N, BLOCK_D, True, PRECISION)

    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def tile_sizes(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(rows, keys) per tile for the many-row kernels: 64 x 64 for 16-bit inputs and head_dim
    <= 128, 32 x 32 otherwise (fp32 tiles take twice the registers and shared memory)."""
    small = dtype != torch.float32 and triton.next_power_of_2(head_dim) <= 128
    return (64, 64) if small else (32, 32)


@dataclass
class CascadeScratch:
    """Where the shared prefix's partial results go: ``pre_o [B, H, S, D]`` fp32 and
    ``pre_lse [B, H, S]`` fp32 for ``S`` prefix splits, and the device scalar holding the
    shared prefix length in tokens (0: no cascade this step)."""

    shared_len: torch.Tensor
    pre_o: torch.Tensor
    pre_lse: torch.Tensor

    @property
    def num_splits(self) -> int:
        return self.pre_o.shape[2]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                     scale: float, page: int, num_splits: int,
                     mid_o: torch.Tensor | None = None, mid_lse: torch.Tensor | None = None,
                     q_row0: int = 0, seq0: int = 0, num_seqs: int | None = None,
                     cascade: CascadeScratch | None = None,
                     block_n: int | None = None, num_warps: int = 4, num_stages: int = 3) -> None:
    """Decode attention for ``num_seqs`` sequences (rows ``q_row0 + i`` of q/out, entries
    ``seq0 + i`` of block_tables/seq_lens). ``num_splits`` (a power of two) > 1, or a
    ``cascade``, needs the scratch ``mid_o [B, H, S, D]`` fp32 and ``mid_lse [B, H, S]`` fp32.
    With ``cascade``, the first ``cascade.shared_len`` tokens, in the same blocks for every
    sequence, are attended once for all sequences, and each sequence's splits cover the rest."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    group = num_heads // kv_heads
    batch = num_seqs if num_seqs is not None else q.shape[0] - q_row0
    if batch == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    partial = num_splits > 1 or cascade is not None
    if partial:
        assert mid_o is not None and mid_lse is not None
        mo, ml = mid_o, mid_lse
    else:
        mo, ml = out, out  # unused
    shared_len = cascade.shared_len if cascade is not None else seq_lens  # unused without cascade
    precision = _precision(q.dtype)
    block_n = block_n or (64 if block_d <= 128 else 32)
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, shared_len, out, mo, ml,
        q_row0, seq0, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        mo.stride(0), mo.stride(1), mo.stride(2) if partial else 0,
        ml.stride(0), ml.stride(1) if partial else 0,
        GROUP=group, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        NUM_SPLITS=num_splits, CASCADE=cascade is not None, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages)
    if not partial:
        return
    pre_o, pre_lse = (cascade.pre_o, cascade.pre_lse) if cascade is not None else (mid_o, mid_lse)
    if cascade is not None:
        block_m, block_n = tile_sizes(q.dtype, head_dim)
        grid = (triton.cdiv(batch * group, block_m), kv_heads, cascade.num_splits)
        _shared_prefix_kernel[grid](
            q, k_cache, v_cache, block_tables, cascade.shared_len, pre_o, pre_lse,
            q_row0, seq0, batch, scale * LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
            pre_o.stride(0), pre_o.stride(1), pre_o.stride(2), pre_lse.stride(0), pre_lse.stride(1),
            GROUP=group, HEAD_DIM=head_dim, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, NUM_SPLITS=cascade.num_splits, PRECISION=precision, num_warps=4, num_stages=2)
    _decode_reduce_kernel[(batch, num_heads)](
        mid_o, mid_lse, pre_o, pre_lse, out, q_row0,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        pre_o.stride(0), pre_o.stride(1), pre_o.stride(2), pre_lse.stride(0), pre_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, NUM_SPLITS=num_splits, PRE_SPLITS=cascade.num_splits if cascade is not None else 0,
        BLOCK_D=block_d, num_warps=4)


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_q_lens: torch.Tensor,
                     out: torch.Tensor, scale: float, page: int, num_seqs: int, max_q_len: int,
                     block_m: int | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int = 2) -> None:
    """Prefix-aware causal attention for the first ``num_seqs`` sequences (rows from
    ``cu_q_lens``), one launch for all of them whatever their lengths."""
    if num_seqs == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    default_m, default_n = tile_sizes(q.dtype, head_dim)
    block_m = block_m or default_m
    block_n = block_n or default_n
    grid = (triton.cdiv(max_q_len, block_m), num_seqs, num_heads)
    _extend_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)

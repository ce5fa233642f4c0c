"""Triton kernels for paged attention: KV store, paged decode (split-K, GQA-aware), prefix-aware extend.

The pool of one layer is ``[num_slots, kv_heads, head_dim]``; block ``b`` of a block table covers
slots ``b*page .. b*page+page-1``, so token ``n`` of sequence ``s`` lives in slot
``block_tables[s, n // page] * page + n % page``. Every kernel gathers K/V through that formula
(a tile of keys may span several pages), so any power-of-two page size works.

Softmax runs online (flash-attention style) in fp32, in base 2: scores are pre-multiplied by
``scale * log2(e)`` so ``exp2`` replaces ``exp``. Float32 inputs use IEEE dots (tests compare
bit-close to the torch backend); bf16/fp16 inputs use the tensor cores.
"""
from __future__ import annotations

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
def _decode_kernel(Q, KCache, VCache, BlockTables, SeqLens, Out, MidO, MidLse,
                   q_row0, seq0, qk_scale,
                   stride_qt, stride_qh, stride_cs, stride_ch, stride_bt,
                   stride_ot, stride_oh, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Program (b, kv_head, split): the GROUP query heads sharing ``kv_head`` attend to one
    contiguous range of sequence b's context (the split), reading each K/V tile once for the
    whole group (padded to BLOCK_H >= 16 rows for the tensor cores). With one split the result
    is final; otherwise the partial output and its log-sum-exp go to MidO/MidLse for the reduce."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + seq0 + b)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + (q_row0 + b) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table = BlockTables + (seq0 + b).to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table + offs_n // PAGE, mask=n_mask, other=0)
        slot = block.to(tl.int64) * PAGE + offs_n % PAGE
        kv_off = slot[:, None] * stride_cs + kvh * stride_ch + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(KCache + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VCache + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    out = acc / safe_l[:, None]
    mask = h_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(Out + (q_row0 + b) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask)
    else:
        tl.store(MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :],
                 out, mask=mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(MidO, MidLse, Out, q_row0,
                          stride_mb, stride_mh, stride_ms, stride_lb, stride_lh, stride_ot, stride_oh,
                          HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, head): merge the splits' partial outputs, weighting each by exp2(lse - max)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + offs_s)
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # empty sequence: every weight is 0
    w = tl.exp2(lse - m)
    parts = tl.load(MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
                    mask=d_mask[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
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
    q_pos = prefix_len + offs_m  # position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = BlockTables + s_idx.to(tl.int64) * stride_bt
    end = tl.minimum(seq_len, prefix_len + (tile + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table + offs_n // PAGE, mask=n_mask, other=0)
        slot = block.to(tl.int64) * PAGE + offs_n % PAGE
        kv_off = slot[:, None] * stride_cs + kvh * stride_ch + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(KCache + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        allowed = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # column 0 is always allowed: m_new is finite
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VCache + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                     scale: float, page: int, num_splits: int,
                     mid_o: torch.Tensor | None = None, mid_lse: torch.Tensor | None = None,
                     q_row0: int = 0, seq0: int = 0, num_seqs: int | None = None,
                     block_n: int | None = None, num_warps: int = 4, num_stages: int = 3) -> None:
    """Decode attention for ``num_seqs`` sequences (rows ``q_row0 + i`` of q/out, entries
    ``seq0 + i`` of block_tables/seq_lens). ``num_splits`` (a power of two) > 1 needs the scratch
    ``mid_o [B, H, S, D]`` fp32 and ``mid_lse [B, H, S]`` fp32."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    group = num_heads // kv_heads
    batch = num_seqs if num_seqs is not None else q.shape[0] - q_row0
    if batch == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        assert mid_o is not None and mid_lse is not None
        mo, ml = mid_o, mid_lse
    else:
        mo, ml = out, out  # unused
    block_n = block_n or (64 if block_d <= 128 else 32)
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, mo, ml,
        q_row0, seq0, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        mo.stride(0), mo.stride(1), mo.stride(2) if num_splits > 1 else 0,
        ml.stride(0), ml.stride(1) if num_splits > 1 else 0,
        GROUP=group, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        NUM_SPLITS=num_splits, PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            mid_o, mid_lse, out, q_row0,
            mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_D=block_d, num_warps=4)


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
    block_d = triton.next_power_of_2(head_dim)
    small = q.dtype != torch.float32 and block_d <= 128
    block_m = block_m or (64 if small else 32)
    block_n = block_n or (64 if small else 32)
    grid = (triton.cdiv(max_q_len, block_m), num_seqs, num_heads)
    _extend_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, cu_q_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=num_heads // kv_heads, HEAD_DIM=head_dim, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages)

"""The Triton attention backend (CUDA): fused KV store, one extend launch, one decode launch per layer.

Per layer the work is at most five launches whatever the batch: store K/V for every new token;
prefix-aware extend attention for all prefill chunks (cached prefix + causal self); paged decode
attention for all decoding sequences (split along the context when the batch alone cannot fill
the GPU); when the decoding sequences share cached prefix blocks, *cascade* attention over that
prefix, read once for the whole batch; then a small reduce that merges the pieces. Nothing here
reads device memory on the host, so a decode step can be captured in a CUDA graph (see
``miniyaie.cuda_graphs``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from miniyaie.attention.backend import AttentionBackend, register_backend
from miniyaie.attention.batch import ForwardBatch
from miniyaie.attention.triton_kernels import (CascadeScratch, tile_sizes, decode_attention,
                                               extend_attention, store_kv)

MAX_SPLITS = 16
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (q load, reduce) outweighs the parallelism


def num_decode_splits(num_seqs: int, kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many pieces to cut each decode sequence's context into: enough programs to fill the
    GPU about twice over, no piece shorter than MIN_TOKENS_PER_SPLIT, a power of two <= 16."""
    want = triton.cdiv(2 * num_sms, max(1, num_seqs * kv_heads))
    by_length = triton.cdiv(max(1, max_seq_len), MIN_TOKENS_PER_SPLIT)
    return min(MAX_SPLITS, triton.next_power_of_2(max(1, min(want, by_length))))


@dataclass
class _TritonPlan:
    num_extends: int
    num_decodes: int
    extend_tokens: int  # rows of q that belong to extends; decodes start here
    max_q_len: int  # longest extend chunk (grid size)
    max_seq_len: int  # longest decode context (split heuristic); graph capture passes the ceiling
    shared_len: Optional[torch.Tensor]  # device scalar: cascade over a shared prefix when set
    max_shared_len: int  # for the prefix split heuristic
    num_splits: Optional[int] = None  # fixed at the first layer, once the head counts are known
    mid_o: Optional[torch.Tensor] = None  # split-K scratch, shared by every layer of the step
    mid_lse: Optional[torch.Tensor] = None
    cascade: Optional[CascadeScratch] = None


class TritonAttentionBackend(AttentionBackend):
    """Attention through the kernels in ``triton_kernels``; reads the device copies of the
    step's lengths (``seq_lens_device``, ``cu_q_lens_device``) and the device block tables.

    ``plan`` reads only host values (lengths, counts) and allocates nothing; the split-K and
    cascade scratch is allocated by the first layer's ``forward`` and reused by the rest, so under
    CUDA-graph capture it lands in the graph's memory pool and replays allocate nothing. Cascade
    runs when the batch carries ``shared_prefix_len_device`` and two or more sequences decode: in
    an eager step when they do share blocks; under capture, in the cascade variant of each graph
    (``miniyaie.cuda_graphs``), whose shared length is an input read at replay.
    """

    name = "triton"

    def __init__(self) -> None:
        self._plan: Optional[_TritonPlan] = None
        self._num_sms = (torch.cuda.get_device_properties(0).multi_processor_count
                         if torch.cuda.is_available() else 132)

    def plan(self, batch: ForwardBatch, max_seq_len: Optional[int] = None) -> None:
        num_extends = batch.num_extends
        num_decodes = batch.num_seqs - num_extends
        q_lens, seq_lens = batch.q_lens, batch.seq_lens
        capturing = max_seq_len is not None  # a graph: the lengths are known only at replay
        if max_seq_len is None:
            max_seq_len = int(seq_lens[num_extends:].max()) if num_decodes else 0
        shared = batch.shared_prefix_len
        cascade = num_decodes >= 2 and batch.shared_prefix_len_device is not None
        self._plan = _TritonPlan(
            num_extends=num_extends,
            num_decodes=num_decodes,
            extend_tokens=int(batch.cu_q_lens[num_extends]),
            max_q_len=int(q_lens[:num_extends].max()) if num_extends else 0,
            max_seq_len=max_seq_len - shared,
            shared_len=batch.shared_prefix_len_device if cascade else None,
            max_shared_len=max_seq_len if capturing else shared,
        )

    def forward(self, q, k, v, k_cache, v_cache, scale, batch):
        plan = self._plan
        store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        out = torch.empty_like(q)
        seq_lens = batch.seq_lens_device if batch.seq_lens_device is not None else batch.seq_lens
        if plan.num_extends:
            cu = batch.cu_q_lens_device if batch.cu_q_lens_device is not None else batch.cu_q_lens
            extend_attention(q, k_cache, v_cache, batch.block_tables, seq_lens, cu, out, scale,
                             batch.block_size, plan.num_extends, plan.max_q_len)
        if plan.num_decodes:
            if plan.num_splits is None:
                self._allocate_scratch(plan, q, k_cache.shape[1])
            decode_attention(q, k_cache, v_cache, batch.block_tables, seq_lens, out, scale,
                             batch.block_size, plan.num_splits, plan.mid_o, plan.mid_lse,
                             q_row0=plan.extend_tokens, seq0=plan.num_extends,
                             num_seqs=plan.num_decodes, cascade=plan.cascade)
        return out

    def _allocate_scratch(self, plan: _TritonPlan, q: torch.Tensor, kv_heads: int) -> None:
        """Choose the split counts and allocate the partial-result buffers for this step."""
        batch, heads, dim = plan.num_decodes, q.shape[1], q.shape[2]

        def partials(splits: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device),
                    torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device))

        plan.num_splits = num_decode_splits(batch, kv_heads, plan.max_seq_len, self._num_sms)
        if plan.num_splits > 1 or plan.shared_len is not None:
            plan.mid_o, plan.mid_lse = partials(plan.num_splits)
        if plan.shared_len is not None:
            # the shared kernel's programs are tiles of (sequence, head) rows, not sequences
            row_tiles = triton.cdiv(batch * (heads // kv_heads), tile_sizes(q.dtype, dim)[0])
            splits = num_decode_splits(row_tiles, kv_heads, plan.max_shared_len, self._num_sms)
            plan.cascade = CascadeScratch(plan.shared_len, *partials(splits))


register_backend("triton", TritonAttentionBackend)

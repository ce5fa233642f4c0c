"""Paged attention in plain torch: runs anywhere, and is the reference the Triton kernels match."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from miniyaie.attention.backend import AttentionBackend, register_backend
from miniyaie.attention.batch import ForwardBatch


@dataclass
class _ExtendPlan:
    start: int  # first row of this sequence in the flat token list
    end: int
    slots: torch.Tensor  # [L] every slot of the sequence, in position order
    mask: torch.Tensor  # [q_len, L] True where a new token may attend


@dataclass
class _DecodePlan:
    start: int  # first decode row in the flat token list
    block_ids: torch.Tensor  # [B * W] every decode sequence's blocks, padded with block 0
    mask: torch.Tensor  # [B, 1, 1, W * block_size] True on a sequence's own tokens


def _sequence_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    offsets = torch.arange(block_size, device=block_table.device)
    return (block_table[:, None].long() * block_size + offsets).flatten()[:length]


def _gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor, block_size: int, num_seqs: int) -> torch.Tensor:
    """[B * W] block ids -> the sequences' K (or V) as [B, KVH, W * block_size, D] (a view)."""
    slots, kv_heads, head_dim = cache.shape
    blocks = cache.view(slots // block_size, block_size, kv_heads, head_dim).index_select(0, block_ids)
    return blocks.view(num_seqs, -1, kv_heads, head_dim).transpose(1, 2)


class TorchAttentionBackend(AttentionBackend):
    """Gathers each sequence's K/V from its blocks and calls SDPA: one call per extend sequence
    (queries attend causally, offset by the cached prefix) and one batched call for all decodes
    (padded to the longest sequence, masked).

    Gathers go through ``index_select`` on dim 0 (whole rows, or whole blocks for decodes: one
    copy per block), several times faster on the CPU than advanced indexing, which copies
    element by element. Decodes fold the query heads that share a KV head into SDPA's query
    length instead of asking SDPA to repeat K/V for GQA."""

    name = "torch"

    def __init__(self) -> None:
        self._extends: list[_ExtendPlan] = []
        self._decode: _DecodePlan | None = None

    def plan(self, batch: ForwardBatch) -> None:
        device = batch.block_tables.device
        bs = batch.block_size
        seq_lens = batch.seq_lens.tolist()
        q_lens = batch.q_lens.tolist()
        cu = batch.cu_q_lens.tolist()
        self._extends = []
        for i in range(batch.num_extends):
            length, q_len = seq_lens[i], q_lens[i]
            slots = _sequence_slots(batch.block_tables[i], length, bs)
            key_pos = torch.arange(length, device=device)
            query_pos = torch.arange(length - q_len, length, device=device)
            self._extends.append(_ExtendPlan(cu[i], cu[i + 1], slots, key_pos[None, :] <= query_pos[:, None]))
        self._decode = None
        if batch.num_extends < batch.num_seqs:
            tables = batch.block_tables[batch.num_extends:].long()
            lens = batch.seq_lens[batch.num_extends:].to(device)
            width = (int(lens.max()) + bs - 1) // bs
            # padding points at block 0: harmless to read, masked out of the softmax
            mask = torch.arange(width * bs, device=device)[None, :] < lens[:, None].long()
            self._decode = _DecodePlan(cu[batch.num_extends], tables[:, :width].flatten(), mask[:, None, None, :])

    def forward(self, q, k, v, k_cache, v_cache, scale, batch):
        k_cache.index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        for p in self._extends:
            qs = q[p.start:p.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            ks = k_cache.index_select(0, p.slots).transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
            vs = v_cache.index_select(0, p.slots).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, scale=scale,
                                               enable_gqa=True)
            out[p.start:p.end] = o[0].transpose(0, 1)
        if self._decode is not None:
            self._attend_decodes(q[self._decode.start:], k_cache, v_cache, scale, batch, out[self._decode.start:])
        return out

    def _attend_decodes(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                        batch: ForwardBatch, out: torch.Tensor) -> None:
        """Writes into ``out`` [B, H, D] the attention of the decode rows ``q`` [B, H, D]."""
        d = self._decode
        num_seqs, num_heads, head_dim = q.shape
        kv_heads = k_cache.shape[1]
        # the heads sharing KV head j are j*G .. j*G+G-1 (as transformers' repeat_kv)
        qs = q.view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)  # [B, KVH, G, D]
        ks = _gather_blocks(k_cache, d.block_ids, batch.block_size, num_seqs)  # [B, KVH, L, D]
        vs = _gather_blocks(v_cache, d.block_ids, batch.block_size, num_seqs)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=d.mask, scale=scale)
        out.copy_(o.reshape(num_seqs, num_heads, head_dim))


register_backend("torch", TorchAttentionBackend)

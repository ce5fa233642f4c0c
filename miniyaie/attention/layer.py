"""RadixAttentionWithPagedKVCache: the attention op of one layer, over the shared paged pool."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miniyaie.attention.backend import AttentionBackend
from miniyaie.attention.batch import ForwardBatch


@dataclass
class AttentionContext:
    """What every layer's attention needs for one forward pass: the step's layout, the backend
    (already planned for it) and the pool it reads and writes."""

    batch: ForwardBatch
    backend: AttentionBackend
    k_pool: torch.Tensor  # [num_layers, num_slots, kv_heads, head_dim]
    v_pool: torch.Tensor


class RadixAttentionWithPagedKVCache(nn.Module):
    """Writes this layer's new K/V into their slots, then attends over each sequence's blocks —
    the cached prefix (possibly shared with other requests through the radix tree) plus the new
    tokens, causally. Holds no state of its own; the pool lives in the KVCacheManager."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return ctx.backend.forward(q, k, v, ctx.k_pool[self.layer_id], ctx.v_pool[self.layer_id],
                                   self.scale, ctx.batch)

"""The CPU backend: attention read straight from the paged pool by C kernels, fp32."""
from __future__ import annotations

import torch

from miniyaie.attention.backend import register_backend
from miniyaie.attention.batch import ForwardBatch
from miniyaie.attention.torch_backend import TorchAttentionBackend
from miniyaie.cpu_kernels import kernel_supports, load_cpu_kernels, paged_attention, write_kv


class CpuAttentionBackend(TorchAttentionBackend):
    """Extends go through ``miniyaie/csrc/paged_extend_attention.c`` and decodes through
    ``paged_decode_attention.c``, both reading each sequence's K/V rows in place instead of
    gathering them into a copy first (the torch backend's way: on the 2-core dev machine, 16 chats
    decoding spent 3-4x longer in attention, and a chat burst's prefill ~0.17 s in SDPA, gathers
    and copies). fp32 only: other dtypes (and shapes beyond the kernels' bounds) take the torch
    backend's path, planned only when they do."""

    name = "cpu"
    _planned: ForwardBatch | None = None  # the batch the torch backend's plan was made for

    def plan(self, batch: ForwardBatch) -> None:
        self._planned = None  # the torch backend's plan, made on first need (most steps never need it)

    def forward(self, q, k, v, k_cache, v_cache, scale, batch):
        if q.dtype != torch.float32 or not kernel_supports(q.shape[1], k_cache.shape[1], q.shape[2], batch.block_size):
            if self._planned is not batch:
                super().plan(batch)
                self._planned = batch
            return super().forward(q, k, v, k_cache, v_cache, scale, batch)
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        return paged_attention(q, k_cache, v_cache, batch, scale)


if load_cpu_kernels() is not None:
    register_backend("cpu", CpuAttentionBackend)

"""Radix attention over the paged KV cache, with pluggable backends (torch everywhere, Triton on CUDA)."""
from miniyaie.attention.backend import AttentionBackend, available_backends, create_backend, register_backend
from miniyaie.attention.batch import ForwardBatch
from miniyaie.attention.layer import RadixAttentionWithPagedKVCache
from miniyaie.attention import torch_backend  # noqa: F401  (registers "torch")

__all__ = ["AttentionBackend", "ForwardBatch", "RadixAttentionWithPagedKVCache", "available_backends",
           "create_backend", "register_backend"]

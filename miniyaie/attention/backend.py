"""The attention backend interface and its registry."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from miniyaie.attention.batch import ForwardBatch


class AttentionBackend(ABC):
    """Stores new tokens' K/V into the paged pool and attends over each sequence's blocks.

    ``plan`` runs once per forward pass (work shared by all layers: gather indices, masks);
    ``forward`` runs once per layer. q is ``[T, num_heads, head_dim]``; k and v are
    ``[T, num_kv_heads, head_dim]``; the result is ``[T, num_heads, head_dim]``.
    """

    name: str

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                batch: ForwardBatch) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _REGISTRY[name] = factory


def create_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` picks Triton on CUDA (when it imports), the C decode kernel on the CPU (where it
    compiles) and torch elsewhere."""
    if name == "auto":
        preferred = {"cuda": "triton", "cpu": "cpu"}.get(device.type)
        name = preferred if preferred in available_backends() else "torch"
    elif name == "cpu" and device.type != "cpu":
        raise ValueError(f"attention backend 'cpu' runs on the CPU, not on {device.type}")
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} is not available here; "
                         f"choose one of {sorted(available_backends())}")
    return _REGISTRY[name]()


def available_backends() -> dict[str, Callable[[], AttentionBackend]]:
    if "triton" not in _REGISTRY and torch.cuda.is_available():
        try:  # Triton kernels load lazily: importing them needs a GPU build of triton
            import miniyaie.attention.triton_backend  # noqa: F401  (registers itself)
        except ImportError:
            pass
    if "cpu" not in _REGISTRY:  # registers itself where the C kernel compiles (once per machine)
        import miniyaie.attention.cpu_backend  # noqa: F401
    return _REGISTRY

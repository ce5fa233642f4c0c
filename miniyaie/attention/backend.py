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
        name = preferred if preferred in available_backends(device) else "torch"
    elif name == "cpu" and device.type != "cpu":
        raise ValueError(f"attention backend 'cpu' runs on the CPU, not on {device.type}")
    if name not in available_backends(device):
        raise ValueError(f"attention backend {name!r} is not available here; "
                         f"choose one of {sorted(available_backends(device))}")
    return _REGISTRY[name]()


def available_backends(device: torch.device | None = None) -> dict[str, Callable[[], AttentionBackend]]:
    """The registered backends, loading the optional ones that can serve ``device`` (any if None)."""
    if "triton" not in _REGISTRY and torch.cuda.is_available() and (device is None or device.type == "cuda"):
        try:  # Triton kernels load lazily: importing them needs a GPU build of triton
            import miniyaie.attention.triton_backend  # noqa: F401  (registers itself)
        except ImportError:
            pass
    if "cpu" not in _REGISTRY and (device is None or device.type == "cpu"):
        import miniyaie.attention.cpu_backend  # noqa: F401  (registers itself where the C kernels compile)
    return _REGISTRY

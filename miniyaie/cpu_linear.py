"""fp32 Linears on the CPU through numpy's OpenBLAS instead of torch's MKL, at decode sizes.

torch's CPU wheel runs fp32 GEMMs through MKL, whose sgemm is slow at small M on AMD CPUs
(measured on the 2-core EPYC dev machine, SmolLM2-135M): the 49152-row lm_head takes 13 ms at
M=1 and 45 ms at M=16 where numpy's bundled OpenBLAS, on one thread, takes 6 and 22 ms; a
layer's four Linears take 0.4 ms instead of 0.6 at M=1. ``BlasLinear`` keeps its weight
transposed ([in, out], contiguous: OpenBLAS's faster layout here; a transposed *view* of the
weight was 22-30% slower over the 30 layers at M=1-30; the copies cost ~0.4 s of start-up) and
multiplies with ``np.matmul``, sharing memory with torch both ways (``Tensor.numpy``, ``torch.from_numpy``).
Above ``BLAS_MAX_ROWS`` rows (prefill chunks, compute-bound) MKL on torch's threads is faster
again (a 256-token prefill: 0.79 s vs 0.99 s) and gets the same transposed weight.

MKL picks its kernels by CPU vendor and runs generic ones on other vendors' CPUs, so the swap is
made only where MKL serves torch on a non-Intel CPU (``mkl_is_slow_here``); on Intel CPUs MKL
stays. OpenBLAS runs on the calling thread only (``pin_openblas_to_one_thread``): torch's OpenMP
workers spin-wait between ops, and an OpenBLAS worker pool on the same cores gets starved.
Inference only: no autograd through the numpy path.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import nn

BLAS_MAX_ROWS = 64  # at most max_num_seqs' default: the lm_head (one row per sequence) stays here


def transposed(weight: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """A contiguous copy of ``weight.t()``, made ``rows`` source rows at a time: each slice fits
    the caches, so this is 1.5-3x faster than ``weight.t().contiguous()`` (whose strided writes
    miss them) for the model's shapes: the swap of SmolLM2-135M's Linears takes 0.43 s instead of 0.5-0.7."""
    out = torch.empty(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    for start in range(0, weight.shape[0], rows):
        out[:, start:start + rows].copy_(weight[start:start + rows].t())
    return out


class BlasLinear(nn.Module):
    """``F.linear(x, weight, bias)`` for fp32 CPU tensors: numpy's BLAS up to ``BLAS_MAX_ROWS``
    rows, torch's above. The weight is a plain attribute, not a parameter or buffer (``.to()``
    and ``state_dict`` don't see it; the numpy path holds a view of it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_t = transposed(weight.detach())  # [in, out]
        self.bias = None if bias is None else bias.detach().clone()
        self._np_weight_t = self.weight_t.numpy()
        self._np_bias = None if self.bias is None else self.bias.numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.is_contiguous():  # the engine's [T, in]
            return self._matmul(x)
        # any leading dims; strided input is copied (numpy's non-BLAS loop would be far slower)
        out = self._matmul(x.reshape(-1, self.in_features).contiguous())
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.shape[0] > BLAS_MAX_ROWS:
            return torch.mm(x2d, self.weight_t) if self.bias is None else torch.addmm(self.bias, x2d, self.weight_t)
        out = np.matmul(x2d.numpy(force=True), self._np_weight_t)  # force: detach when x requires grad
        if self._np_bias is not None:
            out += self._np_bias
        return torch.from_numpy(out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def mkl_is_slow_here() -> bool:
    """True where torch's fp32 GEMMs go through MKL and the CPU is not Intel's (read from
    /proc/cpuinfo; False where that cannot be read)."""
    if not torch.backends.mkl.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            vendor = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        return False
    return vendor not in ("", "GenuineIntel")


_SET_NUM_THREADS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                    "openblas_set_num_threads64_", "openblas_set_num_threads")


def pin_openblas_to_one_thread() -> bool:
    """Make the process's OpenBLAS (numpy's) single-threaded; False if none is loaded or it
    cannot be told. Both pools multi-threaded on the same cores makes decode several times
    slower (2-core dev machine, one stream: 2.4 vs 13 tok/s); torch's threading is left as it is."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "openblas" in line.lower()}
    except OSError:
        return False
    pinned = False
    for path in paths:
        lib = ctypes.CDLL(path)
        setter = next((getattr(lib, name) for name in _SET_NUM_THREADS if hasattr(lib, name)), None)
        if setter is not None:
            setter(1)
            pinned = True
    return pinned


def use_blas_linears(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (fp32, CPU, weights loaded) for a ``BlasLinear``, in
    place. A head tied to the embedding gets its own transposed copy; the embedding stays. Leaves
    the model as it is where numpy's BLAS is not an OpenBLAS that can be pinned to one thread."""
    if not pin_openblas_to_one_thread():
        return model
    linears = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in linears:  # one at a time, so each old weight is freed before the next copy
        child = getattr(parent, name)
        setattr(parent, name, BlasLinear(child.weight, child.bias))
    return model

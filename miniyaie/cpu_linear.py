"""fp32 Linears on the CPU through oneDNN, with each weight packed once into oneDNN's blocked layout.

torch's CPU wheel runs ``F.linear`` through MKL's sgemm, which re-reads the plain [out, in]
weight every call and, on AMD CPUs, runs generic kernels (MKL picks its kernels by CPU vendor).
oneDNN (``torch.ops.mkldnn``, what torch.compile's CPU backend uses for prepacked Linears) is
vendor-neutral JIT code: the weight is reordered once at load into blocks its kernel streams
through, and the product runs on torch's own OpenMP threads. Measured on the 2-core AMD EPYC dev
machine over all of SmolLM2-135M's weights (30 layers' four Linears and the 49,152-row head):

    rows    MKL F.linear   oneDNN packed
    1         68 ms          49 ms
    16       164 ms          89 ms
    64       259 ms         173 ms
    256      768 ms         566 ms

Packing for 16 rows was best or within 5% of the best at every size from 1 to 256 (packing per
size brings nothing). The reorder takes ~0.4 s for the whole model at start-up.

A single row (one sequence decoding) is a stream over the weights, and there the C ``gemv``
(``miniyaie/csrc/gemv.c``) reads them faster (36 ms instead of 49-52 for the whole model, ~15 GB/s)
from the weight as loaded, which is kept beside the packed copy for it (+430 MiB for SmolLM2:
the tied head's plain weight is the embedding itself).
"""
from __future__ import annotations

import torch
from torch import nn

from miniyaie.cpu_kernels import gemv, load_cpu_kernels

PACKED_FOR_ROWS = 16  # the batch size oneDNN is told to expect when it chooses the blocking


def row_bucket(rows: int) -> int:
    """The row count oneDNN is called with for ``rows`` rows (zero rows appended up to it).

    oneDNN builds and caches a kernel for every new shape, ~0.6 MiB each, and memory does not come
    back when its cache evicts them: row counts as varied as prefill chunks grew a server by ~0.9 GiB
    (and kept growing with a smaller cache). Buckets bound the shapes: exact up to 16 rows (decode
    batches), then about 8 per doubling (at most 1/8 more rows from 32 on; 17 -> 20 at worst)."""
    if rows <= 16:
        return rows
    step = max(4, 1 << (rows.bit_length() - 4))
    return -(-rows // step) * step


class PackedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` for fp32 CPU tensors: one contiguous row through the C
    ``gemv`` on the weight as given, anything else through oneDNN on its packed copy. Holds both
    as plain attributes (not parameters: ``.to()`` and ``state_dict`` don't see them); without
    the C kernels only the packed copy is kept. Inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS)
        self.weight = weight.detach().contiguous() if load_cpu_kernels() is not None else None
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous():
            return gemv(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)
        padded = row_bucket(rows.shape[0])
        if padded != rows.shape[0]:
            rows = torch.cat([rows, rows.new_zeros(padded - rows.shape[0], self.in_features)])
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out[:x.numel() // self.in_features].view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packed_linears_available() -> bool:
    """True where this torch has oneDNN on the CPU."""
    return torch.backends.mkldnn.is_available()


def use_packed_linears(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (fp32, CPU, weights loaded) for a ``PackedLinear``, in
    place. A head tied to the embedding gets its own packed copy; its plain weight stays the embedding."""
    linears = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in linears:  # one at a time, so each old weight is freed before the next copy
        child = getattr(parent, name)
        setattr(parent, name, PackedLinear(child.weight, child.bias))
    return model

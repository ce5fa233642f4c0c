"""fp32 Linears on the CPU: decode-sized batches through the C ``linear`` kernel, reading each weight
as 1-byte block codes where it has them; larger batches (prefill) through oneDNN on a packed copy.

A decode step streams every weight from memory (SmolLM2's fp32 weights are 540 MB; the caches hold
a few) for a handful of rows, so how many bytes a weight takes decides the step. The embedded
model is a GGUF Q4_1/Q8_0 checkpoint converted to fp32, and its fp32 weights are exactly
``scale * code + offset`` per block of 32 (``cpu_kernels.find_block_codes`` checks every value):
the C kernel reads the codes, a quarter of the bytes, and expands them in cache to the same fp32
values, so the arithmetic is the fp32 model's. Weights without such codes (a model stored in
fp32/bf16) go through the same kernel as fp32.

Larger batches are bound by arithmetic, where oneDNN's JIT GEMM (``torch.ops.mkldnn``, what
torch.compile's CPU backend uses for prepacked Linears) beats the kernel: the weight is reordered
once at load into the blocked layout its kernel streams through, and runs on torch's own OpenMP
threads. Measured on the 2-core AMD EPYC dev machine over all of SmolLM2-135M's weights, one run:

    rows    C kernel, codes   C kernel, fp32   oneDNN packed fp32   (MKL F.linear, earlier)
    1            22 ms            41 ms             56 ms                68 ms
    16           54 ms            72 ms             87 ms               164 ms
    64          168 ms           212 ms            183 ms               259 ms
    256         684 ms           778 ms            610 ms               768 ms

(medians of 5 in one run; the box drifts 10-20%. oneDNN caught up at ~128 rows on codes, ~48 on fp32.)
"""
from __future__ import annotations

import torch
from torch import nn

from miniyaie.cpu_kernels import BlockCodes, find_block_codes, linear, load_cpu_kernels

PACKED_FOR_ROWS = 16  # the batch size oneDNN is told to expect when it chooses the blocking
KERNEL_MAX_ROWS = 48  # up to here the C kernel is faster, on codes or fp32 (decode batches); oneDNN above


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


class CpuLinear(nn.Module):
    """``F.linear(x, weight, bias)`` for fp32 CPU tensors. Holds oneDNN's packed copy of the weight
    (the weight as given until the first batch over ``KERNEL_MAX_ROWS`` packs it) and, for the C
    kernel, the weight's block codes or else the weight as given (neither without the C kernels,
    or when in_features is not a multiple of 8). All plain attributes, not parameters: ``.to()``
    and ``state_dict`` don't see them. Inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # packed on the first batch that needs it (a prefill): 0.4 s of start-up for SmolLM2 otherwise
        self.packed_weight: torch.Tensor | None = None
        self._to_pack: torch.Tensor | None = weight.detach()
        self.kernel_weight: torch.Tensor | BlockCodes | None = None
        if load_cpu_kernels() is not None and self.in_features % 8 == 0:
            self.kernel_weight = find_block_codes(weight) or weight.detach().contiguous()
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernel_weight is not None and 0 < rows.shape[0] <= KERNEL_MAX_ROWS:
            out = linear(rows.detach().contiguous(), self.kernel_weight, self.bias)
        else:
            out = self._onednn(rows)
        return out.view(*x.shape[:-1], self.out_features)

    def _onednn(self, rows: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is None:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self._to_pack, PACKED_FOR_ROWS)
            self._to_pack = None
        count, padded = rows.shape[0], row_bucket(rows.shape[0])
        if padded != count:
            rows = torch.cat([rows, rows.new_zeros(padded - count, self.in_features)])
        return torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")[:count]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def cpu_linears_available() -> bool:
    """True where this torch has oneDNN on the CPU."""
    return torch.backends.mkldnn.is_available()


def use_cpu_linears(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (fp32, CPU, weights loaded) for a ``CpuLinear``, in
    place. A head tied to the embedding gets its own packed copy and codes; without codes, the
    kernel's weight is the embedding itself."""
    linears = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name in linears:  # one at a time, so each old weight is freed before the next copy
        child = getattr(parent, name)
        setattr(parent, name, CpuLinear(child.weight, child.bias))
    return model

"""fp32 Linears on the CPU: every batch size through the C ``linear`` kernel, reading each weight
as 1-byte block codes where it has them.

A decode step streams every weight from memory (SmolLM2's fp32 weights are 540 MB; the caches hold
a few) for a handful of rows, so how many bytes a weight takes decides the step. The embedded
model is a GGUF Q4_1/Q8_0 checkpoint converted to fp32, and its fp32 weights are exactly
``scale * code + offset`` per block of 32 (``cpu_kernels.find_block_codes`` checks every value):
the C kernel reads the codes, a quarter of the bytes, and expands them in cache to the same fp32
values, so the arithmetic is the fp32 model's. Weights without such codes (a model stored in
fp32/bf16) go through the same kernel as fp32, read in place. Where the CPU has AVX-512 VNNI, Q4_1
codes (the embedded model's layers) multiply in integers instead (``csrc/linear_q4.c``: x rounded
to 23 bits per block of 32 and split into three bytes, the products exact in int32), 0.7-0.8x the
time at fp32's precision; the tables below are the fp32 kernel's.

Prefill chunks are bound by arithmetic, and there the kernel keeps up with oneDNN's JIT GEMM on a
packed copy of the weight (which this module used above 48 rows before). Measured on the
2-core AMD EPYC dev machine over all of SmolLM2-135M's 30 layers and head (each weight read from
memory, as in a real step; medians of 9, ours and oneDNN alternating):

    rows    C kernel, codes   C kernel, fp32   oneDNN packed fp32
    16           47 ms             65 ms             78 ms
    64          127 ms                              158 ms
    219         489 ms            516 ms            491 ms
    512        1176 ms                             1159 ms

One kernel for every size: no second copy of the weights (oneDNN's packed copy of SmolLM2 is
540 MB, and packing it stalled the first prefill for ~0.8 s), and no cache of oneDNN kernels per
batch shape, which grew with every new prefill length.
"""
from __future__ import annotations

import torch
from torch import nn

from miniyaie.cpu_kernels import (BlockCodes, KernelWeight, Q4Panels, find_block_codes, linear, load_cpu_kernels,
                                  multiplies_q4_codes_fast, q4_panels)


class CpuLinear(nn.Module):
    """``F.linear(x, weight, bias)`` for fp32 CPU tensors, through the C kernels. Holds the weight's
    block codes (Q4_1's laid out for the integer products where those are fast), or else the fp32
    weight as given (``kernel_weight``), and a copy of the bias, as plain attributes, not
    parameters: ``.to()`` and ``state_dict`` don't see them. Needs the C kernels and
    ``in_features`` a multiple of 8 (``supports``). Inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        assert self.supports(weight), "CpuLinear needs the C kernels and in_features a multiple of 8"
        self.out_features, self.in_features = weight.shape
        self.kernel_weight: KernelWeight = kernel_weight(weight)
        self.bias = None if bias is None else bias.detach().clone()

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return (load_cpu_kernels() is not None and weight.dtype == torch.float32 and weight.device.type == "cpu"
                and weight.shape[1] % 8 == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().reshape(-1, self.in_features).contiguous()
        return linear(rows, self.kernel_weight, self.bias).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = ("Q4_1 codes, integer products" if isinstance(self.kernel_weight, Q4Panels)
                else "block codes" if isinstance(self.kernel_weight, BlockCodes) else "fp32")
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kind}"


def kernel_weight(weight: torch.Tensor) -> KernelWeight:
    """What the C kernels read for ``weight``: its Q4_1 codes laid out for the integer products where
    those are fast here, else its block codes, else the fp32 weight itself."""
    codes = find_block_codes(weight)
    if codes is None:
        return weight.detach().contiguous()
    return (multiplies_q4_codes_fast() and q4_panels(codes)) or codes


def use_cpu_linears(model: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (weights loaded) that the kernel takes (``CpuLinear.supports``:
    fp32 on the CPU, where the C kernels compiled) for a ``CpuLinear``, in place. A head tied to the
    embedding gets its own codes; without codes, the kernel reads the embedding itself."""
    linears = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear and CpuLinear.supports(child.weight)]
    for parent, name in linears:  # one at a time, so each old weight is freed before the next copy
        child = getattr(parent, name)
        setattr(parent, name, CpuLinear(child.weight, child.bias))
    return model

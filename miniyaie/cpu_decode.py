"""Decode steps on the CPU with no torch in between: every op of every layer is a direct call into
the C kernels (``miniyaie/csrc``), on pointers taken once.

At decode batch sizes a layer's arithmetic is small, and getting to it cost as much again: module
calls, views, allocations and the wrappers' checks took ~0.5 ms a layer on the 2-core dev machine,
as long as the products themselves at one sequence. This runs a decode-only step as a plain loop of
kernel calls over scratch buffers allocated once per step. It is the CPU's counterpart of the CUDA
graphs (``miniyaie/cuda_graphs.py``), and like them it computes exactly what the model's forward
computes on the same kernels (a test compares the two bit for bit); the model's forward stays the
path for extends and for everything this does not cover.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from miniyaie.attention.batch import ForwardBatch
from miniyaie.cpu_kernels import kernel_supports, load_cpu_kernels, weight_pointers
from miniyaie.cpu_linear import CpuLinear
from miniyaie.kv_cache import KVCacheManager
from miniyaie.model import DecoderLayer, LlamaFamilyModel

FLOAT = 4  # bytes: pointers into fp32 buffers advance by this much per element


@dataclass(frozen=True)
class _Linear:
    """The arguments of the C ``linear`` for one layer's weight (pointers as ints)."""

    weight: int | None  # fp32 [n, k], or None when the codes below are given
    codes: int | None
    scales: int | None
    offsets: int | None
    bias: int | None
    out_features: int
    in_features: int

    @classmethod
    def of(cls, layer: CpuLinear) -> _Linear:
        return cls(*weight_pointers(layer.kernel_weight), None if layer.bias is None else layer.bias.data_ptr(),
                   layer.out_features, layer.in_features)


def _linears(layer: DecoderLayer) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """A layer's Linears in the order of ``_Layer``: qkv, o, gate/up, down."""
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


@dataclass(frozen=True)
class _Layer:
    input_norm: int
    post_norm: int
    qkv: _Linear
    o: _Linear
    gate_up: _Linear
    down: _Linear


class CpuDecodeSteps:
    """Runs decode-only steps of ``model`` (fp32, on the CPU, its Linears swapped for ``CpuLinear``s)
    over the pool of ``kv``. Holds the layers' weight pointers, not the weights: the model owns them
    and must outlive this (the runner holds both)."""

    def __init__(self, model: LlamaFamilyModel, kv: KVCacheManager) -> None:
        self.model, self.kv, self.lib = model, kv, load_cpu_kernels()
        self.args = model.args
        self.layers = [_Layer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                              *map(_Linear.of, _linears(layer)))
                       for layer in model.layers]

    @staticmethod
    def supports(model: LlamaFamilyModel, kv: KVCacheManager) -> bool:
        """Whether every op of the model's layers has its kernel here: fp32 on the CPU, every Linear
        on the C kernel (so the kernels compiled), attention within the decode kernel's bounds, no per-head q/k norms (Qwen3)."""
        args = model.args
        linears = [m for layer in model.layers for m in _linears(layer)]
        return (kv.k_pool.device.type == "cpu" and kv.k_pool.dtype == torch.float32
                and not args.qk_norm and kernel_supports(args.num_heads, args.num_kv_heads, args.head_dim, kv.block_size)
                and all(isinstance(m, CpuLinear) for m in linears))

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.num_extends == 0 and batch.num_seqs > 0

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """The step's logits, as ``model(ctx)`` computes them; writes the new K/V into the pool."""
        a, lib, tokens = self.args, self.lib, batch.num_tokens
        heads, kv_heads, head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        qkv_width = (heads + 2 * kv_heads) * head_dim
        x = self.model.embed_tokens(batch.input_ids)  # the residual stream, updated in place
        cos, sin = self.model.rope(batch.positions)
        hidden = torch.empty(tokens, a.hidden_size)  # scratch, reused by every layer
        qkv, rotated = torch.empty(tokens, qkv_width), torch.empty(tokens, heads + kv_heads, head_dim)
        attn, out = torch.empty(tokens, heads * head_dim), torch.empty(tokens, a.hidden_size)
        gate_up, act = torch.empty(tokens, 2 * a.intermediate_size), torch.empty(tokens, a.intermediate_size)
        tables, seq_lens = batch.block_tables, batch.seq_lens
        slots = batch.slot_mapping
        assert tables.dtype == seq_lens.dtype == torch.int32 and tables.stride(1) == 1 and seq_lens.is_contiguous()
        assert slots.dtype == torch.int64 and slots.is_contiguous()
        layer_bytes = self.kv.k_pool[0].numel() * FLOAT
        eps, scale = ctypes.c_float(a.rms_norm_eps), ctypes.c_float(head_dim ** -0.5)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = self.kv.k_pool.data_ptr() + i * layer_bytes, self.kv.v_pool.data_ptr() + i * layer_bytes
            lib.rms_norm(x.data_ptr(), a.hidden_size, layer.input_norm, hidden.data_ptr(), tokens, a.hidden_size, eps)
            self._linear(hidden, layer.qkv, qkv, tokens)
            lib.rotary(qkv.data_ptr(), qkv_width, cos.data_ptr(), sin.data_ptr(), rotated.data_ptr(),
                       tokens, heads + kv_heads, head_dim)
            lib.write_kv(rotated.data_ptr() + heads * head_dim * FLOAT, (heads + kv_heads) * head_dim,
                         qkv.data_ptr() + (heads + kv_heads) * head_dim * FLOAT, qkv_width,
                         k_cache, v_cache, slots.data_ptr(), tokens, kv_heads * head_dim)
            lib.paged_decode_attention(rotated.data_ptr(), (heads + kv_heads) * head_dim, head_dim, k_cache, v_cache,
                                       tables.data_ptr(), tables.stride(0), seq_lens.data_ptr(),
                                       attn.data_ptr(), heads * head_dim, head_dim,
                                       batch.num_seqs, heads, kv_heads, head_dim, batch.block_size, scale)
            self._linear(attn, layer.o, out, tokens)
            x += out
            lib.rms_norm(x.data_ptr(), a.hidden_size, layer.post_norm, hidden.data_ptr(), tokens, a.hidden_size, eps)
            self._linear(hidden, layer.gate_up, gate_up, tokens)
            lib.silu_and_mul(gate_up.data_ptr(), act.data_ptr(), tokens, a.intermediate_size)
            self._linear(act, layer.down, out, tokens)
            x += out
        return self.model.lm_head(self.model.norm(x[batch.logits_indices])).float()

    def _linear(self, x: torch.Tensor, w: _Linear, y: torch.Tensor, rows: int) -> None:
        self.lib.linear(x.data_ptr(), w.weight, w.codes, w.scales, w.offsets, w.bias, y.data_ptr(),
                        rows, w.out_features, w.in_features)

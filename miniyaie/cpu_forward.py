"""Forward steps on the CPU with no torch in between: one call into the C kernels
(``miniyaie/csrc/layers.c``) runs the whole step — the embedding, every layer, the final norm and
the head — on pointers gathered once.

At decode batch sizes a layer's arithmetic is small, and getting to it cost as much again: module
calls, views, allocations and the wrappers' checks took ~0.5 ms a layer on the 2-core dev machine,
as long as the products themselves at one sequence; a Python loop of direct kernel calls still
took ~1.3 ms a 16-sequence step, while the second core waited. So the loop over layers is in C,
and so are the few ops around it (the embedding lookup, the rotary rows, the final norm of the rows
that want logits: ~0.85 ms a step as torch ops, run cold after the weights have streamed through
the caches). Python calls it once a step with the model's weight and pool pointers (ctypes
Structures built at start-up), the batch's tensors and one scratch allocation. Decodes, prefill
chunks and steps mixing both take it. It is the CPU's counterpart of the CUDA graphs
(``miniyaie/cuda_graphs.py``), and it computes exactly what the model's forward computes on the
same kernels (a test compares the two bit for bit); the model's forward stays the path for what
this does not cover (other dtypes, Qwen3's per-head norms).
"""
from __future__ import annotations

import ctypes
import itertools

import torch
from torch import nn

from miniyaie.attention.batch import ForwardBatch
from miniyaie.cpu_kernels import (BlockCodes, HeadScreen, Q4Panels, StepBatch, kernel_supports, load_cpu_kernels,
                                  pointer, screens_greedy_head, weight_pointers)
from miniyaie.cpu_linear import CpuLinear
from miniyaie.kv_cache import KVCacheManager
from miniyaie.model import DecoderLayer, LlamaFamilyModel

_ptr, _i32, _f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_float


class _LinearWeights(ctypes.Structure):
    """layers.c's ``linear_weights``: fp32 rows, block codes, or Q4_1's codes laid out for ``linear_q4``."""

    _fields_ = [("weight", _ptr), ("codes", _ptr), ("scales", _ptr), ("offsets", _ptr), ("q4", Q4Panels.Struct),
                ("bias", _ptr), ("out_features", _i32), ("in_features", _i32)]

    @classmethod
    def of(cls, layer: CpuLinear) -> _LinearWeights:
        w = layer.kernel_weight
        if isinstance(w, Q4Panels):
            return cls(q4=w.struct, bias=pointer(layer.bias), out_features=layer.out_features,
                       in_features=layer.in_features)
        return cls(*weight_pointers(w), Q4Panels.Struct(), pointer(layer.bias), layer.out_features, layer.in_features)


class _DecoderLayer(ctypes.Structure):
    """layers.c's ``decoder_layer``: a layer's weights and its part of the K/V pool."""

    _fields_ = [("input_norm", _ptr), ("post_norm", _ptr), ("qkv", _LinearWeights), ("o", _LinearWeights),
                ("gate_up", _LinearWeights), ("down", _LinearWeights), ("k_cache", _ptr), ("v_cache", _ptr)]


class _ModelEnds(ctypes.Structure):
    """layers.c's ``model_ends``: what a step reads besides its layers."""

    _fields_ = [("embedding", _ptr), ("cos", _ptr), ("sin", _ptr), ("final_norm", _ptr), ("head", _LinearWeights)]


class _StepShape(ctypes.Structure):
    _fields_ = [(name, _i32) for name in ("tokens", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                                         "block_size")] + [("eps", _f32), ("scale", _f32)]


class _StepBuffers(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in ("x", "cos", "sin", "normed", "qkv", "rotated", "attn", "out", "gate_up",
                                         "act", "final")]


def _linears(layer: DecoderLayer) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """A layer's Linears in the order of ``_DecoderLayer``: qkv, o, gate/up, down."""
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


class CpuForward:
    """Runs forward steps of ``model`` (fp32, on the CPU, its Linears swapped for ``CpuLinear``s)
    over the pool of ``kv``. Holds the model's weight and pool pointers, not the weights: the model
    and the pool must outlive this (the runner holds all three). ``head_screen`` (a ``HeadScreen`` of
    the head's block codes, or None) lets a step return greedy tokens instead of logits."""

    def __init__(self, model: LlamaFamilyModel, kv: KVCacheManager) -> None:
        self.model, self.kv, self.lib = model, kv, load_cpu_kernels()
        self.args = model.args
        self._scratch = torch.empty(0)  # the steps' buffers, kept for the next step (run)
        self.lib.forward_step.argtypes = [ctypes.POINTER(_ModelEnds), ctypes.POINTER(_DecoderLayer), _i32,
                                          ctypes.POINTER(_StepShape), ctypes.POINTER(StepBatch),
                                          ctypes.POINTER(_StepBuffers), _ptr, _ptr, _ptr]
        self.lib.forward_step.restype = None
        layer_bytes = kv.k_pool[0].numel() * kv.k_pool.element_size()
        self.layers = (_DecoderLayer * len(model.layers))(*(
            _DecoderLayer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                          *map(_LinearWeights.of, _linears(layer)),
                          kv.k_pool.data_ptr() + i * layer_bytes, kv.v_pool.data_ptr() + i * layer_bytes)
            for i, layer in enumerate(model.layers)))
        # greedy steps' tokens come from the head's integer screen (csrc/greedy_head.c) where it pays
        head = model.lm_head.kernel_weight
        self.head_screen = HeadScreen(head) if isinstance(head, BlockCodes) and screens_greedy_head() else None
        # positions index the rotary tables unchecked: the engine keeps them below max_model_len, at
        # most the tables' length; token ids are checked against the vocabulary when requests arrive
        self.ends = _ModelEnds(model.embed_tokens.weight.data_ptr(), model.rope.cos.data_ptr(),
                               model.rope.sin.data_ptr(), model.norm.weight.data_ptr(), _LinearWeights.of(model.lm_head))

    @staticmethod
    def supports(model: LlamaFamilyModel, kv: KVCacheManager) -> bool:
        """Whether every op of the model's step has its kernel here: fp32 on the CPU, every Linear
        (the head too) on the C kernel (so the kernels compiled), attention within the attention
        kernels' bounds, no per-head q/k norms (Qwen3)."""
        args = model.args
        linears = [m for layer in model.layers for m in _linears(layer)] + [model.lm_head]
        pool = kv.k_pool
        return (pool.device.type == "cpu" and pool.dtype == torch.float32 and pool.is_contiguous()
                and not args.qk_norm and kernel_supports(args.num_heads, args.num_kv_heads, args.head_dim, kv.block_size)
                and all(isinstance(m, CpuLinear) for m in linears)
                and all(t.dtype == torch.float32 and t.is_contiguous()
                        for t in (model.embed_tokens.weight, model.rope.cos, model.rope.sin, model.norm.weight)))

    def run(self, batch: ForwardBatch, greedy: bool = False) -> torch.Tensor:
        """The step's logits, as ``model(ctx)`` computes them, or with ``greedy`` (where ``head_screen``
        is) only their argmaxes, int64 [rows]; writes the new K/V into the pool."""
        a, tokens, rows = self.args, batch.num_tokens, batch.logits_indices.numel()
        heads, kv_heads, head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        widths = (a.hidden_size, head_dim, head_dim, a.hidden_size, (heads + 2 * kv_heads) * head_dim,
                  (heads + kv_heads) * head_dim, heads * head_dim, a.hidden_size, 2 * a.intermediate_size,
                  a.intermediate_size)  # per token, in _StepBuffers' order; then the rows wanting logits
        sizes = [tokens * width for width in widths] + [rows * a.hidden_size]
        if self._scratch.numel() < sum(sizes):  # grown, never shrunk: a fresh allocation each step had the
            self._scratch = torch.empty(sum(sizes))  # kernel zero its pages as they were first written
        scratch = self._scratch
        base, item = scratch.data_ptr(), scratch.element_size()
        buffers = _StepBuffers(*(base + item * start for start in itertools.accumulate(sizes[:-1], initial=0)))
        shape = _StepShape(tokens, a.hidden_size, heads, kv_heads, head_dim, a.intermediate_size, batch.block_size,
                           a.rms_norm_eps, head_dim ** -0.5)
        out = torch.empty(rows, dtype=torch.int64) if greedy else torch.empty(rows, self.model.lm_head.out_features)
        self.lib.forward_step(ctypes.byref(self.ends), self.layers, len(self.layers), ctypes.byref(shape),
                              ctypes.byref(StepBatch.of(batch)), ctypes.byref(buffers), None if greedy else out.data_ptr(),
                              ctypes.byref(self.head_screen.struct) if greedy else None,
                              out.data_ptr() if greedy else None)
        return out

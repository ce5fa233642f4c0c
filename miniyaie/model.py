"""Our Llama-family network (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3), written against the paged KV cache.

transformers supplies the config and the weights; the forward pass is ours. One module per
block, nanoGPT-style: RMSNorm → attention (fused QKV, RoPE, GQA, paged) → RMSNorm → SwiGLU MLP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from miniyaie import cpu_kernels
from miniyaie.attention.layer import AttentionContext, RadixAttentionWithPagedKVCache


@dataclass
class ModelArgs:
    """The shape of a Llama-family network, read from an HF config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    initializer_range: float = 0.02

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        # transformers 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta + rope_scaling
        rope = dict(getattr(config, "rope_parameters", None) or {})
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else getattr(config, "rope_scaling", None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        model_type = getattr(config, "model_type", "llama")
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            initializer_range=getattr(config, "initializer_range", 0.02),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # statistics in fp32 (as transformers does) so bf16 activations don't lose the scale
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: silu(gate) * up, with the gate and up projections side by side in x."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (cpu_kernels.rms_norm if cpu_kernels.handles(x) else rms_norm)(x, self.weight, self.eps)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3's long-context scaling if set."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_len / low, old_len / high
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, looked up once per forward (positions differ per
    sequence) and shared by every layer. Stored in the layout ``rotate`` takes — cos repeated over
    both halves of head_dim, sin negated on the first half — so a rotation is two products and a sum."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        # computed on the CPU even while the model is built on the meta device (tables, not weights)
        positions = torch.arange(args.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, rope_inv_freq(args))
        self.register_buffer("cos", torch.cat((freqs.cos(), freqs.cos()), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((-freqs.sin(), freqs.sin()), dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [T, 1, D] each


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [T, heads, D] in HF's "rotate_half" layout (the first and second
    halves of head_dim form the pairs): x * cos + (x2, x1) * (-sin, sin), in fp32."""
    half = x.shape[-1] // 2
    x32 = x.float()
    swapped = torch.cat((x32[..., half:], x32[..., :half]), dim=-1)
    return torch.addcmul(x32 * cos, swapped, sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=False)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps) if args.qk_norm else None
        self.attn = RadixAttentionWithPagedKVCache(layer_id, args.num_heads, args.num_kv_heads, args.head_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        heads = self.num_heads + self.num_kv_heads
        q_and_k = qkv[:, :self.q_size + self.kv_size].view(-1, heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalises each head before the rotation
            q_and_k = torch.cat((self.q_norm(q_and_k[:, :self.num_heads]), self.k_norm(q_and_k[:, self.num_heads:])), 1)
        # the query and key heads rotate together: one set of elementwise ops per layer, not two
        rotated = (cpu_kernels.rotary if cpu_kernels.handles(q_and_k) else rotate)(q_and_k, *rope)
        q, k = rotated.split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, ctx).flatten(1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj((cpu_kernels.silu_and_mul if cpu_kernels.handles(gate_up) else silu_and_mul)(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, rope, ctx):
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaFamilyModel(nn.Module):
    """The whole network. ``forward`` takes the flat new tokens of a step and returns float32
    logits only for the rows the sampler needs (``batch.logits_indices``)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # an explicit (uninitialised) weight skips Embedding's random init: weights are loaded
        # afterwards anyway, and on the meta device that init pulls in torch._dynamo (~0.7 s)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rope = RotaryEmbedding(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ctx: AttentionContext) -> torch.Tensor:
        batch = ctx.batch
        x = self.embed_tokens(batch.input_ids)
        rope = self.rope(batch.positions)
        for layer in self.layers:
            x = layer(x, rope, ctx)
        x = self.norm(x[batch.logits_indices])
        return self.lm_head(x).float()

    # ---- weights ---------------------------------------------------------------------------

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Every parameter must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def put(name: str, tensor: torch.Tensor, rows: Optional[slice] = None) -> None:
            target = params[name].data if rows is None else params[name].data[rows]
            if target.shape != tensor.shape:
                raise ValueError(f"weight {name}: expected shape {tuple(target.shape)}, got {tuple(tensor.shape)}")
            target.copy_(tensor)
            loaded.add(name)

        q, kv = self.args.num_heads * self.args.head_dim, self.args.num_kv_heads * self.args.head_dim
        inter = self.args.intermediate_size
        fused = {"q_proj": ("qkv_proj", slice(0, q)), "k_proj": ("qkv_proj", slice(q, q + kv)),
                 "v_proj": ("qkv_proj", slice(q + kv, q + 2 * kv)),
                 "gate_proj": ("gate_up_proj", slice(0, inter)), "up_proj": ("gate_up_proj", slice(inter, 2 * inter))}
        for hf_name, tensor in weights.items():
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.args.tie_word_embeddings:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                target, rows = fused[parts[-2]]
                parts[-2] = target
                put(".".join(parts), tensor, rows)
            elif name in params:
                put(name, tensor)
            else:
                raise ValueError(f"unexpected weight {hf_name!r} for this architecture")
        missing = set(params) - loaded
        if self.args.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"weights missing from the checkpoint: {sorted(missing)[:5]}")

    def init_dummy_weights(self, seed: int) -> None:
        """Random weights with the real shapes (benchmarks and tests: no checkpoint needed)."""
        generator = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            else:
                values = torch.randn(p.shape, generator=generator) * self.args.initializer_range
                p.data.copy_(values.to(p.dtype))

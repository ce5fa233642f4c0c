"""The C versions of the small ops between matrix products (``miniyaie/csrc/pointwise.c``) against
the torch functions in ``miniyaie/model.py``, on fresh random inputs: decode-sized and prefill-sized
row counts (the latter split between threads), and the strided views the model hands them."""
from __future__ import annotations

import pytest
import torch

from miniyaie import cpu_kernels
from miniyaie.model import MLP, ModelArgs, RMSNorm, RotaryEmbedding, rms_norm, rotate, silu_and_mul

from conftest import needs_cpu_kernel

pytestmark = needs_cpu_kernel

ROWS = [1, 3, 4, 5, 16, 65, 300]  # one thread up to 4 rows, split between threads from 5


def model_args(num_heads: int = 4, head_dim: int = 8) -> ModelArgs:
    return ModelArgs(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=num_heads,
                     num_kv_heads=1, head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=4096, tie_word_embeddings=False, qkv_bias=False, qk_norm=False)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dim", [8, 576, 1000])
def test_rms_norm(rows, dim):
    gen = torch.Generator().manual_seed(rows * dim)
    weight = torch.randn(dim, generator=gen)
    x = torch.randn(rows, dim, generator=gen) * 3
    torch.testing.assert_close(cpu_kernels.rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5))
    wide = torch.randn(rows, 2 * dim, generator=gen)[:, :dim]  # rows apart by more than dim
    torch.testing.assert_close(cpu_kernels.rms_norm(wide, weight, 1e-6), rms_norm(wide, weight, 1e-6))
    three_d = x.view(rows, 1, dim)
    assert cpu_kernels.rms_norm(three_d, weight, 1e-5).shape == (rows, 1, dim)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("half", [4, 1536])
def test_silu_and_mul(rows, half):
    gen = torch.Generator().manual_seed(rows + half)
    x = torch.randn(rows, 2 * half, generator=gen) * 4  # both tails of the sigmoid
    torch.testing.assert_close(cpu_kernels.silu_and_mul(x), silu_and_mul(x))


@pytest.mark.parametrize("tokens", ROWS)
@pytest.mark.parametrize("heads,head_dim", [(1, 8), (12, 64), (5, 128)])
def test_rotary(tokens, heads, head_dim):
    """On the query-and-key heads of a fused qkv output (rows strided by the v heads after them),
    with the tables of RotaryEmbedding at scattered positions."""
    gen = torch.Generator().manual_seed(tokens * heads + head_dim)
    cos, sin = RotaryEmbedding(model_args(num_heads=heads, head_dim=head_dim))(torch.randint(0, 4096, (tokens,), generator=gen))
    qkv = torch.randn(tokens, (heads + 2) * head_dim, generator=gen)
    q_and_k = qkv[:, :(heads + 1) * head_dim].view(tokens, heads + 1, head_dim)
    torch.testing.assert_close(cpu_kernels.rotary(q_and_k, cos, sin), rotate(q_and_k, cos, sin))


def test_fp32_on_the_cpu_takes_them_other_dtypes_take_torchs_ops(monkeypatch):
    calls = []
    for name in ("rms_norm", "silu_and_mul"):
        original = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    norm, mlp = RMSNorm(32, 1e-6), MLP(model_args())
    norm(torch.randn(3, 32)), mlp(torch.randn(3, 32))
    assert calls == ["rms_norm", "silu_and_mul"]
    norm.double()(torch.randn(3, 32).double()), mlp.double()(torch.randn(3, 32).double())
    assert calls == ["rms_norm", "silu_and_mul"]

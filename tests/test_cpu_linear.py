"""PackedLinear (oneDNN on a prepacked weight) against torch's F.linear, and the swap of a model's Linears."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniyaie.cpu_kernels import gemv
from miniyaie.cpu_linear import PackedLinear, row_bucket, use_packed_linears
from miniyaie.model import LlamaFamilyModel, ModelArgs

from conftest import needs_cpu_kernel as needs_cpu_kernels

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features,out_features", [(64, 128), (576, 960), (1536, 576), (576, 3072)])
def test_packed_linear_matches_f_linear(in_features, out_features, bias):
    gen = torch.Generator().manual_seed(in_features * out_features + bias)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    b = torch.randn(out_features, generator=gen) if bias else None
    layer = PackedLinear(weight, b)
    with torch.inference_mode():  # as the engine runs it
        for m in (1, 2, 3, 5, 8, 16, 17, 31, 40, 65, 150, 300):  # decode batches and prefill chunks
            x = torch.randn(m, in_features, generator=gen)
            got = layer(x)
            assert got.shape == (m, out_features) and got.dtype == torch.float32
            torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@needs_cpu_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features,out_features", [(1, 1), (3, 5), (576, 960), (1536, 576), (576, 49152)])
def test_gemv_matches_f_linear(in_features, out_features, bias):
    """The C kernel a single row takes (PackedLinear sends it there), on fresh random inputs."""
    gen = torch.Generator().manual_seed(in_features + out_features + bias)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(1, in_features, generator=gen)
    torch.testing.assert_close(gemv(x, weight, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@needs_cpu_kernels
def test_one_row_goes_through_gemv(monkeypatch):
    from miniyaie import cpu_linear
    calls = []
    monkeypatch.setattr(cpu_linear, "gemv", lambda *args: calls.append(args) or gemv(*args))
    weight = torch.randn(96, 64)
    layer = PackedLinear(weight, None)
    assert layer.weight.data_ptr() == weight.data_ptr()  # the plain weight is kept as given, not copied
    layer(torch.randn(1, 64))
    layer(torch.randn(2, 64))
    layer(torch.randn(64, 2).t()[:1])  # one row, but strided: oneDNN
    assert len(calls) == 1


def test_row_buckets_bound_the_shapes_oneDNN_sees():
    """Every row count maps to a bucket at least as large; decode sizes stay exact; prefill chunks of
    up to 2,048 rows reach few distinct shapes (oneDNN keeps a kernel per shape)."""
    buckets = [row_bucket(rows) for rows in range(0, 2049)]
    assert all(b >= rows for rows, b in enumerate(buckets))
    assert buckets[:17] == list(range(17))
    assert max(b / rows for rows, b in enumerate(buckets) if rows > 16) <= 1.18
    assert max(b / rows for rows, b in enumerate(buckets) if rows >= 32) <= 1.125
    assert len(set(buckets)) <= 80


def test_packed_linear_takes_any_layout():
    """Leading dims, strided views, no rows, and (outside inference mode) an input needing grad."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    layer = PackedLinear(weight, bias)
    for x in (torch.randn(2, 3, 64, generator=gen), torch.randn(64, 7, generator=gen).t(),
              torch.randn(4, 128, generator=gen)[:, ::2], torch.randn(0, 64),
              torch.randn(5, 64, generator=gen, requires_grad=True)):
        torch.testing.assert_close(layer(x).detach(), F.linear(x, weight, bias).detach(), rtol=1e-5, atol=1e-5)


def tiny_args(tied: bool) -> ModelArgs:
    return ModelArgs(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=64, tie_word_embeddings=tied, qkv_bias=True, qk_norm=False)


@pytest.mark.parametrize("tied", [False, True])
def test_swap_replaces_every_linear_and_keeps_the_values(tied):
    model = LlamaFamilyModel(tiny_args(tied))
    model.init_dummy_weights(seed=0)
    if tied:
        assert model.lm_head.weight is model.embed_tokens.weight
    embedding = model.embed_tokens.weight
    before = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
              for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert len(before) == 2 * 4 + 1 and before["layers.0.self_attn.qkv_proj"][1] is not None

    assert use_packed_linears(model) is model
    modules = dict(model.named_modules())
    assert not any(isinstance(m, nn.Linear) for m in modules.values())
    assert model.embed_tokens.weight is embedding  # the embedding stays a torch parameter
    for name, (weight, bias) in before.items():
        assert isinstance(modules[name], PackedLinear)
        x = torch.randn(5, weight.shape[1])
        torch.testing.assert_close(modules[name](x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    if tied and model.lm_head.weight is not None:  # the head's plain weight is the embedding, not a copy
        assert model.lm_head.weight.data_ptr() == embedding.data_ptr()


def test_runner_packs_the_linears_for_cpu_fp32_only(tiny_loaded):
    from miniyaie import EngineConfig
    from miniyaie.model_runner import ModelRunner

    loaded = tiny_loaded("qwen2")  # tied head, qkv bias
    config = EngineConfig(model=loaded.source_dir, device="cpu", dtype="float32", num_blocks=8)
    model = ModelRunner(config, loaded.hf_config, loaded.weights).model
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.layers[0].self_attn.qkv_proj, PackedLinear)
    x = torch.randn(3, model.args.hidden_size)
    torch.testing.assert_close(model.lm_head(x), F.linear(x, model.embed_tokens.weight), rtol=1e-5, atol=1e-5)
    for other in (dict(dtype="bfloat16"), dict(quantization="int8")):  # int8: quantize_dynamic's Linears
        config = EngineConfig(model=loaded.source_dir, device="cpu", num_blocks=8, **{"dtype": "float32", **other})
        assert not isinstance(ModelRunner(config, loaded.hf_config, loaded.weights).model.lm_head, PackedLinear)

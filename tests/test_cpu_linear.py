"""CpuLinear (the C kernel at every batch size, on block codes or fp32) against torch's F.linear;
block codes against weights built from them; the swap of a model's Linears."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniyaie.cpu_kernels import BlockCodes, Q4Panels, find_block_codes, linear, multiplies_q4_codes_fast, q4_panels
from miniyaie.cpu_linear import CpuLinear, use_cpu_linears
from miniyaie.model import LlamaFamilyModel, ModelArgs

from conftest import needs_cpu_kernel as needs_cpu_kernels

pytestmark = needs_cpu_kernels

ROWS = (1, 2, 3, 5, 8, 16, 17, 31, 32, 33, 40, 65, 150, 300)  # decode batches and prefill chunks


def gguf_weight(n: int, k: int, gen: torch.Generator, q4_1_blocks: float = 0.5) -> torch.Tensor:
    """A weight as the GGUF conversion makes it: per block of 32, a float16 scale times a Q4_1 code
    in [0, 15] plus the block's minimum (float16), or times a Q8_0 code in [-127, 127]."""
    blocks = n * k // 32
    scale = (torch.rand(blocks, 1, generator=gen) * 0.01 + 1e-4).half().float()
    q4_1 = torch.rand(blocks, 1, generator=gen) < q4_1_blocks
    minimum = (-torch.rand(blocks, 1, generator=gen) * 0.1).half().float()
    codes = torch.where(q4_1, torch.randint(0, 16, (blocks, 32), generator=gen),
                        torch.randint(-127, 128, (blocks, 32), generator=gen)).float()
    codes[:, 0] = torch.where(q4_1[:, 0], 0.0, 127.0)  # GGUF's quantizers give the extreme its end code
    codes[:, 1] = torch.where(q4_1[:, 0], 15.0, codes[:, 1])
    return torch.where(q4_1, scale * codes + minimum, scale * codes).reshape(n, k)


def expand(codes: BlockCodes) -> torch.Tensor:
    n, k = codes.codes.shape
    blocks = codes.codes.float().reshape(n, k // 32, 32)
    return (codes.scales[..., None] * blocks + codes.offsets[..., None]).reshape(n, k)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features,out_features", [(64, 128), (72, 7), (576, 960), (1000, 13), (1536, 577),
                                                     (576, 3072)])
def test_cpu_linear_matches_f_linear(in_features, out_features, bias):
    """fp32 weights without codes: the kernel on the weight as given (edge panels at 7, 13 and 577;
    1,000 and 1,536 taken along k in chunks, the last one short at 1,000)."""
    gen = torch.Generator().manual_seed(in_features * out_features + bias)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    b = torch.randn(out_features, generator=gen) if bias else None
    layer = CpuLinear(weight, b)
    assert layer.kernel_weight.data_ptr() == weight.data_ptr()  # no codes: read in place, not copied
    with torch.inference_mode():  # as the engine runs it
        for m in ROWS:
            x = torch.randn(m, in_features, generator=gen)
            got = layer(x)
            assert got.shape == (m, out_features) and got.dtype == torch.float32
            torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_block_codes_are_found_exactly_or_not_at_all():
    gen = torch.Generator().manual_seed(0)
    for q4_1_blocks in (0.0, 0.5, 1.0):
        weight = gguf_weight(40, 96, gen, q4_1_blocks)
        codes = find_block_codes(weight)
        assert codes is not None and codes.codes.dtype == torch.int8
        assert torch.equal(expand(codes), weight)  # every value, bit for bit
    almost = weight.clone()
    almost[7, 33] = torch.nextafter(almost[7, 33], torch.tensor(1.0))  # one value off by one ulp
    assert find_block_codes(almost) is None
    assert find_block_codes(torch.randn(8, 64, generator=gen)) is None  # an ordinary fp32 weight
    assert find_block_codes(torch.zeros(4, 48)) is None  # rows not made of whole blocks


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features,out_features", [(32, 1), (96, 5), (576, 960), (800, 7), (1536, 577),
                                                     (576, 49152)])
def test_kernel_on_block_codes_matches_f_linear(in_features, out_features, bias):
    """The C kernel on codes, against F.linear on the fp32 weight they encode (edge panels: 577, 7, 5,
    1; k in chunks at 800, the last one a single block, and at 1,536)."""
    gen = torch.Generator().manual_seed(in_features + out_features + bias)
    weight = gguf_weight(out_features, in_features, gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    codes = find_block_codes(weight)
    for m in (0, 1, 2, 3, 4, 7, 8, 9, 16, 33):  # few rows in registers up to 8 (AVX2), panels above; 0: no logits wanted
        x = torch.randn(m, in_features, generator=gen)
        # outputs are ~10 here: 1e-4 is fp32 summation in another order
        torch.testing.assert_close(linear(x, codes, b), F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


def test_every_batch_size_takes_the_kernel_on_codes():
    gen = torch.Generator().manual_seed(1)
    weight = gguf_weight(96, 64, gen)
    layer = CpuLinear(weight, None)
    assert isinstance(layer.kernel_weight, BlockCodes) and "block codes" in repr(layer)
    for m in (1, 16, 49, 300):  # decode batches and prefill chunks alike
        x = torch.randn(m, 64, generator=gen)
        torch.testing.assert_close(layer(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def rows_to_multiply(m: int, k: int, gen: torch.Generator, outliers: float) -> torch.Tensor:
    """x rows as a model makes them: a few channels larger than the rest by ``outliers`` (the residual
    stream's); from 4 rows on, a row of zeros, one of tiny values and one of huge ones."""
    x = torch.randn(m, k, generator=gen)
    x[:, 3::97] *= outliers
    if m >= 4:
        x[1] = 0.0
        x[2] *= 1e-20
        x[3] *= 1e15
    return x


@pytest.mark.parametrize("in_features,out_features", [(32, 1), (64, 31), (576, 960), (576, 33), (1536, 577),
                                                     (96, 64)])
def test_integer_products_on_q4_codes_keep_fp32s_precision(in_features, out_features):
    """linear_q4 against float64: within what rounding x to 23 bits per block of 32 allows (delta / 2
    per value, delta = the block's largest |x| / 2^22) plus fp32 roundings of the sums (2^-20 of
    the terms' size). Rows with channels 60x the rest, zeros, 1e-20 and 1e15; a dropped digit or a
    lost centring term is off by 2^-15 of a block's largest value or more. Row counts around its
    tiles of 6 rows and 32 weight rows; weight rows past the last whole tile at 1, 31, 33 and 577."""
    gen = torch.Generator().manual_seed(in_features * 7 + out_features)
    weight = gguf_weight(out_features, in_features, gen, q4_1_blocks=1.0)
    codes = find_block_codes(weight)
    panels = q4_panels(codes)
    assert isinstance(panels, Q4Panels)
    block_l1 = weight.abs().reshape(out_features, -1, 32).sum(-1).double()  # [n, blocks]
    for m in (1, 2, 5, 6, 7, 12, 13, 16, 33, 150):
        bias = torch.randn(out_features, generator=gen)
        x = rows_to_multiply(m, in_features, gen, outliers=60.0)
        exact = F.linear(x.double(), weight.double(), bias.double())
        got = linear(x, panels, bias)
        assert got.shape == (m, out_features) and got.dtype == torch.float32
        deltas = x.abs().reshape(m, -1, 32).amax(-1).double() / 2**22
        allowed = deltas / 2 @ block_l1.T + 2**-20 * (x.double().abs() @ weight.double().abs().T + bias.abs())
        assert ((got - exact).abs() <= allowed).all(), m


def test_integer_products_keep_infs_and_nans_in_their_rows():
    """A row with an inf or a NaN gives outputs that are not numbers, as fp32 products do (the greedy
    head's screen keeps every token for such a row); the other rows are unaffected."""
    gen = torch.Generator().manual_seed(5)
    weight = gguf_weight(40, 96, gen, q4_1_blocks=1.0)
    panels = q4_panels(find_block_codes(weight))
    x = torch.randn(4, 96, generator=gen)
    x[1, 40], x[2, 7] = float("inf"), float("nan")
    got = linear(x, panels, None)
    assert not got[1:3].isfinite().any()
    torch.testing.assert_close(got[[0, 3]], F.linear(x[[0, 3]], weight), rtol=1e-5, atol=1e-5)


def test_only_q4_codes_take_the_integer_products():
    """Q8_0's signed codes do not fit the layout (a weight with any such block keeps the fp32
    kernel), nor does a block whose centred offset (offset + 8 scale) fp32 cannot hold exactly; a
    Q4_1 weight takes the integer products where they are fast (AVX-512 VNNI)."""
    gen = torch.Generator().manual_seed(3)
    assert q4_panels(find_block_codes(gguf_weight(40, 64, gen, q4_1_blocks=0.5))) is None
    inexact = BlockCodes(torch.zeros(1, 32, dtype=torch.int8), torch.ones(1, 1), torch.full((1, 1), 2.0**-22))
    assert q4_panels(inexact) is None  # 8 + 2^-22 rounds in fp32
    assert q4_panels(BlockCodes(inexact.codes, inexact.scales, torch.full((1, 1), 2.0**-20))) is not None
    q4_weight = gguf_weight(40, 64, gen, q4_1_blocks=1.0)
    layer = CpuLinear(q4_weight, None)
    if multiplies_q4_codes_fast():
        assert isinstance(layer.kernel_weight, Q4Panels) and "Q4_1 codes" in repr(layer)
    else:
        assert isinstance(layer.kernel_weight, BlockCodes)
    x = torch.randn(9, 64, generator=gen)
    torch.testing.assert_close(layer(x), F.linear(x, q4_weight), rtol=1e-5, atol=1e-5)


def test_the_swap_leaves_what_the_kernel_cannot_take():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(60, 8), nn.Linear(64, 8).to(torch.bfloat16))
    use_cpu_linears(model)
    assert [type(m) for m in model] == [CpuLinear, nn.Linear, nn.Linear]  # in_features 60; bf16


def test_cpu_linear_takes_any_layout():
    """Leading dims, strided views, no rows, and (outside inference mode) an input needing grad."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    layer = CpuLinear(weight, bias)
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

    assert use_cpu_linears(model) is model
    modules = dict(model.named_modules())
    assert not any(isinstance(m, nn.Linear) for m in modules.values())
    assert model.embed_tokens.weight is embedding  # the embedding stays a torch parameter
    for name, (weight, bias) in before.items():
        assert isinstance(modules[name], CpuLinear)
        x = torch.randn(5, weight.shape[1])
        torch.testing.assert_close(modules[name](x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    if tied:  # random weights have no codes: the kernel reads the embedding itself, not a copy
        assert model.lm_head.kernel_weight.data_ptr() == embedding.data_ptr()


def test_runner_swaps_the_linears_for_cpu_fp32_only(tiny_loaded):
    from miniyaie import EngineConfig
    from miniyaie.model_runner import ModelRunner

    loaded = tiny_loaded("qwen2")  # tied head, qkv bias
    config = EngineConfig(model=loaded.source_dir, device="cpu", dtype="float32", num_blocks=8)
    model = ModelRunner(config, loaded.hf_config, loaded.weights).model
    assert isinstance(model.lm_head, CpuLinear) and isinstance(model.layers[0].self_attn.qkv_proj, CpuLinear)
    x = torch.randn(3, model.args.hidden_size)
    torch.testing.assert_close(model.lm_head(x), F.linear(x, model.embed_tokens.weight), rtol=1e-5, atol=1e-5)
    for other in (dict(dtype="bfloat16"), dict(quantization="int8")):  # int8: quantize_dynamic's Linears
        config = EngineConfig(model=loaded.source_dir, device="cpu", num_blocks=8, **{"dtype": "float32", **other})
        assert not isinstance(ModelRunner(config, loaded.hf_config, loaded.weights).model.lm_head, CpuLinear)

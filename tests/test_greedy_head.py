"""greedy_head — the head's argmax from an integer screen plus the fp32 logits of the tokens the
screen cannot rule out — against the sampler's argmax over the full head's logits, on fresh random
GGUF-style weights. (With AVX-512 VNNI the screen runs on it; elsewhere on plain C, same scores.)"""
from __future__ import annotations

import pytest
import torch

from miniyaie.cpu_kernels import HeadScreen, find_block_codes, greedy_head, linear, sample_rows

from conftest import needs_cpu_kernel
from test_cpu_linear import gguf_weight

pytestmark = needs_cpu_kernel


def full_head_argmax(x: torch.Tensor, codes) -> torch.Tensor:
    """What a greedy step chose before: the sampler's argmax over every logit of the fp32 head."""
    logits = linear(x, codes, None)
    return sample_rows(logits, None, None, None, None, [True] * x.shape[0], None, 0, want_logprob=False)[0]


@pytest.mark.parametrize("q4_1_blocks", [0.0, 0.5, 1.0])  # Q8_0 (no offsets, SmolLM2's head), mixed, Q4_1
@pytest.mark.parametrize("n,k", [(3000, 576), (37, 64)])  # whole panels of 16 and a cut one
def test_greedy_head_is_the_full_heads_argmax(q4_1_blocks, n, k):
    gen = torch.Generator().manual_seed(n + k + int(10 * q4_1_blocks))
    codes = find_block_codes(gguf_weight(n, k, gen, q4_1_blocks))
    screen = HeadScreen(codes)
    for m in (1, 2, 7, 8, 9, 16, 17):  # screened 8 rows at a time, and the rest
        x = torch.randn(m, k, generator=gen)
        x[:, 3] *= 40  # a residual stream's huge channel, as SmolLM2's final rows have a few
        assert torch.equal(greedy_head(x, codes, screen), full_head_argmax(x, codes))
    assert greedy_head(torch.empty(0, k), codes, screen).shape == (0,)


def test_a_peaked_row_and_a_tie():
    """Real rows are peaked: the screen then keeps a handful. Two equal maxima: the first wins,
    as in the sampler's argmax."""
    gen = torch.Generator().manual_seed(7)
    weight = gguf_weight(2000, 128, gen, 0.0)
    weight[1500] = weight[700]  # same codes, so the same logit, bit for bit
    codes = find_block_codes(weight)
    x = torch.stack([weight[700] * 3, weight[1234] * 3, torch.randn(128, generator=gen)])
    tokens = greedy_head(x, codes, HeadScreen(codes))
    assert tokens[0] == 700 and tokens[1] == 1234
    assert torch.equal(tokens, full_head_argmax(x, codes))


def test_rows_that_are_not_numbers_keep_every_token():
    gen = torch.Generator().manual_seed(3)
    codes = find_block_codes(gguf_weight(500, 64, gen))
    x = torch.randn(3, 64, generator=gen)
    x[0, 5], x[2, 9] = float("nan"), float("inf")
    tokens = greedy_head(x, codes, HeadScreen(codes))
    assert ((tokens >= 0) & (tokens < 500)).all()
    assert tokens[1] == full_head_argmax(x[1:2], codes)[0]  # its neighbours change nothing


def test_near_ties_beyond_the_screens_resolution():
    """Vocabulary rows one code apart: their logits differ by far less than the integer scores'
    error, so the screen must keep them all (a margin short of its bound drops the maximum)."""
    gen = torch.Generator().manual_seed(11)
    n, k = 3000, 64
    base = torch.randint(-120, 121, (k,), generator=gen)
    base[0] = base[32] = 127  # each block's extreme code, as GGUF's Q8_0 quantizer gives it
    codes = base.repeat(n, 1)
    nudge = torch.randint(1, 32, (n,), generator=gen) + 32 * torch.randint(0, 2, (n,), generator=gen)
    codes[torch.arange(n), nudge] += torch.randint(-3, 4, (n,), generator=gen)
    scale = torch.tensor([2.0 ** -6, 2.0 ** -7]).repeat_interleave(32)  # Q8_0 scales: absmax / 127, float16
    weight = codes.float() * scale
    block_codes = find_block_codes(weight)
    x = torch.randn(16, k, generator=gen)
    x[:, 5] *= 30
    assert torch.equal(greedy_head(x, block_codes, HeadScreen(block_codes)), full_head_argmax(x, block_codes))


def test_the_margin_covers_the_worst_rounding():
    """Rows A and B = -A, and a row x whose every value sits just short of half a step of the
    screen's rounding, on the side that understates A: the integer scores put B far ahead while A's
    fp32 logit is the largest (B's is its negative, the other rows' 0). Only a margin that covers
    the rounding's worst case keeps A; one a few times short of it loses the token."""
    gen = torch.Generator().manual_seed(5)
    k, scale = 32, 2.0 ** -6
    a = torch.randint(20, 101, (k,), generator=gen) * (torch.randint(0, 2, (k,), generator=gen) * 2 - 1)
    a[0], a[1] = 0, 127  # x[0] sets the rounding step (127 steps, exact); x[1] = 0 meets A's extreme code
    half = 0.5 * (1 - 1e-3) * torch.sign(a).double()  # just short of half a step, A's sign: understates A
    half[:2] = 0
    q = torch.zeros(k, dtype=torch.int64)
    q[0] = 127
    lead = float((a * half).sum())  # sum_i a_i (q_i + half_i): A's logit / (scale * step)
    while lead > 100:  # steer A's logit down to just above 0, a step of some q_i at a time
        i = max((j for j in range(2, k) if abs(a[j]) < lead), key=lambda j: abs(a[j]))
        q[i] -= int(torch.sign(a[i]))
        lead -= abs(int(a[i]))
    assert 0 < lead <= 100 and q[2:].abs().max() < 100
    step = 1.0 / 127
    x = ((q + half) * step).float()[None]
    rows = torch.zeros(16, k, dtype=torch.int64)
    rows[3], rows[9] = a, -a
    rows[9, 1] = 127  # B keeps the extreme code too (it multiplies x[1] = 0)
    weight = rows.float() * scale
    codes = find_block_codes(weight)
    assert codes is not None
    assert full_head_argmax(x, codes)[0] == 3  # A's logit: just above the zeros; B's: below
    assert greedy_head(x, codes, HeadScreen(codes))[0] == 3

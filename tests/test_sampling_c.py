"""The CPU's sampling pipeline in C (``miniyaie/csrc/sampling.c``) against the torch stages it
replaces there, and its answers on rows no distribution can be made of."""
from __future__ import annotations

import pytest
import torch

from miniyaie import cpu_kernels
from miniyaie.request import SamplingParams
from miniyaie.sampling import SamplingKernel

from conftest import needs_cpu_kernel
from test_sampling import make_batch

pytestmark = needs_cpu_kernel

C_PIPELINE = cpu_kernels.handles  # csrc/sampling.c takes fp32 logits on the CPU where it compiled


KERNEL_MIX = [  # one of each stage, alone and together, greedy and sampled
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=40, top_p=0.95, seed=1),  # the demo's
    SamplingParams(temperature=0.7, top_p=0.9),  # its cut often lies past the 64 best: sort_to_cut
    SamplingParams(temperature=1.3, top_p=0.05),
    SamplingParams(temperature=0.5, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=200, min_p=0.02),
    SamplingParams(temperature=0.0, top_k=3, top_p=0.5, logprobs=3),
    SamplingParams(temperature=1.0, top_k=1),
]


@pytest.mark.parametrize("vocab", [49152, 300])
def test_the_c_pipeline_matches_the_torch_stages(vocab):
    """csrc/sampling.c against the torch stages it replaces on the CPU, on fresh random logits with the
    same uniforms: the same tokens, log-probabilities and alternatives."""
    gen = torch.Generator().manual_seed(vocab)
    params = KERNEL_MIX * 2
    for trial in range(3):
        logits = torch.randn(len(params), vocab, generator=gen) * 3
        logits[0, vocab // 3] = logits[0, vocab - 2] = logits[0].max() + 1  # a tie for the maximum (greedy)
        outs = []
        for handles in (C_PIPELINE, lambda logits: False):
            batch = make_batch(params, seeds=[trial * 100 + i for i in range(len(params))], vocab=vocab)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(cpu_kernels, "handles", handles)
                outs.append(SamplingKernel(seed=trial)(logits, batch))
        fast, reference = outs
        assert torch.equal(fast.token_ids, reference.token_ids) and fast.token_ids[0] == vocab // 3
        # a normaliser over tens of thousands of kept tokens, summed in another order
        torch.testing.assert_close(fast.logprobs, reference.logprobs, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(fast.top_probs, reference.top_probs, rtol=1e-5, atol=1e-6)
        listed = reference.top_probs[1:] > 0  # ids of probability 0 are arbitrary; row 0's tie comes
        assert torch.equal(fast.top_ids[1:][listed], reference.top_ids[1:][listed])  # in either order from topk
        assert fast.top_ids[0, :2].sort().values.tolist() == [vocab // 3, vocab - 2]


def test_a_greedy_row_nobody_asked_about_skips_the_normaliser():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    token, logprob, top_ids, _ = cpu_kernels.sample_rows(logits, None, None, None, None, [True] * 4, None, 0,
                                                         want_logprob=False)
    assert torch.equal(token, logits.argmax(dim=-1)) and logprob.isnan().all() and top_ids.shape == (4, 0)


@pytest.mark.parametrize("vocab", [5, 1000, 1003])
def test_a_row_of_nans_still_gets_a_token_in_range(vocab):
    """A broken model's NaN logits make no distribution, but the C pipeline still answers with ids
    the detokenizer can read (fast-math's comparisons find no maximum in them)."""
    logits = torch.full((4, vocab), float("nan"))
    logits[2:, :vocab // 2] = torch.randn(2, vocab // 2)  # half NaN
    token, _, top_ids, _ = cpu_kernels.sample_rows(
        logits, None, torch.tensor([vocab, 3, 4, vocab]), torch.tensor([1.0, 1.0, 1.0, 0.9]), None,
        [True, False, False, False], torch.tensor([0.0, 0.5, 0.5, 0.5], dtype=torch.float64), 3)
    assert ((0 <= token) & (token < vocab)).all() and ((0 <= top_ids) & (top_ids < vocab)).all()

"""SamplingKernel: greedy, filters, penalties, reproducibility and the sampled distribution."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from miniyaie import cpu_kernels
from miniyaie.request import SamplingParams
from miniyaie.sampling import SamplingBatch, SamplingKernel

V = 50


@pytest.fixture(autouse=True, params=["c", "torch"])
def pipeline(request, monkeypatch):
    """Every test on both paths: the C pipeline (the CPU's) and the torch stages (other devices',
    and the CPU's without a C compiler); tests/test_sampling_c.py compares the two directly."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "handles", lambda logits: False)
    elif cpu_kernels.load_cpu_kernels() is None:
        pytest.skip("no C compiler here: the torch stages serve the CPU")


def make_batch(params: list[SamplingParams], prompts: Optional[list[list[int]]] = None,
               outputs: Optional[list[list[int]]] = None,
               seeds: Optional[list[Optional[int]]] = None, vocab: int = V,
               num_top: int = 5) -> SamplingBatch:
    n = len(params)
    prompts = prompts if prompts is not None else [[] for _ in range(n)]
    outputs = outputs if outputs is not None else [[] for _ in range(n)]
    seeds = seeds if seeds is not None else [p.seed for p in params]
    gens = [None if s is None else SamplingKernel.make_generator(s) for s in seeds]
    return SamplingBatch.build(params, prompts, outputs, gens, vocab, "cpu", num_top=num_top)


def processed_probs(kernel: SamplingKernel, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The full processed distribution, read back through num_top = V."""
    batch.num_top = logits.shape[1]
    out = kernel(logits, batch)
    probs = torch.zeros_like(logits)
    probs.scatter_(1, out.top_ids, out.top_probs)
    return probs


# -- greedy -------------------------------------------------------------------------------------

def test_greedy_is_argmax_fast_path():
    torch.manual_seed(0)
    logits = torch.randn(8, V)
    batch = make_batch([SamplingParams(temperature=0.0)] * 8)
    assert batch.all_greedy and not (batch.any_top_k or batch.any_top_p or batch.any_min_p)
    out = SamplingKernel()(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, -1).max(-1).values)


def test_greedy_with_penalties_matches_hand_computation():
    logits = torch.tensor([[1.9, 2.0, -1.0, 0.5, 1.0, 0.0]])
    # Prompt tokens 0 and 2: 1.9 / 2 = 0.95 and -1.0 * 2 = -2.0. Token 1, generated twice:
    # 2.0 / 2 - 0.1 - 2 * 0.3 = 0.3. Token 4, generated once: 1.0 / 2 - 0.1 - 0.3 = 0.1.
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=0.1,
                            frequency_penalty=0.3)
    batch = make_batch([params], prompts=[[0, 2]], outputs=[[1, 4, 1]], vocab=6)
    out = SamplingKernel()(logits, batch)
    expected = torch.tensor([[0.95, 0.3, -2.0, 0.5, 0.1, 0.0]])
    assert logits.argmax().item() == 1 and out.token_ids.item() == 0
    assert math.isclose(out.logprobs.item(), torch.log_softmax(expected, -1)[0, 0].item(),
                        rel_tol=1e-5)


STAGE_TENSORS = ("temperatures", "top_ks", "top_ps", "min_ps", "repetition_penalties", "presence_penalties",
                 "frequency_penalties")


@pytest.mark.parametrize("params, built", [
    (SamplingParams(temperature=0), ()),
    (SamplingParams(temperature=1.0), ()),
    (SamplingParams(temperature=0.7), ("temperatures",)),
    (SamplingParams(temperature=0.7, top_p=0.9), ("temperatures", "top_ks", "top_ps")),
    (SamplingParams(temperature=0, top_k=5), ("top_ks", "top_ps")),
    (SamplingParams(temperature=0, min_p=0.1), ("min_ps",)),
    (SamplingParams(temperature=0, presence_penalty=0.5),
     ("repetition_penalties", "presence_penalties", "frequency_penalties")),
])
def test_a_batch_builds_tensors_only_for_the_stages_it_runs(params: SamplingParams, built: tuple[str, ...]):
    batch = make_batch([SamplingParams(temperature=0), params])  # a greedy neighbour needs no stage
    assert {name for name in STAGE_TENSORS if getattr(batch, name) is not None} == set(built)
    out = SamplingKernel()(torch.randn(2, V), batch)  # and the kernel runs on what there is
    assert out.token_ids.shape == (2,)


# -- penalties ----------------------------------------------------------------------------------

def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(3, V) * 3
    prompts = [[1, 2, 3, 3], [10, 40], [0]]
    outputs = [[5, 2], [], [7, 7, 49]]
    kernel = SamplingKernel()
    for penalty in (1.3, 0.7):
        params = [SamplingParams(temperature=0.0, repetition_penalty=penalty)] * 3
        probs = processed_probs(kernel, logits, make_batch(params, prompts, outputs))
        for row in range(3):
            ids = torch.tensor([prompts[row] + outputs[row]])
            ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[row:row + 1].clone())
            assert torch.allclose(probs[row], torch.softmax(ref[0], -1), atol=1e-6)


def test_presence_and_frequency_only_count_output_tokens():
    torch.manual_seed(2)
    logits = torch.randn(2, V)
    prompts = [[3, 4, 4], [9]]
    outputs = [[4, 8, 8, 8], [9, 9, 1]]
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(temperature=0.0, presence_penalty=-1.0, frequency_penalty=1.5)]
    probs = processed_probs(SamplingKernel(), logits, make_batch(params, prompts, outputs))
    for row, p in enumerate(params):
        ref = logits[row].clone()
        for tok in set(outputs[row]):
            count = outputs[row].count(tok)
            ref[tok] -= p.presence_penalty + p.frequency_penalty * count
        assert torch.allclose(probs[row], torch.softmax(ref, -1), atol=1e-6)


def test_rows_without_penalties_are_untouched_in_a_penalised_batch():
    torch.manual_seed(3)
    logits = torch.randn(2, V)
    params = [SamplingParams(temperature=0.0, frequency_penalty=2.0), SamplingParams(temperature=0.0)]
    probs = processed_probs(SamplingKernel(), logits, make_batch(params, [[1], [1]], [[2], [2]]))
    assert torch.allclose(probs[1], torch.softmax(logits[1], -1), atol=1e-6)


# -- filters ------------------------------------------------------------------------------------

def reference_support(row: list[float], p: SamplingParams) -> set[int]:
    """Plain-python top-k -> top-p -> min-p on the temperature-scaled distribution."""
    t = p.temperature if p.temperature > 0 else 1.0
    scaled = [x / t for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    if p.top_k > 0:
        order = order[:p.top_k]  # slicing past the end keeps everything, like the kernel
    peak = max(scaled[i] for i in order)
    weights = {i: math.exp(scaled[i] - peak) for i in order}
    total = sum(weights.values())
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += weights[i] / total
        if mass >= p.top_p:
            break
    best = max(weights[i] for i in kept)
    return {i for i in kept if weights[i] >= p.min_p * best}


FULL_SORT_MIX = [  # one row has top-p without top-k: its rows need a full sort
    SamplingParams(temperature=1.0, top_k=5),
    SamplingParams(temperature=0.5, top_p=0.8),
    SamplingParams(temperature=2.0, min_p=0.2),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=0.0, top_k=3),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=1.3, top_p=0.3),
    SamplingParams(temperature=1.0, top_k=1),
]
PARTIAL_MIX = [  # every filtered row has a top-k: a topk(max k) replaces the sort
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.9, top_k=10, top_p=0.5),
    SamplingParams(temperature=0.0, min_p=0.3),
    SamplingParams(temperature=1.5, top_k=30, top_p=0.95),
    SamplingParams(temperature=0.6, top_k=2),
    SamplingParams(temperature=1.0, top_k=V + 7, top_p=0.7),  # k above vocab = disabled
]


@pytest.mark.parametrize("params", [FULL_SORT_MIX, PARTIAL_MIX], ids=["full-sort", "partial"])
def test_filters_keep_exactly_the_reference_sets(params: list[SamplingParams]):
    torch.manual_seed(4)
    kernel = SamplingKernel()
    for trial in range(20):
        logits = torch.randn(len(params), V) * 2
        probs = processed_probs(kernel, logits, make_batch(params, seeds=[trial] * len(params)))
        for row, p in enumerate(params):
            got = set(torch.nonzero(probs[row]).flatten().tolist())
            assert got == reference_support(logits[row].tolist(), p), (trial, row, p)
            assert math.isclose(probs[row].sum().item(), 1.0, rel_tol=1e-5)


def test_sampled_tokens_stay_inside_the_filtered_set():
    torch.manual_seed(5)
    logits = torch.randn(1, V).repeat(500, 1)
    params = [SamplingParams(temperature=1.5, top_k=4)] * 500
    out = SamplingKernel(seed=1)(logits, make_batch(params))
    allowed = set(logits[0].topk(4).indices.tolist())
    assert set(out.token_ids.tolist()) <= allowed
    assert len(set(out.token_ids.tolist())) == 4


# -- outputs --------------------------------------------------------------------------------------

def test_outputs_are_consistent():
    torch.manual_seed(6)
    logits = torch.randn(4, V)
    params = [SamplingParams(temperature=0.8, top_p=0.9, logprobs=7), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(temperature=1.2, top_k=3)]
    batch = make_batch(params, seeds=[1, 2, 3, 4])
    assert batch.num_top == 7  # the largest logprobs request wins over the default 5
    out = SamplingKernel()(logits, batch)
    assert out.top_ids.shape == out.top_probs.shape == (4, 7)
    assert torch.all(out.top_probs[:, :-1] >= out.top_probs[:, 1:])
    probs = processed_probs(SamplingKernel(), logits, make_batch(params, seeds=[1, 2, 3, 4]))
    assert torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-5)
    chosen = probs.gather(1, out.token_ids.unsqueeze(1)).squeeze(1)
    assert torch.all(chosen > 0)
    assert torch.allclose(out.logprobs, chosen.log(), atol=1e-5)
    assert out.token_ids.dtype == out.top_ids.dtype == torch.int64
    assert out.logprobs.dtype == out.top_probs.dtype == torch.float32


def test_half_precision_logits_are_accepted():
    logits = torch.randn(3, V).to(torch.bfloat16)
    out = SamplingKernel()(logits, make_batch([SamplingParams(temperature=0.9, top_p=0.5)] * 3))
    assert out.logprobs.dtype == torch.float32


# -- reproducibility ------------------------------------------------------------------------------

def run_steps(kernel: SamplingKernel, rows: list[tuple[SamplingParams, torch.Tensor]],
              gens: list[Optional[torch.Generator]], steps: int) -> list[list[int]]:
    params = [p for p, _ in rows]
    logits = torch.stack([l for _, l in rows])
    tokens: list[list[int]] = [[] for _ in rows]
    for _ in range(steps):
        batch = SamplingBatch.build(params, [[]] * len(rows), [list(t) for t in tokens], gens, V, "cpu")
        for row, tok in enumerate(kernel(logits, batch).token_ids.tolist()):
            tokens[row].append(tok)
    return tokens


def test_same_seed_same_tokens_alone_or_in_a_batch():
    torch.manual_seed(7)
    target = (SamplingParams(temperature=1.0, top_p=0.95, seed=42), torch.randn(V))
    alone = run_steps(SamplingKernel(seed=0), [target], [SamplingKernel.make_generator(42)], 30)[0]

    others = [(SamplingParams(temperature=t, top_k=k, min_p=m, frequency_penalty=f), torch.randn(V))
              for t, k, m, f in [(0.0, -1, 0.0, 0.0), (2.0, 5, 0.0, 0.5), (0.5, -1, 0.3, 0.0)] * 5]
    rows = others[:7] + [target] + others[7:]
    gens = [None if i != 7 else SamplingKernel.make_generator(42) for i in range(len(rows))]
    gens[3] = SamplingKernel.make_generator(99)  # another seeded neighbour
    batched = run_steps(SamplingKernel(seed=123), rows, gens, 30)[7]
    assert alone == batched

    different = run_steps(SamplingKernel(seed=0), [target], [SamplingKernel.make_generator(43)], 30)[0]
    assert different != alone


def test_shared_generator_is_seeded_by_the_kernel():
    logits = torch.randn(10, V)
    params = [SamplingParams(temperature=1.0)] * 10
    a = SamplingKernel(seed=5)(logits, make_batch(params)).token_ids
    b = SamplingKernel(seed=5)(logits, make_batch(params)).token_ids
    c = SamplingKernel(seed=6)(logits, make_batch(params)).token_ids
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- distribution -------------------------------------------------------------------------------

def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0  # never a token outside the support
    return (((counts[support] - expected[support]) ** 2) / expected[support]).sum().item()


@pytest.mark.parametrize("seeded", [True, False])
def test_empirical_frequencies_match_the_processed_distribution(seeded: bool):
    n = 20_000
    base = torch.tensor([1.0, 0.6, 0.2, -0.3, -1.0, -2.5])
    params = SamplingParams(temperature=0.6, top_k=5)
    seeds = list(range(n)) if seeded else [None] * n
    batch = make_batch([params] * n, seeds=seeds, vocab=6)
    out = SamplingKernel(seed=11)(base.repeat(n, 1), batch)
    counts = torch.bincount(out.token_ids, minlength=6).double()

    kept = torch.tensor([0.0, 0, 0, 0, 0, float("-inf")])
    right = torch.softmax(base / 0.6 + kept, -1).double()
    ignoring_temperature = torch.softmax(base + kept, -1).double()
    # df = 4: chi2 > 30 has probability ~5e-6, and the seed is fixed, so this cannot flake.
    assert chi_square(counts, right) < 30
    assert chi_square(counts, ignoring_temperature) > 300  # the test would catch a lost temperature


# -- validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, kwargs", [
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": float("nan")}),
    ("top_p", {"top_p": 0.0}),
    ("top_k", {"top_k": -5}),
    ("min_p", {"min_p": 2.0}),
    ("max_tokens", {"max_tokens": 0}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("presence_penalty", {"presence_penalty": 3.0}),
])
def test_invalid_params_name_the_field(field: str, kwargs: dict):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)

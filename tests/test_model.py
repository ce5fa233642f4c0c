"""Our network vs transformers' for the same weights, and chunked prefill vs one-piece prefill.

Our side runs exactly as the engine does: ModelRunner over the paged pool, one ForwardBatch per
step (see ``Engine._launch``); we only widen ``logits_indices`` to every row so all positions are
compared, not just the last.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import transformers

from miniyaie import EngineConfig
from miniyaie.attention import ForwardBatch
from miniyaie.loader import load_model
from miniyaie.model_runner import ModelRunner

from conftest import TINY_MODELS

ATOL = 1e-3


def make_runner(loaded, block_size: int = 4, num_blocks: int = 128) -> ModelRunner:
    config = EngineConfig(model=loaded.source_dir, device="cpu", dtype="float32", block_size=block_size,
                          num_blocks=num_blocks, attention_backend="torch")
    return ModelRunner(config, loaded.hf_config, loaded.weights)


def shuffled_table(runner: ModelRunner, num_tokens: int, rng: random.Random) -> list[int]:
    """Blocks for ``num_tokens``, deliberately non-contiguous."""
    bs = runner.kv.block_size
    free = runner.kv.allocate(runner.kv.num_free_blocks)
    rng.shuffle(free)
    need = -(-num_tokens // bs)
    table, rest = free[:need], free[need:]
    runner.kv.release(rest)
    return table


def forward_all(runner: ModelRunner, seqs: list[tuple[list[int], int, list[int]]]) -> list[torch.Tensor]:
    """One step over ``(new token ids, prefix length, block table)`` per sequence (extends first);
    returns each sequence's logits at every new position."""
    batch = ForwardBatch.build([t for t, _, _ in seqs], [p for _, p, _ in seqs], [b for _, _, b in seqs],
                               [True] * len(seqs), runner.kv.block_size, runner.device)
    batch = dataclasses.replace(batch, logits_indices=torch.arange(batch.num_tokens))
    logits = runner.forward(batch)
    return list(logits.split([len(t) for t, _, _ in seqs]))


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = transformers.AutoModelForCausalLM.from_pretrained(
                tiny_model_dir(name), dtype=torch.float32).eval()
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_logits_match_transformers(name, tiny_loaded, hf_model):
    """Two prompts prefilled together, then three decode steps for both, each compared with
    transformers run on the whole sequence so far."""
    loaded, ref = tiny_loaded(name), hf_model(name)
    runner = make_runner(loaded)
    rng = random.Random(0)
    prompts = [[rng.randrange(loaded.hf_config.vocab_size) for _ in range(n)] for n in (37, 150)]
    tables = [shuffled_table(runner, 200, rng) for _ in prompts]
    ours = forward_all(runner, [(p, 0, t) for p, t in zip(prompts, tables)])
    for p, got in zip(prompts, ours):
        want = hf_logits(ref, p)
        assert (got - want).abs().max().item() < ATOL
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    seqs = [list(p) for p in prompts]
    for _ in range(3):  # decode: feed each sequence's greedy token, compare the new last row
        nxt = [int(hf_logits(ref, s)[-1].argmax()) for s in seqs]
        ours = forward_all(runner, [([t], len(s), table) for t, s, table in zip(nxt, seqs, tables)])
        for s, t, got in zip(seqs, nxt, ours):
            s.append(t)
            want = hf_logits(ref, s)[-1:]
            assert (got - want).abs().max().item() < ATOL


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_chunked_prefill_matches_one_piece(name, tiny_loaded):
    """The same prompt prefilled in one step, and in chunks whose prefixes end mid-block (some
    chunks one token long, so they go down the decode path), gives the same logits — also when
    the chunks share steps with other sequences."""
    loaded = tiny_loaded(name)
    runner = make_runner(loaded)
    rng = random.Random(1)
    prompt = [rng.randrange(loaded.hf_config.vocab_size) for _ in range(61)]
    whole = forward_all(runner, [(prompt, 0, shuffled_table(runner, 61, rng))])[0]

    chunks = [5, 7, 1, 10, 3, 1, 1, 16, 17]  # prefixes 5, 12, 13, 23, ... mostly mid-block
    assert sum(chunks) == len(prompt)
    table = shuffled_table(runner, 61, rng)
    other = [rng.randrange(loaded.hf_config.vocab_size) for _ in range(40)]
    other_table = shuffled_table(runner, 61, rng)
    pieces, start, other_start = [], 0, 0
    for n in chunks:
        step = [(prompt[start:start + n], start, table)]
        if other_start < len(other):  # a neighbour prefilling 6 tokens a step alongside
            step.append((other[other_start:other_start + 6], other_start, other_table))
            other_start += 6
        step.sort(key=lambda s: len(s[0]) == 1)  # extends before decodes
        results = forward_all(runner, step)
        pieces.append(next(r for s, r in zip(step, results) if s[2] is table))
        start += n
    chunked = torch.cat(pieces)
    assert (chunked - whole).abs().max().item() < 1e-4
    assert torch.equal(chunked.argmax(-1), whole.argmax(-1))


@pytest.mark.slow
def test_embedded_smollm2_matches_transformers(all_threads):
    loaded = load_model("embedded")
    ref = transformers.LlamaForCausalLM.from_pretrained(loaded.source_dir, dtype=torch.float32).eval()
    runner = make_runner(loaded, block_size=16, num_blocks=64)
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
    prompt = loaded.tokenizer.encode(text)
    rng = random.Random(2)
    table = shuffled_table(runner, 200, rng)
    got = forward_all(runner, [(prompt, 0, table)])[0]
    want = hf_logits(ref, prompt)
    assert (got - want).abs().max().item() < ATOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # greedy continuation: our decode steps pick the same tokens as transformers
    seq = list(prompt)
    for _ in range(8):
        nxt = int(hf_logits(ref, seq)[-1].argmax())
        ours = forward_all(runner, [([nxt], len(seq), table)])[0]
        seq.append(nxt)
        want = hf_logits(ref, seq)[-1:]
        assert (ours - want).abs().max().item() < ATOL
        assert int(ours.argmax()) == int(want.argmax())


def test_int8_quantization_stays_close_to_fp32(tiny_loaded):
    """The opt-in int8 path quantizes every Linear (not the embedding) and stays near fp32."""
    loaded = tiny_loaded("llama")
    fp32 = make_runner(loaded)
    config = dataclasses.replace(fp32.config, quantization="int8")
    int8 = ModelRunner(config, loaded.hf_config, loaded.weights)
    assert isinstance(int8.model.layers[0].mlp.down_proj, torch.ao.nn.quantized.dynamic.Linear)
    assert isinstance(int8.model.lm_head, torch.ao.nn.quantized.dynamic.Linear)
    rng = random.Random(2)
    prompt = [rng.randrange(loaded.hf_config.vocab_size) for _ in range(20)]
    ref = forward_all(fp32, [(prompt, 0, shuffled_table(fp32, 20, rng))])[0]
    got = forward_all(int8, [(prompt, 0, shuffled_table(int8, 20, rng))])[0]
    # dynamic int8 is visibly lossy on small models (see benchmarks/RESULTS.md): near, not equal
    assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    assert (got - ref).abs().mean().item() < 0.01 * ref.abs().max().item()
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="int4")

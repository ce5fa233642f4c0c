"""Forward steps as one call into the C kernels (``miniyaie/cpu_forward.py``) against the model's
forward on the same kernels: the same logits, bit for bit, step after step of a real engine run —
prefill chunks, decodes and steps mixing both."""
from __future__ import annotations

import random

import pytest
import torch

from miniyaie import Engine, EngineConfig, SamplingParams
from miniyaie.attention.layer import AttentionContext

from conftest import needs_cpu_kernel

pytestmark = needs_cpu_kernel


def cpu_engine(loaded, **overrides) -> Engine:
    return Engine(EngineConfig(**{**dict(model=loaded.source_dir, device="cpu", dtype="float32", block_size=4,
                                         num_blocks=256, attention_backend="cpu"), **overrides}), loaded=loaded)


@pytest.mark.parametrize("name,sequences,budget", [("llama", 6, 24), ("qwen2", 6, 24), ("llama", 52, 2048)])
def test_forward_steps_equal_the_models_forward(tiny_loaded, name, sequences, budget):
    """qwen2: qkv bias, tied head. 6 sequences: the Linear's few-rows path at decode, and a budget of
    24 tokens a step, which cuts prompts into chunks, some beside decodes; 52: its panel path, at
    any batch size."""
    engine = cpu_engine(tiny_loaded(name), num_blocks=1024, max_num_batched_tokens=budget)
    runner, fast = engine.runner, engine.runner.cpu_forward
    assert fast is not None
    compared: list[tuple[int, int]] = []
    run = fast.run

    def run_both(batch):
        logits = run(batch)
        runner.backend.plan(batch)  # then the model's forward (it writes the same K/V again)
        reference = runner.model(AttentionContext(batch, runner.backend, runner.kv.k_pool, runner.kv.v_pool))
        assert torch.equal(logits, reference)
        compared.append((batch.num_extends, batch.num_seqs))
        return logits

    fast.run = run_both
    rng = random.Random(0)
    system = [rng.randrange(100, 1000) for _ in range(9)]  # a shared prefix, then prompts of mixed lengths
    prompts = [system + [rng.randrange(100, 1000) for _ in range(rng.randrange(1, 12))] for _ in range(sequences)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.8, seed=1, ignore_eos=True))
    assert all(len(o.token_ids) == 10 for o in outs)
    decodes = [seqs for extends, seqs in compared if extends == 0]
    assert len(decodes) >= 9 and max(decodes) == sequences  # every decode step of the run, batched
    assert budget > 24 or any(0 < extends < seqs for extends, seqs in compared)  # prefill chunks beside decodes
    engine.check_integrity()


def test_what_the_forward_steps_do_not_cover_takes_the_models_forward(tiny_loaded):
    assert cpu_engine(tiny_loaded("qwen3")).runner.cpu_forward is None  # per-head q/k norms
    assert cpu_engine(tiny_loaded("llama"), attention_backend="torch").runner.cpu_forward is None  # the reference
    assert cpu_engine(tiny_loaded("llama"), dtype="bfloat16").runner.cpu_forward is None

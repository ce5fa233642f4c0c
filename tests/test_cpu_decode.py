"""Decode steps as straight kernel calls (``miniyaie/cpu_decode.py``) against the model's forward
on the same kernels: the same logits, bit for bit, step after step of a real engine run."""
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


@pytest.mark.parametrize("name,sequences", [("llama", 6), ("qwen2", 6), ("llama", 52)])  # qwen2: qkv bias, tied head
def test_decode_steps_equal_the_models_forward(tiny_loaded, name, sequences):
    """6 sequences: the Linear's few-rows path; 52: its panel path, at any batch size."""
    engine = cpu_engine(tiny_loaded(name), num_blocks=1024)
    runner, fast = engine.runner, engine.runner.cpu_decode
    assert fast is not None
    compared: list[int] = []
    run = fast.run

    def run_both(batch):
        logits = run(batch)
        runner.backend.plan(batch)  # then the model's forward (it writes the same K/V again)
        reference = runner.model(AttentionContext(batch, runner.backend, runner.kv.k_pool, runner.kv.v_pool))
        assert torch.equal(logits, reference)
        compared.append(batch.num_seqs)
        return logits

    fast.run = run_both
    rng = random.Random(0)
    system = [rng.randrange(100, 1000) for _ in range(9)]  # a shared prefix, then prompts of mixed lengths
    prompts = [system + [rng.randrange(100, 1000) for _ in range(rng.randrange(1, 12))] for _ in range(sequences)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.8, seed=1, ignore_eos=True))
    assert all(len(o.token_ids) == 10 for o in outs)
    assert len(compared) >= 9 and max(compared) == sequences  # every decode step of the run, batched
    engine.check_integrity()


def test_what_the_decode_steps_do_not_cover_takes_the_models_forward(tiny_loaded):
    assert cpu_engine(tiny_loaded("qwen3")).runner.cpu_decode is None  # per-head q/k norms
    assert cpu_engine(tiny_loaded("llama"), attention_backend="torch").runner.cpu_decode is None  # the reference
    assert cpu_engine(tiny_loaded("llama"), dtype="bfloat16").runner.cpu_decode is None

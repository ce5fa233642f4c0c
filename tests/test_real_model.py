"""The embedded SmolLM2-135M-Instruct through the whole engine (slow: loads the real model)."""
from __future__ import annotations

import pytest

from miniyaie import Engine, EngineConfig, SamplingParams
from miniyaie.cpu_kernels import BlockCodes, HeadScreen, Q4Panels, multiplies_q4_codes_fast
from miniyaie.cpu_linear import CpuLinear

from conftest import needs_cpu_kernel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return Engine(EngineConfig(model="embedded", device="cpu", dtype="float32", num_blocks=256))


def test_capital_of_france(smollm2, all_threads):
    out = smollm2.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                           SamplingParams(max_tokens=32, temperature=0.0))[0]
    print(f"\n{out.text!r} ({out.finish_reason})")
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")
    smollm2.check_integrity()


def test_batched_greedy_equals_alone(smollm2, all_threads):
    """Real weights (sharper distributions than random ones): the same chat prompts alone and
    batched together with a shared system prompt give the same greedy tokens."""
    system = {"role": "system", "content": "You are a concise, friendly assistant for a geography and "
              "general-knowledge quiz. Answer every question in one short sentence, without lists, "
              "without repeating the question, and without any extra commentary."}
    questions = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?"]
    prompts = [[system, {"role": "user", "content": q}] for q in questions]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    alone = [smollm2.generate([p], params)[0].token_ids for p in prompts]
    smollm2.clear_cache()
    together = smollm2.generate(prompts, params)
    assert [o.token_ids for o in together] == alone
    assert sum(o.cached_tokens for o in together) > 0
    smollm2.check_integrity()
    smollm2.clear_cache()
    assert smollm2.runner.kv.num_free_blocks == smollm2.runner.kv.num_blocks


def test_a_prompt_in_chunks_answers_as_the_whole_prompt(smollm2, all_threads):
    """A prompt over the step's token budget is prefilled a chunk a step, and a step that only
    continues it wants no logits: the head then runs on no rows (the C Linear on codes used to
    crash there)."""
    prompt = [{"role": "user", "content": "Explain in two sentences why the sky is blue during the day."}]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    whole = smollm2.generate([prompt], params)[0]
    chunked = Engine(EngineConfig(model="embedded", device="cpu", dtype="float32", num_blocks=64,
                                  max_num_batched_tokens=16))
    out = chunked.generate([prompt], params)[0]
    assert len(out.prompt_token_ids) > 2 * 16  # three chunks or more
    assert out.token_ids == whole.token_ids
    chunked.check_integrity()


@needs_cpu_kernel
def test_decode_reads_the_weights_as_block_codes(smollm2):
    """The embedded checkpoint is Q4_1 (the layers) and Q8_0 (the tied embedding): every Linear finds
    exact codes; the layers' Q4_1 codes go to the integer products where those are fast here."""
    linears = [m for m in smollm2.runner.model.modules() if isinstance(m, CpuLinear)]
    assert len(linears) == 30 * 4 + 1  # fused qkv, o, fused gate/up, down per layer; the head
    head = smollm2.runner.model.lm_head
    layers = [m for m in linears if m is not head]
    layer_kind = Q4Panels if multiplies_q4_codes_fast() else BlockCodes
    assert all(isinstance(m.kernel_weight, layer_kind) for m in layers)
    assert isinstance(head.kernel_weight, BlockCodes)


def test_greedy_steps_pick_the_tokens_the_full_head_picks(smollm2, all_threads):
    """Greedy requests that want no log-probabilities take their tokens from the head's integer
    screen (csrc/greedy_head.c): the same tokens as with every logit computed. A request that asks
    for log-probabilities sends its steps through the full head. (Where there is no AVX-512 VNNI
    the engine does not screen; here the screen runs on plain C then, for the test.)"""
    forward = smollm2.runner.cpu_forward
    screen = forward.head_screen
    assert screen is not None or isinstance(forward.model.lm_head.kernel_weight, BlockCodes)
    prompts = [[{"role": "user", "content": q}] for q in
               ("Name three planets.", "What is a prime number?", "Say hello in French.", "Why is ice slippery?")]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    picked = []
    greedy_tokens = smollm2.runner.greedy_tokens
    smollm2.runner.greedy_tokens = lambda batch: picked.append(batch.num_seqs) or greedy_tokens(batch)
    try:
        forward.head_screen = None
        full = [o.token_ids for o in smollm2.generate(prompts, params)]
        assert picked == []
        forward.head_screen = screen or HeadScreen(forward.model.lm_head.kernel_weight)
        smollm2.clear_cache()
        screened = [o.token_ids for o in smollm2.generate(prompts, params)]
        assert len(picked) >= 24 and screened == full
        picked.clear()
        smollm2.clear_cache()
        with_logprobs = smollm2.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0.0, logprobs=2))[0]
        assert picked == [] and with_logprobs.token_ids == full[0][:4] and len(with_logprobs.choices) == 4
    finally:
        forward.head_screen = screen
        del smollm2.runner.greedy_tokens
    smollm2.check_integrity()

"""The engine end to end on tiny random-weight models (CPU, fp32, block_size 4, small pools).

Token-id prompts keep it fast; ``ignore_eos`` keeps lengths fixed. Where a test needs known
output text (stop strings, emoji), the sampled tokens are scripted: the model still runs and the
scripted tokens are fed back to it, so detokenization and stop handling see real traffic.
"""
from __future__ import annotations

import dataclasses
import functools
import random
import time
import weakref

import pytest

from miniyaie import Engine, EngineConfig, SamplingParams
from miniyaie.request import RequestStatus

from conftest import BLOCK_SIZE, VOCAB, assert_drained, needs_cpu_kernel

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def make_engine(request, make_engine):
    """Every engine test runs twice: with each step's tokens processed at once (the CPU default)
    and overlapped (the GPU default: read back one step later, while the next step runs)."""
    return functools.partial(make_engine, overlap_schedule=request.param)


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, **{**GREEDY, **kw})


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, VOCAB) for _ in range(n)]


def script_outputs(engine: Engine, scripts: dict[tuple[int, ...], list[int]]) -> None:
    """Make requests whose prompt is a key of ``scripts`` "sample" the scripted tokens in order
    (then whatever the model picks): each launched step's sampled ids are overwritten on the
    device, so the network, the read-back and everything downstream see them."""
    original = engine._launch

    def launch(plan, previous):
        launched = original(plan, previous)
        for row, (request, position) in enumerate(zip(launched.rows, launched.positions)):
            script = scripts.get(tuple(request.prompt_token_ids), [])
            index = position - request.num_prompt_tokens
            if index < len(script):
                launched.output.token_ids[row] = script[index]
        return launched

    engine._launch = launch


def run_all(engine: Engine, prompts, params) -> dict[str, list[int]]:
    """Submit everything, then step until done, checking integrity after every step."""
    ids = [engine.add_request(p, params) for p in prompts]
    steps = 0
    while engine.has_unfinished:
        engine.step()
        engine.check_integrity()
        steps += 1
        assert steps < 10_000, "engine made no progress"
    return {i: engine.result(i) for i in ids}


# ---- greedy invariance -------------------------------------------------------------------------


def shared_prefix_workload(seed: int = 0) -> list[list[int]]:
    """40 prompts: a system prompt shared by most, few-shot examples on top of it, multi-turn
    chats whose later turns extend the earlier ones, and a few unrelated prompts."""
    rng = random.Random(seed)
    system = random_tokens(rng, 45)  # ends mid-block on purpose
    fewshot = system + random_tokens(rng, 38)
    prompts = [system + random_tokens(rng, rng.randrange(3, 20)) for _ in range(10)]
    prompts += [fewshot + random_tokens(rng, rng.randrange(2, 12)) for _ in range(10)]
    for _ in range(3):  # chats: turn k+1 = turn k + assistant reply + new user message
        turn = system + random_tokens(rng, rng.randrange(4, 10))
        for _ in range(4):
            prompts.append(list(turn))
            turn = turn + random_tokens(rng, rng.randrange(6, 14)) + random_tokens(rng, rng.randrange(3, 8))
    prompts += [random_tokens(rng, rng.randrange(1, 40)) for _ in range(8)]
    rng.shuffle(prompts)
    assert len(prompts) == 40
    return prompts


MAX_TOKENS = 10


@pytest.fixture(scope="module")
def reference_outputs(tiny_loaded):
    """Each prompt alone, prefix cache off, plenty of blocks: the ground truth."""
    from miniyaie import EngineConfig

    loaded = tiny_loaded("llama")
    engine = Engine(EngineConfig(model=loaded.source_dir, device="cpu", dtype="float32", block_size=BLOCK_SIZE,
                                 num_blocks=64, enable_prefix_cache=False, attention_backend="torch"),
                    loaded=loaded)
    outs = []
    for p in shared_prefix_workload():
        out = engine.generate([p], greedy(MAX_TOKENS))[0]
        assert out.cached_tokens == 0 and len(out.token_ids) == MAX_TOKENS
        outs.append(out.token_ids)
    assert_drained(engine)
    return outs


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_cpu_kernel)])
@pytest.mark.parametrize("policy,budget", [("lpm", 2048), ("fcfs", 2048), ("lpm", 16), ("fcfs", 16)],
                         ids=["lpm", "fcfs", "lpm-chunked16", "fcfs-chunked16"])
def test_greedy_output_independent_of_batching_cache_and_preemption(make_engine, reference_outputs, policy, budget,
                                                                    backend):
    """Against each prompt run alone on the torch backend: the cpu backend's C decode kernel too."""
    prompts = shared_prefix_workload()
    longest = max(len(p) for p in prompts) + MAX_TOKENS
    # just over what the longest request needs alone: 40 requests must evict and preempt
    num_blocks = -(-longest // BLOCK_SIZE) + 6
    engine = make_engine(num_blocks=num_blocks, schedule_policy=policy, max_num_batched_tokens=budget,
                         attention_backend=backend)
    evicted = []  # counted independently of telemetry, which reads the tree's event log
    tree_evict = engine.scheduler.tree.evict

    def counting_evict(num_blocks):
        freed = tree_evict(num_blocks)
        evicted.extend(freed)
        return freed

    engine.scheduler.tree.evict = counting_evict
    results = run_all(engine, prompts, greedy(MAX_TOKENS))
    outs = list(results.values())
    for i, (out, want) in enumerate(zip(outs, reference_outputs)):
        assert out.token_ids == want, f"prompt {i} ({len(prompts[i])} tokens) diverged"
        assert out.finish_reason == "length"
    metrics = engine.snapshot().metrics
    print(f"\n{policy}/{budget}: {num_blocks} blocks, preemptions {engine.scheduler.num_preemptions}, "
          f"evicted blocks {metrics.evicted_blocks}, cached {metrics.cached_tokens}/{metrics.prompt_tokens} "
          f"prompt tokens, forward tokens {engine.num_forward_tokens}")
    assert engine.scheduler.num_preemptions > 0
    assert metrics.evicted_blocks > 0
    assert metrics.evicted_blocks == len(evicted)
    assert sum(o.cached_tokens for o in outs) > 0, "no request hit the prefix cache"
    assert_drained(engine)


def test_greedy_tokens_same_with_big_batch_and_no_pressure(make_engine, reference_outputs):
    """The same 40 prompts all in one batch with room to spare (no preemption): every prefix
    shared, still the reference tokens."""
    engine = make_engine(num_blocks=1024)
    outs = engine.generate(shared_prefix_workload(), greedy(MAX_TOKENS))
    assert [o.token_ids for o in outs] == reference_outputs
    assert engine.scheduler.num_preemptions == 0
    assert_drained(engine)


# ---- prefix reuse --------------------------------------------------------------------------------


def test_prefix_reuse_is_real(make_engine, tiny_model_dir, tokenizer):
    """A repeated 300-token prompt is served from the cache: cached_tokens is every whole block
    of the first request's prompt but the last token (which must be computed to yield logits),
    and only the rest is fed to the network. (TTFT is asserted on a bigger model below.)"""
    engine = make_engine("llama", num_blocks=256, max_num_batched_tokens=2048)
    rng = random.Random(5)
    prompt = random_tokens(rng, 300)
    engine.generate([random_tokens(rng, 20)], greedy(2))  # warm up the kernels
    before = engine.num_forward_tokens
    first = engine.generate([prompt], greedy(4))[0]
    assert first.cached_tokens == 0
    assert engine.num_forward_tokens - before == 300 + 3
    before = engine.num_forward_tokens
    second = engine.generate([prompt], greedy(4))[0]
    expected_cached = (300 - 1) // BLOCK_SIZE * BLOCK_SIZE  # 296: whole blocks of the first 299 tokens
    assert second.cached_tokens == expected_cached
    assert engine.num_forward_tokens - before == (300 - expected_cached) + 3
    assert second.token_ids == first.token_ids
    assert_drained(engine)


def test_prefix_reuse_ttft_on_bigger_model(tmp_path, tokenizer):
    """Timing on a model big enough that a 300-token prefill clearly costs more than 4 tokens."""
    import transformers
    from miniyaie import EngineConfig

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                      max_position_embeddings=512)
    config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), load_format="dummy", device="cpu", dtype="float32",
                                 block_size=BLOCK_SIZE, num_blocks=128))
    rng = random.Random(6)
    engine.generate([random_tokens(rng, 50)], greedy(2))  # warm-up
    prompt = random_tokens(rng, 300)
    first = engine.generate([prompt], greedy(1))[0]
    second = engine.generate([prompt], greedy(1))[0]
    print(f"\nTTFT first {first.metrics.ttft * 1e3:.1f} ms, repeated {second.metrics.ttft * 1e3:.1f} ms")
    assert second.cached_tokens == 296
    assert second.metrics.ttft < first.metrics.ttft
    assert_drained(engine)


def test_prefix_shared_while_first_request_still_running(make_engine):
    """A request arriving while another computes the same long prefix waits for it (or shares
    the prompt blocks it finished) rather than computing them again."""
    engine = make_engine(max_num_batched_tokens=32)
    rng = random.Random(8)
    shared = random_tokens(rng, 120)
    a = engine.add_request(shared + random_tokens(rng, 5), greedy(4))
    engine.step()
    b = engine.add_request(shared + random_tokens(rng, 7), greedy(4))
    while engine.has_unfinished:
        engine.step()
        engine.check_integrity()
    assert engine.result(a).cached_tokens == 0
    assert engine.result(b).cached_tokens >= 120 // BLOCK_SIZE * BLOCK_SIZE
    assert engine.num_forward_tokens < 2 * 120
    assert_drained(engine)


# ---- integrity, abort ---------------------------------------------------------------------------


def test_all_blocks_free_after_finish_and_clear(make_engine):
    engine = make_engine(num_blocks=64)
    rng = random.Random(9)
    base = random_tokens(rng, 30)
    outs = engine.generate([base + random_tokens(rng, n) for n in (1, 5, 9, 13)], greedy(6))
    assert all(o.finish_reason == "length" for o in outs)
    assert engine.scheduler.tree.num_blocks > 0  # finished prompts stayed cached...
    assert_drained(engine)  # ...until cleared


def test_abort_mid_prefill_frees_blocks_and_leaves_others_alone(make_engine):
    rng = random.Random(10)
    long_prompt, other = random_tokens(rng, 80), random_tokens(rng, 23)
    alone = make_engine(enable_prefix_cache=False).generate([other], greedy(8))[0].token_ids

    engine = make_engine(enable_prefix_cache=False, max_num_batched_tokens=16)
    victim = engine.add_request(long_prompt, greedy(8))
    keep = engine.add_request(other, greedy(8))
    engine.step()
    engine.step()
    request = engine.requests[victim]
    assert request.status == RequestStatus.RUNNING and 0 < request.num_computed_tokens < 80
    held = list(request.block_table)
    assert held
    assert engine.abort(victim)
    engine.check_integrity()
    owned = {b for r in engine.scheduler.running for b in r.block_table}
    assert not owned & set(held)
    assert all(engine.runner.kv.ref_counts[b] == 0 for b in held if b not in owned)
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
        engine.check_integrity()
    aborted = [o for o in outputs if o.request_id == victim]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert engine.result(keep).token_ids == alone
    assert engine.result(victim).finish_reason == "abort"
    assert not engine.abort(keep)  # already finished
    assert_drained(engine)


def test_abort_mid_decode_with_prefix_cache(make_engine):
    rng = random.Random(11)
    shared = random_tokens(rng, 40)
    p1, p2 = shared + random_tokens(rng, 6), shared + random_tokens(rng, 9)
    alone = make_engine(enable_prefix_cache=False).generate([p2], greedy(12))[0].token_ids

    engine = make_engine()
    victim = engine.add_request(p1, greedy(12))
    keep = engine.add_request(p2, greedy(12))
    while len(engine.requests[victim].output_token_ids) < 4:
        engine.step()
    request = engine.requests[victim]
    assert request.status == RequestStatus.RUNNING and not request.is_prefilling
    free_before = engine.runner.kv.num_free_blocks
    private = [b for b in request.block_table if engine.runner.kv.ref_counts[b] == 1]
    assert engine.abort(victim)
    engine.check_integrity()
    assert engine.runner.kv.num_free_blocks == free_before + len(private)
    assert engine.requests[victim].block_table == []
    while engine.has_unfinished:
        engine.step()
        engine.check_integrity()
    assert engine.result(keep).token_ids == alone
    out = engine.result(victim)
    assert out.finish_reason == "abort" and 4 <= len(out.token_ids) < 12
    assert_drained(engine)


def test_abort_waiting_request_and_stream_closed_early(make_engine):
    engine = make_engine(max_num_seqs=1)
    a = engine.add_request([5, 6, 7], greedy(4))
    b = engine.add_request([8, 9, 10], greedy(4))
    engine.step()
    assert engine.requests[b].status == RequestStatus.WAITING
    assert engine.abort(b)
    assert not engine.abort("no-such-request")
    while engine.has_unfinished:
        engine.step()
    assert engine.result(a).finish_reason == "length"
    # a consumer that stops reading a stream: the request is aborted and frees its blocks
    stream = engine.stream([1, 2, 3, 4, 5], greedy(20))
    next(stream)
    stream.close()
    engine.check_integrity()
    engine.step()  # reports the abort
    assert not engine.has_unfinished
    assert list(engine.requests) == [b], "only the aborted request nobody collected yet"
    assert_drained(engine)


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,params,message", [
    ("", None, "empty"),
    ([], None, "prompt"),
    ([1, -1, 2], None, "token ids"),
    ([1, VOCAB, 2], None, "token ids"),
    ([1, 2.5], None, "token ids"),
    ("bad \udcff surrogate", None, "UTF-8"),
    ([{"role": "user", "content": "hi \ud800"}], None, "UTF-8"),
    ([{"role": "user"}], None, "content"),
    (12345, None, "prompt must be"),
    ([7] * 64, None, "context"),  # max_model_len is 64 here
    ([7] * 80, None, "context"),
    ([7] * 10, greedy(60), "max_tokens"),
])
def test_bad_input_is_rejected_and_engine_keeps_serving(make_engine, prompt, params, message):
    engine = make_engine(max_model_len=64)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params or greedy(4))
    assert not engine.has_unfinished and not engine.requests
    out = engine.generate([[1, 2, 3]], greedy(3))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert_drained(engine)


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("max_tokens", -3), ("temperature", -1.0),
                                         ("top_p", 0.0), ("top_k", -5), ("stop_token_ids", [-1])])
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_max_tokens_reaching_context_end_finishes_with_length(make_engine):
    engine = make_engine(max_model_len=32)
    out = engine.generate([[3] * 20], greedy(12))[0]  # exactly fills the context
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request([3] * 20, greedy(13))
    assert_drained(engine)


def test_request_bigger_than_the_whole_pool_is_rejected(make_engine):
    """A request that could never fit the KV pool would wait (or preempt itself) forever and block
    the queue behind it: it is refused up front. One that fits exactly runs."""
    engine = make_engine(num_blocks=8)  # 32 token slots
    with pytest.raises(ValueError, match="pool"):
        engine.add_request([3] * 40, greedy(2))
    with pytest.raises(ValueError, match="pool"):
        engine.add_request([3] * 20, greedy(14))
    out = engine.generate([[3] * 20], greedy(13))[0]  # 20 + 13 - 1 = 32 slots: the last token is never stored
    assert len(out.token_ids) == 13 and out.finish_reason == "length"
    assert engine.generate([[4, 5]], greedy(2))[0].finish_reason == "length"
    assert_drained(engine)


def test_generate_with_one_bad_prompt_queues_nothing(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([[1, 2, 3], [4, 5], [-1]], greedy(3))
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.generate([[1, 2, 3], [4, 5]], [greedy(3)])
    assert not engine.requests and not engine.has_unfinished
    assert engine.step() == []
    assert [len(o.token_ids) for o in engine.generate([[1, 2, 3], [4, 5]], greedy(3))] == [3, 3]
    assert not engine.requests
    assert_drained(engine)


def test_duplicate_request_id_rejected(make_engine):
    engine = make_engine()
    engine.add_request([1, 2], greedy(2), request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([3, 4], greedy(2), request_id="x")
    while engine.has_unfinished:
        engine.step()
    assert engine.result("x").finish_reason == "length"
    assert_drained(engine)


def test_emoji_and_cjk_roundtrip(make_engine, tokenizer):
    """Text prompts with emoji and CJK work; when the model "says" such text (scripted), the
    output and the streamed deltas reproduce it exactly, never with U+FFFD."""
    engine = make_engine()
    answer = "猫は好き？🐈‍⬛ 是的，我喜欢猫！👍🏽 café"
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    assert tokenizer.decode(answer_ids) == answer
    prompt = "こんにちは 🌍 你好世界"
    prompt_ids = engine.tokenize(prompt)
    assert tokenizer.decode(prompt_ids) == prompt
    script_outputs(engine, {tuple(prompt_ids): answer_ids})
    out = engine.generate([prompt], greedy(len(answer_ids)))[0]
    assert out.token_ids == answer_ids
    assert out.text == answer
    deltas = [o.delta_text for o in engine.stream(prompt, greedy(len(answer_ids)))]
    assert "".join(deltas) == answer
    assert all("\ufffd" not in d for d in deltas)
    chat = engine.generate([[{"role": "user", "content": "日本語で答えて 🙂"}]], greedy(5))[0]
    assert len(chat.token_ids) == 5
    assert_drained(engine)


# ---- stopping, streaming, sampling ---------------------------------------------------------------


def test_stop_string_is_not_in_output(make_engine, tokenizer):
    engine = make_engine()
    text = "The answer is 42.\nEND of answer, more text"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = [11, 12, 13]
    script_outputs(engine, {tuple(prompt): ids})
    out = engine.generate([prompt], greedy(len(ids), stop=["\nEND"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == "The answer is 42."
    deltas = [o.delta_text for o in engine.stream(prompt, greedy(len(ids), stop=["\nEND", "zzz"]))]
    assert "".join(deltas) == "The answer is 42."
    # a stop string that never appears: runs to max_tokens with the whole text
    out = engine.generate([prompt], greedy(len(ids), stop=["never"]))[0]
    assert out.finish_reason == "length" and out.text == text
    assert_drained(engine)


def test_stop_token_ids_and_eos(make_engine, tokenizer):
    engine = make_engine()
    prompt = [21, 22, 23]
    script = [300, 301, 302, 303, 304]
    script_outputs(engine, {tuple(prompt): script})
    out = engine.generate([prompt], greedy(10, stop_token_ids=[302]))[0]
    assert out.finish_reason == "stop" and out.token_ids == [300, 301, 302]
    assert out.text == tokenizer.decode([300, 301])  # the stop token is not shown
    eos = tokenizer.eos_token_id
    script_outputs(engine, {tuple(prompt): [300, eos, 301]})
    out = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids == [300, eos]
    out = engine.generate([prompt], greedy(3))[0]  # ignore_eos: keeps going
    assert out.finish_reason == "length" and out.token_ids[:2] == [300, eos] and len(out.token_ids) == 3
    assert_drained(engine)


def test_stream_deltas_concatenate_to_final_text(make_engine):
    engine = make_engine()
    prompt = [31, 32, 33, 34]
    outs = list(engine.stream(prompt, greedy(12)))
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert all(not o.finished for o in outs[:-1])
    ids = [t for o in outs for t in o.new_token_ids]
    final = engine.generate([prompt], greedy(12))[0]
    assert ids == final.token_ids
    assert "".join(o.delta_text for o in outs) == final.text
    assert not engine.requests, "a finished stream leaves nothing behind"
    assert_drained(engine)


def test_seeded_sampling_reproducible_alone_and_in_batch(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = [41, 42, 43]
    alone = engine.generate([prompt], params)[0].token_ids
    again = engine.generate([prompt], params)[0].token_ids
    assert alone == again
    rng = random.Random(12)
    others = [random_tokens(rng, rng.randrange(2, 30)) for _ in range(5)]
    unseeded = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    batch = engine.generate([others[0], others[1], prompt, *others[2:]],
                            [unseeded, unseeded, params, unseeded, unseeded, unseeded])
    assert batch[2].token_ids == alone
    other_seed = dataclasses.replace(params, seed=99)
    assert engine.generate([prompt], other_seed)[0].token_ids != alone
    assert_drained(engine)


def test_text_prompt_and_chat_messages(make_engine, tokenizer):
    engine = make_engine()
    out = engine.generate("Hello there", greedy(3))[0]
    assert out.prompt_token_ids == tokenizer.encode("Hello there")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = engine.generate([messages], greedy(3))[0]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.prompt_token_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert_drained(engine)


# ---- snapshot ------------------------------------------------------------------------------------


def test_snapshot_shows_shared_prefix_and_batching(make_engine):
    engine = make_engine(num_blocks=128)
    rng = random.Random(13)
    system = random_tokens(rng, 40)
    engine.generate([system + random_tokens(rng, 5)], greedy(2))  # cache the system prompt
    ids = [engine.add_request(system + random_tokens(rng, n), greedy(6)) for n in (3, 7, 11)]
    engine.step()
    snap = engine.snapshot()
    assert snap is engine.snapshot(), "unchanged engine: the same snapshot object"
    shared = [b for b in snap.blocks if b.state == "shared"]
    assert len(shared) >= 40 // BLOCK_SIZE
    assert any(len(b.owners) >= 2 for b in shared)
    root = next(n for n in snap.tree if n.parent_id is None)
    locked = [n for n in snap.tree if n.lock_ref >= 3]
    assert locked and locked[0].parent_id == root.id, "the shared system prompt is one locked node"
    assert locked[0].num_tokens == 40 // BLOCK_SIZE * BLOCK_SIZE
    assert {r.id for r in snap.requests if r.status == "running"} == set(ids)
    assert all(r.cached_tokens == 40 for r in snap.requests if r.id in ids)
    while engine.has_unfinished:
        engine.step()
    snap = engine.snapshot()
    assert any(len(s.decode) >= 3 for s in snap.steps), "decode steps batched the three requests"
    assert snap.metrics.requests_finished == 4 and snap.metrics.cached_tokens >= 120
    assert snap.free_blocks + sum(1 for b in snap.blocks if b.state != "free") == snap.num_blocks
    for r in ids:
        engine.result(r)
    # build time, with a bigger tree: print only (no timing asserts)
    for _ in range(3):
        engine.generate([random_tokens(rng, 30) for _ in range(10)], greedy(2))
    engine.telemetry.touch()
    start = time.perf_counter()
    snap = engine.snapshot()
    print(f"\nsnapshot: {len(snap.tree)} nodes, {len(snap.blocks)} blocks, "
          f"built in {(time.perf_counter() - start) * 1e3:.2f} ms")
    assert_drained(engine)


def test_engine_imports_without_ui_code():
    """The engine is a library: importing it (and the server) pulls in no Gradio or UI code."""
    import subprocess
    import sys

    code = ("import sys; import miniyaie, miniyaie.engine_thread, miniyaie.server; "
            "bad = [m for m in sys.modules if m == 'gradio' or m.startswith(('gradio.', 'ui.', 'plotly'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_idle_telemetry_lets_throughput_fall_to_zero(engine, monkeypatch):
    """While nothing runs, the views keep moving: new history samples arrive until tokens/s is 0."""
    import miniyaie.telemetry as telemetry

    engine.generate([[1, 2, 3, 4, 5]], greedy(4))
    history = engine.telemetry.history
    assert history and history[-1].tokens_per_s > 0
    clock = [time.time()]
    monkeypatch.setattr(telemetry.time, "time", lambda: clock[0])
    version = engine.telemetry.version
    engine.telemetry.on_idle()  # under a second since the last sample: nothing to add
    assert engine.telemetry.version == version
    for _ in range(8):  # eight idle seconds
        clock[0] += 1.0
        engine.telemetry.on_idle()
    assert engine.telemetry.version > version
    assert history[-1].tokens_per_s == 0.0 and history[-1].running == 0
    settled = (len(history), engine.telemetry.version)
    clock[0] += 30.0  # nothing recent left to fade: idle costs nothing more
    engine.telemetry.on_idle()
    assert (len(history), engine.telemetry.version) == settled


# ---- overlapped steps ----------------------------------------------------------------------------


@pytest.mark.parametrize("make_engine", [False], ids=["both-modes"], indirect=True)
def test_overlap_gives_the_same_answers_with_stops_penalties_and_aborts(make_engine):
    """The overlapped engine must answer exactly as the step-by-step one, in a batch where
    requests stop on a token mid-flight (their next row is discarded), use penalties (which
    make the engine read tokens back before the next step) or are aborted while a step runs."""
    rng = random.Random(5)
    prompts = [random_tokens(rng, rng.randrange(3, 30)) for _ in range(8)]
    stop_at = {tuple(prompts[i]): [300] * i + [400 + i] for i in (0, 1, 2)}  # token 400+i ends them
    params = [greedy(10, stop_token_ids=[400 + i]) if i < 3 else
              greedy(12, repetition_penalty=1.3, presence_penalty=0.5) if i in (3, 4) else greedy(9 + i)
              for i in range(8)]
    answers = {}
    for overlap in (False, True):
        engine = make_engine(overlap_schedule=overlap)
        script_outputs(engine, stop_at)
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        victim = engine.add_request(prompts[7], greedy(30))
        while len(engine.requests[victim].output_token_ids) < 3:
            engine.step()
        assert engine.abort(victim)
        while engine.has_unfinished:
            engine.step()
            engine.check_integrity()
        answers[overlap] = [engine.result(i).token_ids for i in ids]
        aborted = engine.result(victim)
        assert aborted.finish_reason == "abort" and -1 not in aborted.token_ids
        assert_drained(engine)
    assert answers[True] == answers[False]
    assert [len(a) for a in answers[True][:3]] == [1, 2, 3]  # stopped on their scripted token


@pytest.mark.parametrize("make_engine", [False], ids=["both-modes"], indirect=True)
def test_overlap_runs_no_extra_rows_for_length_limits(make_engine):
    """A request whose in-flight token is its last by length is not scheduled again: with
    ``ignore_eos`` the overlapped engine feeds exactly as many tokens to the network."""
    rng = random.Random(6)
    prompts = [random_tokens(rng, rng.randrange(3, 40)) for _ in range(6)]
    fed = {}
    for overlap in (False, True):
        engine = make_engine(overlap_schedule=overlap)
        outs = engine.generate(prompts, [greedy(1 + 3 * i) for i in range(6)])
        assert [len(o.token_ids) for o in outs] == [1 + 3 * i for i in range(6)]
        fed[overlap] = engine.num_forward_tokens
        assert_drained(engine)
    assert fed[True] == fed[False]


def test_a_dropped_engine_frees_its_kv_pool(tiny_loaded):
    """The engine freezes its start-up objects out of the garbage collector (gc.freeze), so it
    must hold no reference cycle: dropping the last reference frees it, KV pool included, at
    once. (On a GPU a leaked engine keeps most of the GPU's memory.)"""
    loaded = tiny_loaded()
    engine = Engine(EngineConfig(model=loaded.source_dir, device="cpu", num_blocks=64), loaded=loaded)
    engine.generate([[1, 2, 3, 4, 5]], greedy(3))
    engine.snapshot()
    alive, pool = weakref.ref(engine), weakref.ref(engine.runner.kv.k_pool)
    del engine
    assert alive() is None and pool() is None

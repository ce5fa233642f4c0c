"""The OpenAI-compatible API, driven over real HTTP by the official `openai` client and httpx.

One uvicorn server (in a background thread, on a free port of 127.0.0.1) serves a tiny
random-weight Llama from conftest's ``tiny_loaded`` through an EngineThread for the whole module.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from conftest import serving
from miniyaie import Engine, EngineConfig
from miniyaie.engine_thread import EngineThread
from miniyaie.server import create_api

API_KEY = "test-key"
MODEL = "tiny-llama"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Served:
    thread: EngineThread
    url: str  # http://127.0.0.1:PORT

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)

    def engine_call(self, fn):
        return self.thread.call(fn)


@pytest.fixture(scope="module")
def served(tiny_loaded):
    loaded = tiny_loaded("llama")
    engine = Engine(EngineConfig(model=loaded.source_dir, device="cpu", dtype="float32", block_size=16,
                                 num_blocks=512, attention_backend="torch"), loaded=loaded)
    thread = EngineThread(engine).start()
    with serving(create_api(thread, api_key=API_KEY, model_name=MODEL)) as url:
        yield Served(thread, url)
    thread.stop()


def _unique(text: str) -> str:
    """A prompt no earlier test has cached."""
    return f"[{uuid.uuid4().hex[:8]}] {text}"


def _wait_idle(served: Served, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while True:
        running, waiting = served.engine_call(lambda e: (len(e.scheduler.running), len(e.scheduler.waiting)))
        if running == 0 and waiting == 0:
            return
        assert time.time() < deadline, f"still {running} running, {waiting} waiting"
        time.sleep(0.05)


# ---- basics ------------------------------------------------------------------------------------


def test_models_and_health(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert served.client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_chat_non_streaming_and_streaming_agree(served):
    messages = [{"role": "user", "content": _unique("Say something.")}]
    full = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 extra_body={"ignore_eos": True})
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                                        temperature=0, stream=True,
                                                        extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_completions_prompt_forms_and_n(served):
    c = served.client
    text = c.completions.create(model=MODEL, prompt=_unique("Once upon a time"), max_tokens=5, temperature=0)
    assert text.object == "text_completion" and len(text.choices) == 1 and text.usage.completion_tokens <= 5

    ids = [1, 2, 3, 4, 5]
    several = c.completions.create(model=MODEL, prompt=[ids, [6, 7, 8]], max_tokens=4, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert [ch.index for ch in several.choices] == [0, 1]
    assert several.usage.prompt_tokens == 8 and several.usage.completion_tokens == 8
    alone = c.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert alone.choices[0].text == several.choices[0].text

    strings = c.completions.create(model=MODEL, prompt=["a b", "c d"], max_tokens=3, temperature=0, n=2)
    assert [ch.index for ch in strings.choices] == [0, 1, 2, 3]
    assert strings.choices[0].text == strings.choices[1].text  # greedy: n copies agree

    sampled = c.completions.create(model=MODEL, prompt="x", max_tokens=8, n=3, seed=7,
                                   extra_body={"ignore_eos": True})
    again = c.completions.create(model=MODEL, prompt="x", max_tokens=8, n=3, seed=7,
                                 extra_body={"ignore_eos": True})
    texts = [ch.text for ch in sampled.choices]
    assert texts == [ch.text for ch in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # ...but each choice draws its own seed


def test_max_completion_tokens_and_stop(served):
    r = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_completion_tokens=3, temperature=0,
                                              extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    free = served.client.completions.create(model=MODEL, prompt="stop test", max_tokens=10, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text
    stop = free[2:5] if len(free.strip()) >= 5 else None
    if stop:  # the random model's text decides what a stop string can be
        cut = served.client.completions.create(model=MODEL, prompt="stop test", max_tokens=10, temperature=0,
                                               stop=[stop], extra_body={"ignore_eos": True}).choices[0]
        assert cut.finish_reason == "stop" and cut.text == free[:free.index(stop)]


def test_logprobs_shapes(served):
    chat = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                                                 extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
        assert entry.logprob <= 0

    comp = served.client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=0, logprobs=2,
                                            extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(2 <= len(alts) <= 3 for alts in lp.top_logprobs)
    assert "".join(lp.tokens) == comp.choices[0].text


def test_stream_include_usage(served):
    chunks = list(served.client.completions.create(model=MODEL, prompt=_unique("usage please"), max_tokens=6,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert last.usage.prompt_tokens_details.cached_tokens >= 0


def test_cached_tokens_on_repeated_prompt(served):
    system = _unique("You are a careful assistant. " * 12)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}]
    first = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    second = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 64
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    assert 48 <= cached < second.usage.prompt_tokens  # whole blocks; the last token is always computed


# ---- errors ------------------------------------------------------------------------------------


def test_bad_parameters_are_400(served):
    c = served.client
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert err.value.body["param"] == "temperature" and "temperature" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt="word " * 2000, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="hi", extra_body={"top_k": -7})
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt=[10**9], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[], max_tokens=2)

    raw = httpx.post(f"{served.url}/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                     content=b"{not json")
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}
    raw = httpx.post(f"{served.url}/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": {"x": 1}})
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "prompt"
    _wait_idle(served)
    served.engine_call(lambda e: e.check_integrity())


def test_unknown_model_is_404_and_alias_is_accepted(served):
    with pytest.raises(openai.NotFoundError) as err:
        served.client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found"
    source_dir = served.thread.engine.config.model  # the id the engine was started with
    ok = served.client.completions.create(model=source_dir, prompt="hi", max_tokens=2)
    assert ok.model == MODEL


def test_api_key_is_required(served):
    bad = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    missing = httpx.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{served.url}/health").status_code == 200  # health and metrics stay open


def test_queue_full_is_429(served):
    engine = served.thread.engine
    saved = engine.config.max_waiting
    served.engine_call(lambda e: setattr(e.config, "max_waiting", 0))
    try:
        r = httpx.post(f"{served.url}/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "hi"})
    finally:
        served.engine_call(lambda e: setattr(e.config, "max_waiting", saved))
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_engine_down_is_503(served):
    stopped = EngineThread(served.thread.engine)  # never started: nothing steps the engine
    with TestClient(create_api(stopped, api_key="")) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["engine_thread_alive"] is False
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


# ---- many clients ------------------------------------------------------------------------------


def _sse_payloads(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


async def _stream_text(client: httpx.AsyncClient, body: dict) -> str:
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        lines = [line async for line in resp.aiter_lines()]
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    chunks = _sse_payloads(lines)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    return "".join(c["choices"][0]["text"] for c in chunks)


def test_32_concurrent_streams_match_one_by_one(served):
    topics = ["the sea", "mountains", "bread", "rivers", "cats", "the moon", "trains", "tea"]
    shared = _unique("You answer briefly and precisely. ")  # a shared prefix, as many chat users have
    bodies = [{"model": MODEL, "prompt": f"{shared}Question {i}: tell me about {topics[i % 8]}.",
               "max_tokens": 16, "temperature": 0, "ignore_eos": True} for i in range(32)]

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(_stream_text(client, b) for b in bodies))

    together = asyncio.run(all_at_once())
    alone = [served.client.completions.create(**{k: v for k, v in b.items() if k != "ignore_eos"},
                                              extra_body={"ignore_eos": True}).choices[0].text for b in bodies]
    assert together == alone
    _wait_idle(served)
    served.engine_call(lambda e: e.check_integrity())


def test_disconnected_clients_free_their_blocks(served):
    long = {"model": MODEL, "max_tokens": 400, "temperature": 0, "ignore_eos": True}

    async def leave_early(client: httpx.AsyncClient, i: int) -> int:
        seen = 0
        async with client.stream("POST", "/v1/completions",
                                 json={**long, "prompt": _unique(f"client {i} leaves"), "stream": True}) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 3:
                        break  # leaving the block closes the connection mid-stream
        return seen

    async def give_up_waiting(client: httpx.AsyncClient) -> None:
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that times out
            await client.post("/v1/completions", json={**long, "prompt": _unique("impatient")}, timeout=0.5)

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=60) as client:
            seen = await asyncio.gather(*(leave_early(client, i) for i in range(10)), give_up_waiting(client))
        return seen[:10]

    before = served.engine_call(lambda e: e.telemetry.counters.tokens_generated)
    assert asyncio.run(run()) == [3] * 10
    _wait_idle(served, timeout=20)
    served.engine_call(lambda e: e.check_integrity())
    finished = served.engine_call(lambda e: [(r.finish_reason, len(r.output_token_ids))
                                             for r in e.telemetry.finished])
    aborted = [n for reason, n in finished if reason == "abort"]
    assert len(aborted) >= 11 and all(n < 400 for n in aborted)
    generated = served.engine_call(lambda e: e.telemetry.counters.tokens_generated) - before
    assert generated < 11 * 400  # they really stopped early

    def drained(e) -> tuple[int, int]:
        e.clear_cache()
        e.check_integrity()
        return e.runner.kv.num_free_blocks, e.runner.kv.num_blocks

    free, total = served.engine_call(drained)
    assert free == total


# ---- metrics -----------------------------------------------------------------------------------


def test_metrics_prometheus_text(served):
    served.client.completions.create(model=MODEL, prompt=_unique("metrics"), max_tokens=3, temperature=0)
    r = httpx.get(f"{served.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["miniyaie_up"] == 1
    assert samples['miniyaie_requests_total{endpoint="completions"}'] >= 1
    assert samples["miniyaie_generation_tokens_total"] >= 3
    assert samples["miniyaie_prompt_tokens_total"] > 0
    assert "miniyaie_cached_tokens_total" in samples
    assert 0 <= samples["miniyaie_kv_cache_usage_ratio"] <= 1
    assert samples["miniyaie_kv_blocks"] == 512
    assert "miniyaie_num_requests_running" in samples and "miniyaie_num_requests_waiting" in samples
    count = samples["miniyaie_time_to_first_token_seconds_count"]
    assert count >= 1 and samples['miniyaie_time_to_first_token_seconds_bucket{le="+Inf"}'] == count
    buckets = [v for k, v in samples.items() if k.startswith("miniyaie_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert re.search(r"^# TYPE miniyaie_time_to_first_token_seconds histogram$", r.text, re.M)

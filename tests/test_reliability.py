"""Reliability: every limit answers clearly, a failed step fails only its requests, memory pressure
loses nothing, clients that leave are aborted, and the server neither loads nor serves what it
should not, nor logs its API key.

Engine-level tests run on conftest's tiny Llama; server tests share one real app (page + API) on
a free loopback port, built with small limits so each is easy to reach. To keep a request in
flight on purpose, tests slow every engine step through ``EngineThread.fault_hook``.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import assert_drained, serving, wait_until
from miniyaie import Engine, EngineConfig, SamplingParams
from miniyaie.engine import QueueFull
from miniyaie.engine_thread import EngineThread

REPO = Path(__file__).resolve().parent.parent
SECRET = "sk-test-" + uuid.uuid4().hex  # the API key: must never show up in a log or a response
AUTH = {"Authorization": f"Bearer {SECRET}"}
MAX_PROMPT, MAX_TOKENS_CAP, MAX_BODY, SESSION_LIMIT = 64, 64, 4096, 3


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


# ---- limits in the engine -------------------------------------------------------------------------


def test_limit_fields_are_validated():
    for name in ("max_prompt_tokens", "max_tokens_cap", "max_waiting"):
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: 0})


def test_prompt_length_and_max_tokens_caps(make_engine):
    engine = make_engine(max_prompt_tokens=8, max_tokens_cap=16)
    with pytest.raises(ValueError, match="at most 8 prompt tokens"):
        engine.add_request(list(range(1, 10)), _greedy(4))
    with pytest.raises(ValueError, match="max_tokens=17 is over this server's cap of 16"):
        engine.add_request([1, 2, 3], _greedy(17))
    out = engine.generate([list(range(1, 9))], _greedy(16))[0]
    assert len(out.token_ids) == 16 and not engine.requests  # the limits refuse, nothing leaks
    assert_drained(engine)


def test_queue_full_is_refused_and_leaves_nothing(make_engine):
    engine = make_engine(max_waiting=2)
    ids = [engine.add_request([1, 2, 3], _greedy(2)) for _ in range(2)]
    with pytest.raises(QueueFull):
        engine.add_request([4, 5, 6], _greedy(2))
    while engine.has_unfinished:
        engine.step()
    for rid in ids:
        engine.result(rid)
    assert_drained(engine)


# ---- faults --------------------------------------------------------------------------------------


def test_failed_forward_fails_only_its_batch(make_engine):
    """A forward pass that raises fails the requests of that step; queued ones and later ones are
    served with the right output, /health says degraded with the error and then ok again."""
    engine = make_engine(max_num_seqs=2)
    prompts = [[10 + i, 20 + i, 30 + i, 40 + i, 50 + i] for i in range(6)]
    expected = [o.token_ids for o in make_engine().generate(prompts, _greedy(6))]
    thread = EngineThread(engine)
    real_forward = engine.runner.forward
    calls = {"n": 0}

    def flaky_forward(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected forward fault")
        return real_forward(batch)

    engine.runner.forward = flaky_forward
    thread.start()
    try:
        handles = [thread.submit(p, _greedy(6)) for p in prompts]
        for h in handles:  # every client hears back: nobody is left waiting
            h.result()
        failed = [i for i, h in enumerate(handles) if h.finish_reason == "error"]
        assert 1 <= len(failed) <= 2, [h.finish_reason for h in handles]
        for i in failed:
            assert "engine step failed: RuntimeError: injected forward fault" in handles[i].error
        for i, h in enumerate(handles):
            if i not in failed:
                assert h.finish_reason == "length" and h.token_ids == expected[i]
        health = thread.health()
        assert health["status"] == "degraded" and "injected forward fault" in health["last_error"]
        assert health["engine_thread_alive"] and health["num_errors"] == 1
        again = thread.submit(prompts[0], _greedy(6))  # still serving, same answer as before
        assert again.result() is not None and again.token_ids == expected[0]
        thread.ERROR_WINDOW_S = 0.0  # the error is old news: ok again
        assert thread.health()["status"] == "ok"
    finally:
        thread.stop()
        engine.runner.forward = real_forward
    assert not thread.handles
    assert_drained(engine)


def test_fault_outside_the_engine_fails_open_requests_then_recovers(make_engine):
    """An exception escaping engine.step (the fault hook) fails every open request with the
    message and the loop goes on."""
    engine = make_engine()
    thread = EngineThread(engine)
    armed = {"on": True}

    def hook():
        if armed.pop("on", False):
            raise RuntimeError("injected loop fault")

    thread.fault_hook = hook
    thread.start()
    try:
        handles = [thread.submit([1 + i, 2, 3], _greedy(8)) for i in range(4)]
        for h in handles:
            h.result()
        assert all(h.finish_reason == "error" and "injected loop fault" in h.error for h in handles)
        assert thread.health()["status"] == "degraded"
        h = thread.submit([7, 8, 9], _greedy(8))
        h.result()
        assert h.finish_reason == "length" and len(h.token_ids) == 8
    finally:
        thread.stop()
    assert_drained(engine)


def test_stopping_the_thread_finishes_every_handle(make_engine):
    engine = make_engine()
    thread = EngineThread(engine)
    thread.fault_hook = lambda: time.sleep(0.02)
    thread.start()
    handles = [thread.submit([1 + i, 2, 3], _greedy(200)) for i in range(3)]
    time.sleep(0.1)
    thread.stop()
    for h in handles:
        h.result()  # returns: nobody deadlocks on a stopped engine
        assert h.finish_reason in ("error", "length")
    assert not thread.handles


# ---- memory pressure ---------------------------------------------------------------------------


def test_tiny_pool_forces_eviction_and_preemption_outputs_still_match(make_engine):
    """24 requests that need ~6x the pool: the scheduler must evict and preempt continuously,
    and every greedy answer equals the one computed alone on a roomy engine."""
    shared = list(range(100, 112))  # a shared prefix makes cached blocks to evict
    prompts = [shared + [200 + 7 * i + j for j in range(6 + i % 5)] for i in range(24)]
    alone = make_engine()
    expected = [alone.generate([p], _greedy(20))[0].token_ids for p in prompts]

    engine = make_engine(num_blocks=20, max_num_seqs=8, max_num_batched_tokens=32)  # 80 token slots
    thread = EngineThread(engine).start()
    try:
        handles = [thread.submit(p, _greedy(20)) for p in prompts]
        for h in handles:
            h.result()
    finally:
        thread.stop()
    assert [h.finish_reason for h in handles] == ["length"] * len(prompts)
    assert [h.token_ids for h in handles] == expected
    assert engine.scheduler.num_preemptions > 0, "the pool was never short: make it smaller"
    assert engine.telemetry.counters.evicted_blocks > 0
    assert_drained(engine)


# ---- the served app ------------------------------------------------------------------------------


class Served:
    def __init__(self, url: str, thread: EngineThread, app) -> None:
        self.url, self.thread, self.app = url, thread, app

    @contextmanager
    def slow_steps(self, seconds: float = 0.05):
        """Every engine step sleeps: requests stay in flight long enough to act on them."""
        self.thread.fault_hook = lambda: time.sleep(seconds)
        try:
            yield
        finally:
            self.thread.fault_hook = None

    def idle(self) -> None:
        wait_until(lambda: not self.thread.handles and not self.thread.engine.has_unfinished, what="engine idle")

    def drained(self) -> None:
        self.idle()
        self.thread.call(assert_drained)


@pytest.fixture(scope="module")
def served(tiny_loaded):
    from app import build_app

    loaded = tiny_loaded("llama")
    engine = Engine(EngineConfig(model=loaded.source_dir, device="cpu", dtype="float32", block_size=4,
                                 num_blocks=512, attention_backend="torch", max_prompt_tokens=MAX_PROMPT,
                                 max_tokens_cap=MAX_TOKENS_CAP), loaded=loaded)
    thread = EngineThread(engine).start()
    app = build_app(thread, api_key=SECRET, max_body_bytes=MAX_BODY, max_concurrent_per_client=0,
                    max_session_requests=SESSION_LIMIT)
    with serving(app, log_level="info") as url:  # info: the secret-in-logs test reads the access log
        yield Served(url, thread, app)
    thread.stop()


@pytest.fixture(scope="module")
def gradio_client(served):
    from gradio_client import Client
    return Client(served.url + "/", verbose=False)


def _complete(served: Served, **body) -> httpx.Response:
    return httpx.post(f"{served.url}/v1/completions", headers=AUTH, json={"temperature": 0, **body}, timeout=60)


def test_body_size_cap_is_413_before_parsing(served):
    big = {"prompt": "x" * MAX_BODY, "max_tokens": 2}
    r = httpx.post(f"{served.url}/v1/completions", headers=AUTH, json=big)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and f"at most {MAX_BODY} bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(8):
            yield b"x" * 1024

    r = httpx.post(f"{served.url}/v1/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=chunks())
    assert r.status_code == 413
    # not even valid JSON, and the page's routes too: refused on size alone
    r = httpx.post(f"{served.url}/gradio_api/queue/join", content=b"{" * (MAX_BODY + 1))
    assert r.status_code == 413
    r = httpx.post(f"{served.url}/gradio_api/upload", files={"files": ("a.txt", b"x" * (2 * MAX_BODY))})
    assert r.status_code == 413
    ok = _complete(served, prompt="small enough", max_tokens=2)
    assert ok.status_code == 200


def test_prompt_and_max_tokens_limits_are_400(served):
    long = _complete(served, prompt=list(range(1, MAX_PROMPT + 2)), max_tokens=2)
    assert long.status_code == 400
    err = long.json()["error"]
    assert f"at most {MAX_PROMPT} prompt tokens" in err["message"] and err["param"] == "prompt"
    over = _complete(served, prompt="hi", max_tokens=MAX_TOKENS_CAP + 1)
    assert over.status_code == 400 and over.json()["error"]["param"] == "max_tokens"
    assert f"cap of {MAX_TOKENS_CAP}" in over.json()["error"]["message"]
    unset = _complete(served, prompt="no max_tokens given", ignore_eos=True)  # the default respects the cap
    assert unset.status_code == 200 and unset.json()["usage"]["completion_tokens"] == MAX_TOKENS_CAP
    served.drained()


def test_queue_full_is_429_in_the_api_and_a_message_in_the_page(served, gradio_client):
    from gradio_client.exceptions import AppError

    saved = served.thread.call(lambda e: e.config.max_waiting)
    served.thread.call(lambda e: setattr(e.config, "max_waiting", 0))
    try:
        r = _complete(served, prompt="hi", max_tokens=2)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        with pytest.raises(AppError, match="The server is busy"):
            gradio_client.predict("hi", 4, 0.0, -1, api_name="/generate")
    finally:
        served.thread.call(lambda e: setattr(e.config, "max_waiting", saved))
    served.drained()


def test_api_concurrency_per_client(served):
    slots = served.app.state.client_slots
    slots.limit = 2

    async def run() -> tuple[list[int], int, int]:
        async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=60) as client:
            body = {"prompt": "stay a while", "max_tokens": 40, "stream": True, "ignore_eos": True}
            streams = [client.stream("POST", "/v1/completions", json=body) for _ in range(2)]
            opened = [await s.__aenter__() for s in streams]
            third = await client.post("/v1/completions", json={"prompt": "one more", "max_tokens": 2})
            for s in streams:
                await s.__aexit__(None, None, None)  # leave mid-stream: aborted, slot given back
            await asyncio.sleep(0.3)
            after = await client.post("/v1/completions", json={"prompt": "now it fits", "max_tokens": 2})
            return [o.status_code for o in opened], third, after

    try:
        with served.slow_steps():
            codes, third, after = asyncio.run(run())
    finally:
        slots.limit = 0
    assert codes == [200, 200]
    assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_concurrent_requests"
    assert third.headers["retry-after"] == "1"
    assert after.status_code == 200 and not slots.open
    served.drained()


def test_page_session_concurrency_limit(served, gradio_client):
    """One tab (Gradio session) may run SESSION_LIMIT requests; scenarios count every conversation."""
    from gradio_client.exceptions import AppError

    with served.slow_steps():
        jobs = [gradio_client.submit(f"job {i}", 60, 0.0, -1, api_name="/generate") for i in range(SESSION_LIMIT)]
        wait_until(lambda: all(j.outputs() for j in jobs), what="requests admitted")
        with pytest.raises(AppError, match=f"at most {SESSION_LIMIT} at once"):
            gradio_client.predict("one too many", 4, 0.0, -1, api_name="/generate")
        outs = gradio_client.predict(8, 0.0, 0, 1.0, -1, api_name="/scenario_shared_system")
        assert f"at most {SESSION_LIMIT} at once" in outs[-1]
        for j in jobs:
            gradio_client.predict(j.outputs()[-1][0], api_name="/abort")
        results = [j.result(timeout=30) for j in jobs]
    assert [reason for _, _, reason in results] == ["abort"] * SESSION_LIMIT
    _, text, reason = gradio_client.predict("fits again", 4, 0.0, -1, api_name="/generate")
    assert reason == "length"
    served.drained()


def test_closed_tab_aborts_its_request(served):
    """A Gradio client that disconnects mid-stream: Gradio closes the generator, whose finally
    aborts the engine request (raw queue protocol: join, read a few events, hang up)."""
    config = httpx.get(f"{served.url}/config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate")
    session = uuid.uuid4().hex[:10]
    finished_before = served.thread.call(lambda e: len(e.telemetry.finished))
    with served.slow_steps():
        join = httpx.post(f"{served.url}/gradio_api/queue/join",
                          json={"data": ["a tab that closes", 60, 0.0, -1], "fn_index": fn_index,
                                "session_hash": session, "event_data": None, "trigger_id": None})
        assert join.status_code == 200, join.text
        seen = 0
        with httpx.stream("GET", f"{served.url}/gradio_api/queue/data", params={"session_hash": session},
                          timeout=30) as resp:
            for line in resp.iter_lines():
                if '"process_generating"' in line:
                    seen += 1
                    if seen == 3:
                        break  # the tab closes
        served.idle()
    finished = served.thread.call(lambda e: [(r.finish_reason, len(r.output_token_ids))
                                             for r in list(e.telemetry.finished)[finished_before:]])
    assert finished and finished[-1][0] == "abort" and finished[-1][1] < 60, finished
    served.drained()


# ---- security ---------------------------------------------------------------------------------------


def test_model_is_fixed_at_startup(served, monkeypatch):
    """No request field can make the server load anything: other model names are 404, and the
    loader is never called."""
    import miniyaie.engine
    import miniyaie.loader

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a request tried to load a model")

    monkeypatch.setattr(miniyaie.loader, "load_model", refuse)
    monkeypatch.setattr(miniyaie.engine, "load_model", refuse)
    for model in ("/etc/passwd", "../../models/x", "Qwen/Qwen2.5-0.5B-Instruct", "gpt2", str(REPO)):
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
            r = httpx.post(f"{served.url}{path}", headers=AUTH, json={**body, "model": model, "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (model, r.text)
    r = httpx.get(f"{served.url}/v1/models/Qwen/Qwen2.5-0.5B-Instruct", headers=AUTH)
    assert r.status_code == 404
    # fields a loader might read are simply ignored: the served model answers
    r = _complete(served, prompt="hi", max_tokens=2, model_path="/etc", load_format="dummy", revision="main")
    assert r.status_code == 200 and r.json()["model"] == served.thread.engine.model_name
    assert calls == []


@pytest.mark.parametrize("path", [
    "/gradio_api/file=/etc/passwd", "/file=/etc/passwd", "/gradio_api/file=app.py", "/file=app.py",
    "/gradio_api/file=" + str(REPO / "app.py"), "/gradio_api/file=assets/../app.py",
    "/gradio_api/file=../../../../etc/passwd", "/gradio_api/file=%2Fetc%2Fpasswd",
    "/gradio_api/file=" + str(REPO / "miniyaie" / "server.py"), "/app.py", "/assets/../app.py",
    "/static/../app.py", "/gradio_api/file=~/.cache/miniyaie",
])
def test_gradio_serves_no_files(served, path):
    r = httpx.get(served.url + path)
    assert r.status_code in (400, 403, 404, 405), (path, r.status_code)
    assert "root:" not in r.text and "def build_app" not in r.text and "create_api" not in r.text


def test_api_key_protects_v1_and_is_never_echoed_or_logged(served, capfd):
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.access", "uvicorn.error", "miniyaie",
                                              "gradio", "httpx", "fastapi")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        assert httpx.get(f"{served.url}/v1/models").status_code == 401
        wrong = httpx.get(f"{served.url}/v1/models", headers={"Authorization": "Bearer " + SECRET[:-1]})
        assert wrong.status_code == 401 and SECRET[:-1] not in wrong.text
        assert httpx.get(f"{served.url}/v1/models", headers=AUTH).status_code == 200
        bodies = [httpx.get(served.url + p, headers=AUTH).text
                  for p in ("/", "/config", "/health", "/metrics", "/gradio_api/info", "/v1/models")]
        assert all(SECRET not in b for b in bodies)
        with served.slow_steps(0.0):
            served.thread.fault_hook = _raise_once()  # a traceback goes to the log too
            _complete(served, prompt="fault while logging", max_tokens=2)
        served.thread.error_time = None
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    out, err = capfd.readouterr()
    assert any("/v1/models" in r for r in records) or "/v1/models" in err + out  # the log was captured
    assert SECRET not in "\n".join(records) + out + err


def _raise_once():
    state = {"armed": True}

    def hook():
        if state.pop("armed", False):
            raise RuntimeError("injected fault (logging test)")

    return hook


def test_app_flags_and_env_build_the_limits(monkeypatch):
    from app import engine_config, parse_args

    monkeypatch.setenv("MINIYAIE_MAX_PROMPT_TOKENS", "300")
    args = parse_args(["--max-waiting", "7", "--max-tokens-cap", "99", "--max-session-requests", "5",
                       "--num-blocks", "64", "--device", "cpu"])
    config = engine_config(args)
    assert (config.max_waiting, config.max_prompt_tokens, config.max_tokens_cap) == (7, 300, 99)
    assert args.max_session_requests == 5 and args.max_body_bytes == 1 << 20
    assert args.api_max_concurrent_per_client == 0
    assert engine_config(parse_args(["--max-prompt-tokens", "0", "--device", "cpu", "--num-blocks", "8"])
                         ).max_prompt_tokens is None  # 0 = off

"""Soak test: the real app under mixed traffic for a few minutes, then proof that nothing was lost.

Starts ``python app.py`` as a child process on a free loopback port (a tiny random-weight Llama
by default, so the engine is fast and the traffic is many requests; ``--model embedded`` for the
real SmolLM2), with a KV pool far smaller than the load, and drives it from worker threads:

- OpenAI clients, chat and completions, streaming and not, greedy and sampled;
- the page through gradio_client: ``/generate`` streams and the demo's scenarios;
- clients that leave: streams closed mid-way, non-streaming calls that time out, page jobs
  cancelled or aborted through ``/abort``;
- a stream of bad requests (each kind's first answer becomes the README's table).

Then it stops by itself and checks: zero failed valid requests; a sample of greedy answers equal
to the same requests re-run alone; after clearing the cache every block free, every lock 0 and
``check_integrity()`` clean (``POST /debug/drain``, served only because this script sets
``MINIYAIE_DEBUG_ROUTES=1``); the server's RSS growth. Figures print as markdown.

    python benchmarks/soak.py                        # 150 s, tiny model
    python benchmarks/soak.py --duration 60 --model embedded
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

API_KEY = "soak-" + os.urandom(8).hex()
TOPICS = ["the sea", "mountains", "bread", "rivers", "cats", "the moon", "trains", "tea", "clocks", "bees"]
SCENARIOS = ["few_shot", "shared_system", "no_sharing", "multi_turn", "memory_pressure"]


# ---- the server ---------------------------------------------------------------------------------


def tiny_model_dir() -> str:
    """A 2-layer random-weight Llama with the SmolLM2 tokenizer (as tests/conftest.py builds)."""
    import torch
    import transformers

    from miniyaie.loader import load_model

    directory = os.path.join(tempfile.gettempdir(), "miniyaie-soak-tiny-llama")
    if os.path.exists(os.path.join(directory, "config.json")):
        return directory
    tokenizer = load_model("embedded", load_format="dummy").tokenizer
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      initializer_range=0.05, tie_word_embeddings=False)
    torch.manual_seed(1234)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- bookkeeping ---------------------------------------------------------------------------------


@dataclass
class Stats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    valid: Counter = field(default_factory=Counter)  # kind -> completed fine
    failed: list = field(default_factory=list)  # (kind, what)
    left: Counter = field(default_factory=Counter)  # deliberate aborts / disconnects, by kind
    bad: Counter = field(default_factory=Counter)  # bad input -> answered as expected
    bad_wrong: list = field(default_factory=list)
    table: dict = field(default_factory=dict)  # bad input -> (status, message)
    ttft: list = field(default_factory=list)  # API streams, seconds
    samples: list = field(default_factory=list)  # (body, text) of greedy completions under load

    def ok(self, kind: str) -> None:
        with self.lock:
            self.valid[kind] += 1

    def fail(self, kind: str, what: str) -> None:
        with self.lock:
            self.failed.append((kind, what[:300]))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


# ---- traffic ------------------------------------------------------------------------------------------


def openai_worker(url: str, stats: Stats, deadline: float, seed: int, max_tokens: int) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    rng = random.Random(seed)
    while time.time() < deadline:
        kind = rng.choice(["chat", "chat_stream", "completion", "completion_stream"])
        greedy = rng.random() < 0.5
        n_tokens = rng.randint(4, max_tokens)
        topic = rng.choice(TOPICS)
        sampling = {"temperature": 0.0} if greedy else {"temperature": 0.8, "top_p": 0.95, "seed": rng.randint(0, 99)}
        try:
            if kind.startswith("chat"):
                messages = [{"role": "system", "content": "You are brief."},
                            {"role": "user", "content": f"Tell me about {topic} ({rng.randint(0, 999)})."}]
                if kind == "chat":
                    r = client.chat.completions.create(model=_model(client), messages=messages,
                                                       max_tokens=n_tokens, **sampling)
                    assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
                else:
                    t0 = time.perf_counter()
                    first, reason = None, None
                    for chunk in client.chat.completions.create(model=_model(client), messages=messages,
                                                                max_tokens=n_tokens, stream=True, **sampling):
                        if chunk.choices and chunk.choices[0].delta.content and first is None:
                            first = time.perf_counter() - t0
                        if chunk.choices and chunk.choices[0].finish_reason:
                            reason = chunk.choices[0].finish_reason
                    assert reason in ("stop", "length"), reason
                    if first is not None:
                        with stats.lock:
                            stats.ttft.append(first)
            else:
                body = {"prompt": f"Question {rng.randint(0, 9999)}: what about {topic}?", "max_tokens": n_tokens,
                        **sampling}
                extra = {"ignore_eos": True}
                if kind == "completion":
                    r = client.completions.create(model=_model(client), extra_body=extra, **body)
                    assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
                    if greedy:
                        with stats.lock:
                            stats.samples.append((body, r.choices[0].text))
                else:
                    t0 = time.perf_counter()
                    first, reason, text = None, None, []
                    for chunk in client.completions.create(model=_model(client), stream=True, extra_body=extra, **body):
                        if chunk.choices and chunk.choices[0].text:
                            text.append(chunk.choices[0].text)
                            if first is None:
                                first = time.perf_counter() - t0
                        if chunk.choices and chunk.choices[0].finish_reason:
                            reason = chunk.choices[0].finish_reason
                    assert reason == "length", reason
                    with stats.lock:
                        if first is not None:
                            stats.ttft.append(first)
                        if greedy:
                            stats.samples.append((body, "".join(text)))
            stats.ok(f"api_{kind}")
        except Exception as err:
            stats.fail(f"api_{kind}", f"{type(err).__name__}: {err}")


_MODEL: dict[str, str] = {}


def _model(client) -> str:
    if "id" not in _MODEL:
        _MODEL["id"] = client.models.list().data[0].id
    return _MODEL["id"]


def leaver_worker(url: str, stats: Stats, deadline: float, seed: int) -> None:
    """Clients that go away: streams closed after a few chunks, non-streaming calls timing out."""
    import httpx

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        while time.time() < deadline:
            body = {"prompt": f"A long story about {rng.choice(TOPICS)} #{rng.randint(0, 9999)}",
                    "max_tokens": 64, "ignore_eos": True, "temperature": 0.7}
            try:
                if rng.random() < 0.7:
                    keep = rng.randint(1, 6)
                    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                        assert resp.status_code == 200, resp.status_code
                        seen = 0
                        for line in resp.iter_lines():
                            if line.startswith("data: {"):
                                seen += 1
                                if seen >= keep:
                                    break  # hang up mid-stream
                    stats.left["api_stream_disconnect"] += 1
                else:
                    try:
                        client.post("/v1/completions", json=body, timeout=rng.uniform(0.05, 0.3))
                        stats.ok("api_completion_fast")  # it finished before we gave up
                    except httpx.TimeoutException:
                        stats.left["api_timeout_disconnect"] += 1
            except Exception as err:
                stats.fail("api_leaver", f"{type(err).__name__}: {err}")
            time.sleep(rng.uniform(0.0, 0.2))


def page_worker(url: str, stats: Stats, deadline: float, seed: int, max_tokens: int, scenarios: bool) -> None:
    """The page through gradio_client: /generate streams (some aborted or cancelled) and scenarios."""
    from gradio_client import Client

    rng = random.Random(seed)
    client = Client(url + "/", verbose=False)
    while time.time() < deadline:
        try:
            if scenarios and rng.random() < 0.35:
                key = rng.choice(SCENARIOS)
                outs = client.predict(rng.randint(8, max_tokens), 0.7, 40, 0.95, -1, api_name=f"/scenario_{key}")
                summary = outs[-1]
                done = summary.split('id="scenario-done">')[1].split("<")[0]
                total = summary.split("</span> of ")[1].split(" ")[0]
                assert done == total and "failed" not in summary, summary[:300]
                stats.ok(f"page_scenario_{key}")
                continue
            action = rng.choice(["finish", "finish", "finish", "abort", "cancel"])
            job = client.submit(f"Page prompt {rng.randint(0, 9999)} about {rng.choice(TOPICS)}",
                                rng.randint(4, max_tokens) if action == "finish" else 64, 0.0, -1,
                                api_name="/generate")
            if action == "finish":
                rid, text, reason = job.result(timeout=120)
                assert reason in ("stop", "length"), reason
                stats.ok("page_generate")
                continue
            limit = time.time() + 60
            while not job.outputs() and time.time() < limit:
                time.sleep(0.01)
            if action == "abort":
                rid = job.outputs()[-1][0]
                client.predict(rid, api_name="/abort")
                _, _, reason = job.result(timeout=60)
                assert reason in ("abort", "length", "stop"), reason
                stats.left["page_abort"] += 1
            else:
                job.cancel()  # the generator is closed; its finally aborts the request
                stats.left["page_cancel"] += 1
        except Exception as err:
            stats.fail("page", f"{type(err).__name__}: {err}")


def bad_requests(url: str, model: str, max_prompt: int, max_body: int) -> list[tuple[str, str, str, Any, int]]:
    """(name, method, path, body or None, expected status)."""
    chat = "/v1/chat/completions"
    comp = "/v1/completions"
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("no API key", "POST-NOAUTH", comp, {"prompt": "hi"}, 401),
        ("wrong API key", "POST-WRONGAUTH", comp, {"prompt": "hi"}, 401),
        ("body is not JSON", "POST-RAW", comp, b"{not json", 400),
        (f"body over {max_body} bytes", "POST-RAW", comp, b"{" + b" " * (max_body + 10) + b"}", 413),
        ("chunked body over the cap", "POST-CHUNKED", comp, b" " * (max_body + 10), 413),
        ("chat without messages", "POST", chat, {"max_tokens": 2}, 400),
        ("empty messages list", "POST", chat, {"messages": []}, 400),
        ("image content part", "POST", chat, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}]}]}, 400),
        ("prompt is an object", "POST", comp, {"prompt": {"text": "hi"}}, 400),
        ("empty prompt", "POST", comp, {"prompt": ""}, 400),
        ("token id out of vocabulary", "POST", comp, {"prompt": [10 ** 9]}, 400),
        ("lone surrogate in text", "POST-RAW", comp, b'{"prompt": "bad \\ud800 text", "max_tokens": 2}', 400),
        (f"prompt over max_prompt_tokens ({max_prompt})", "POST", comp, {"prompt": [1] * (max_prompt + 1)}, 400),
        ("max_tokens = 0", "POST", comp, {"prompt": "hi", "max_tokens": 0}, 400),
        ("max_tokens over the cap", "POST", comp, {"prompt": "hi", "max_tokens": 100000}, 400),
        ("temperature = -1", "POST", chat, {"messages": msgs, "temperature": -1}, 400),
        ("top_p = 2", "POST", chat, {"messages": msgs, "top_p": 2}, 400),
        ("n = 0", "POST", comp, {"prompt": "hi", "n": 0}, 400),
        ("n = 1000", "POST", comp, {"prompt": "hi", "n": 1000}, 400),
        ("top_logprobs = 50", "POST", chat, {"messages": msgs, "logprobs": True, "top_logprobs": 50}, 400),
        ("stop is a number", "POST", comp, {"prompt": "hi", "stop": 5}, 400),
        ("model is a path", "POST", comp, {"prompt": "hi", "model": "/etc/passwd"}, 404),
        ("model is a hub id", "POST", chat, {"messages": msgs, "model": "Qwen/Qwen2.5-7B-Instruct"}, 404),
        ("unknown route", "POST", "/v1/embeddings", {"input": "hi"}, 404),
        ("GET on a POST route (falls through to the page)", "GET", comp, None, 404),
        ("Gradio file: /etc/passwd", "GET-NOAUTH", "/gradio_api/file=/etc/passwd", None, 403),
        ("Gradio file: app.py", "GET-NOAUTH", "/gradio_api/file=app.py", None, 403),
        ("page /generate, max_tokens 0", "PAGE", "/generate", ["hi", 0, 0.0, -1], "error"),
        ("page /generate, prompt over the limit", "PAGE", "/generate", ["word " * (max_prompt * 2), 4, 0.0, -1], "error"),
    ]


def bad_worker(url: str, stats: Stats, deadline: float, cases: list) -> None:
    import httpx
    from gradio_client import Client

    page = Client(url + "/", verbose=False)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, timeout=60) as client:
        i = 0
        while time.time() < deadline or i < len(cases):  # every kind at least once
            name, method, path, body, expected = cases[i % len(cases)]
            i += 1
            try:
                if method == "PAGE":
                    try:
                        page.predict(*body, api_name=path)
                        status, message = "200", "(accepted)"
                    except Exception as err:
                        status, message = "error", f"{type(err).__name__}: {err}"
                else:
                    headers = dict(auth)
                    if method == "POST-NOAUTH" or method == "GET-NOAUTH":
                        headers = {}
                    elif method == "POST-WRONGAUTH":
                        headers = {"Authorization": "Bearer wrong"}
                    if method.startswith("GET"):
                        r = client.get(path, headers=headers)
                    elif method == "POST-RAW":
                        r = client.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
                    elif method == "POST-CHUNKED":
                        r = client.post(path, content=iter([body[:1000], body[1000:]]),
                                        headers={**headers, "Content-Type": "application/json"})
                    else:
                        r = client.post(path, json=body, headers=headers)
                    status = str(r.status_code)
                    try:
                        message = r.json()["error"]["message"]
                    except Exception:
                        try:
                            message = json.dumps(r.json())
                        except Exception:
                            message = r.text
                ok = status == str(expected) or (expected == 403 and status in ("403", "404"))
                with stats.lock:
                    stats.table.setdefault(name, (status, message))
                    if ok:
                        stats.bad[name] += 1
                    else:
                        stats.bad_wrong.append((name, status, message[:200]))
            except Exception as err:
                with stats.lock:
                    stats.bad_wrong.append((name, "exception", f"{type(err).__name__}: {err}"))
            time.sleep(0.05)


# ---- checks after the traffic ---------------------------------------------------------------------


def check_greedy_alone(url: str, samples: list, n: int, seed: int) -> tuple[int, int, list]:
    """Re-run a sample of greedy completions one at a time; the text must be the same."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    rng = random.Random(seed)
    chosen = rng.sample(samples, min(n, len(samples)))
    mismatches = []
    for body, text in chosen:
        alone = client.completions.create(model=_model(client), extra_body={"ignore_eos": True}, **body).choices[0].text
        if alone != text:
            mismatches.append((body["prompt"], text[:60], alone[:60]))
    return len(chosen), len(chosen) - len(mismatches), mismatches


def metrics(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- main ---------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=150.0, help="seconds of traffic (default 150)")
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama, default), 'embedded', or a path")
    p.add_argument("--num-blocks", type=int, default=48, help="KV pool (x block size 16): far below the load")
    p.add_argument("--api-workers", type=int, default=6)
    p.add_argument("--page-workers", type=int, default=3)
    p.add_argument("--leavers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--greedy-sample", type=int, default=40, help="greedy answers re-run alone at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the markdown report here")
    args = p.parse_args(argv)

    model = tiny_model_dir() if args.model == "tiny" else args.model
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    max_prompt, max_body = 512, 65536
    env = {**os.environ, "MINIYAIE_DEBUG_ROUTES": "1"}
    log_path = os.path.join(tempfile.gettempdir(), f"miniyaie-soak-{port}.log")
    cmd = [sys.executable, os.path.join(REPO, "app.py"), "--host", "127.0.0.1", "--port", str(port), "--model", model,
           "--device", "cpu", "--num-blocks", str(args.num_blocks), "--max-prompt-tokens", str(max_prompt),
           "--max-tokens-cap", "64", "--max-body-bytes", str(max_body), "--api-key", API_KEY]
    print(f"[soak] starting {' '.join(c if c != API_KEY else '***' for c in cmd)}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json()["status"] == "ok":
                    break
            except Exception:
                pass
            if server.poll() is not None or time.time() > deadline:
                print(open(log_path).read()[-3000:], file=sys.stderr)
                raise SystemExit("[soak] the server did not start")
            time.sleep(0.5)
        rss_start = rss_mb(server.pid)
        before = metrics(url)
        stats = Stats()
        start = time.time()
        end = start + args.duration
        cases = bad_requests(url, model, max_prompt, max_body)
        workers = [threading.Thread(target=openai_worker, args=(url, stats, end, args.seed + i, args.max_tokens))
                   for i in range(args.api_workers)]
        workers += [threading.Thread(target=leaver_worker, args=(url, stats, end, args.seed + 100 + i))
                    for i in range(args.leavers)]
        workers += [threading.Thread(target=page_worker, args=(url, stats, end, args.seed + 200 + i, args.max_tokens,
                                                               i == 0)) for i in range(args.page_workers)]
        workers.append(threading.Thread(target=bad_worker, args=(url, stats, end, cases)))
        rss_peak = rss_start
        rss_warm = None
        for w in workers:
            w.daemon = True
            w.start()
        print(f"[soak] {len(workers)} workers for {args.duration:.0f} s against {url}", file=sys.stderr, flush=True)
        while any(w.is_alive() for w in workers):
            time.sleep(1.0)
            rss_peak = max(rss_peak, rss_mb(server.pid))
            if rss_warm is None and time.time() - start > min(20.0, args.duration / 5):
                rss_warm = rss_mb(server.pid)
            if time.time() > end + 180:
                stats.fail("soak", "workers still running 180 s after the end: a client is stuck")
                break
        traffic_s = time.time() - start
        after = metrics(url)
        # wait for the engine to be idle (aborted requests are gone within a step)
        idle_deadline = time.time() + 60
        while True:
            h = httpx.get(f"{url}/health").json()
            if (h["running"], h["waiting"]) == (0, 0) or time.time() > idle_deadline:
                break
            time.sleep(0.2)
        health = httpx.get(f"{url}/health").json()
        checked, equal, mismatches = check_greedy_alone(url, stats.samples, args.greedy_sample, args.seed)
        drain = httpx.post(f"{url}/debug/drain").json()
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()

    generated = after.get("miniyaie_generation_tokens_total", 0) - before.get("miniyaie_generation_tokens_total", 0)
    valid_total = sum(stats.valid.values())
    failed = len(stats.failed)
    bad_total = sum(stats.bad.values()) + len(stats.bad_wrong)
    blocks_ok = (drain["free_blocks"] == drain["num_blocks"] and drain["nonzero_ref_counts"] == 0
                 and drain["locked_nodes"] == 0 and drain["integrity"] == "ok")
    passed = failed == 0 and not stats.bad_wrong and not mismatches and blocks_ok and checked > 0
    lines = [
        f"## Soak: {args.duration:.0f} s, model `{args.model}`, {args.num_blocks} KV blocks x 16 tokens",
        "",
        f"Command: `python benchmarks/soak.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        "| figure | value |",
        "|---|---|",
        f"| valid requests completed | {valid_total} ({', '.join(f'{k} {v}' for k, v in sorted(stats.valid.items()))}) |",
        f"| **failed valid requests** | **{failed}** |",
        f"| clients that left on purpose | {sum(stats.left.values())} ({', '.join(f'{k} {v}' for k, v in sorted(stats.left.items()))}) |",
        f"| bad requests sent | {bad_total} ({len(cases)} kinds); answered as expected: {sum(stats.bad.values())}, "
        f"otherwise: {len(stats.bad_wrong)} |",
        f"| API errors by status (server count) | {', '.join(f'{k.split(chr(34))[1]}: {int(v)}' for k, v in sorted(after.items()) if k.startswith('miniyaie_request_errors_total'))} |",
        f"| engine finishes by reason (API choices) | {', '.join(f'{k.split(chr(34))[1]}: {int(v)}' for k, v in sorted(after.items()) if k.startswith('miniyaie_choices_finished_total'))} |",
        f"| TTFT, API streams (client side) | p50 {1000 * pct(stats.ttft, 50):.0f} ms, p99 {1000 * pct(stats.ttft, 99):.0f} ms (n={len(stats.ttft)}) |",
        f"| generated tokens/s (server, all traffic) | {generated / traffic_s:.0f} ({int(generated)} tokens in {traffic_s:.0f} s) |",
        f"| preemptions / evicted blocks | {drain['preemptions']} / {drain['evicted_blocks']} |",
        f"| greedy answers equal when re-run alone | {equal} of {checked} |",
        f"| after clearing the cache | {drain['free_blocks']} of {drain['num_blocks']} blocks free, "
        f"{drain['nonzero_ref_counts']} non-zero ref counts, {drain['locked_nodes']} locked nodes, "
        f"{drain['requests']} requests / {drain['handles']} handles left, check_integrity: {drain['integrity']} |",
        f"| health at the end | {health['status']} (errors {health['num_errors']}, steps {health['steps']}) |",
        f"| server RSS | start {rss_start:.0f} MB, after warm-up {rss_warm or rss_start:.0f} MB, end {rss_end:.0f} MB, "
        f"peak {rss_peak:.0f} MB (growth after warm-up {rss_end - (rss_warm or rss_start):+.0f} MB) |",
        f"| result | {'PASS' if passed else 'FAIL'} |",
    ]
    if stats.failed:
        lines += ["", "Failed valid requests (first 10):", ""] + [f"- {k}: {w}" for k, w in stats.failed[:10]]
    if stats.bad_wrong:
        lines += ["", "Bad requests answered unexpectedly (first 10):", ""] + [f"- {n}: {s} {m}" for n, s, m in stats.bad_wrong[:10]]
    if mismatches:
        lines += ["", "Greedy mismatches:", ""] + [f"- {m}" for m in mismatches[:10]]
    lines += ["", "### Bad inputs and what each got", "", "| input | status | message |", "|---|---|---|"]
    for name, _, _, _, _ in cases:
        status, message = stats.table.get(name, ("-", "(not sent)"))
        message = " ".join(str(message).split())
        lines.append(f"| {name} | {status} | {message[:160].replace('|', '/')} |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The demo app: pure snapshot → figure functions on synthetic snapshots (fast), and the served
app driven through ``gradio_client`` against a tiny random-weight engine on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import serving
from miniyaie.request import TokenChoice
from miniyaie.telemetry import (BlockView, EngineSnapshot, EvictedNodeView, MetricSample, MetricsView,
                                RequestView, StepView, TreeNodeView)
from ui.block_view import block_figure, block_stats, grid_shape
from ui.layout import sampling_params
from ui.live import ViewCache, build_views, engine_info_html
from ui.metrics_view import metrics_figure, metrics_html, requests_html, steps_figure
from ui.sampling_view import chosen_probability, distribution, tokens_html
from ui.scenarios import SCENARIOS, ScenarioContext
from ui.tree_view import collapse, is_shared, tidy_layout, tree_figure, tree_summary

# ---- synthetic snapshots -------------------------------------------------------------------------


def node(id, parent, text="abc", tokens=16, lock=0, hits=0, state="evictable", age=1.0):
    return TreeNodeView(id, parent, text, tokens, tuple(range(tokens // 16)), lock, hits, age, id, state)


def snapshot(tree=None, blocks=None, requests=(), steps=(), evicted=(), version=1, num_blocks=8) -> EngineSnapshot:
    tree = tree if tree is not None else (
        node(0, None, "", 0, state="root"),
        node(1, 0, "<|im_start|>system\nYou are Nimbus", 32, lock=2, hits=3, state="locked"),
        node(2, 1, "How much storage?", 16, lock=1, state="locked"),
        node(3, 1, "Is my data <b>encrypted</b>?", 16, state="new"),
    )
    blocks = blocks if blocks is not None else (
        BlockView(0, "shared", 3, ("req-1", "req-2"), True, (0, 16)),
        BlockView(1, "shared", 3, ("req-1", "req-2"), True, (16, 32)),
        BlockView(2, "request", 1, ("req-1",), False, (32, 37)),
        BlockView(3, "cache", 1, (), True, None),
        *(BlockView(i, "free", 0, (), False, None) for i in range(4, num_blocks)),
    )
    metrics = MetricsView(12.5, 300.0, 0.2, 0.15, 0.75, 0.5, 2, 1, 3, 100, 512, 480, 200, 0, 4)
    history = tuple(MetricSample(100.0 + i, 10.0 + i, 0.1 * i, i, 1, 0.5) for i in range(5))
    return EngineSnapshot(version, 105.0, "tiny", "cpu", "float32", 16, num_blocks,
                          sum(b.state == "free" for b in blocks), True, "lpm", tuple(tree), 0, tuple(evicted),
                          tuple(blocks), tuple(requests), tuple(steps), metrics, history, None)


def test_importing_the_ui_turns_off_gradios_stub_writer():
    """Gradio rewrites its components' type stubs on every import (~2-3 s of a ~10 s start-up here);
    importing ``ui`` first swaps that for a no-op, and components still build."""
    code = ("import ui, gradio as gr, gradio.component_meta as meta\n"
            "assert meta.create_or_modify_pyi.__name__ == '_no_stub', meta.create_or_modify_pyi\n"
            "with gr.Blocks():\n"
            "    box = gr.Textbox(label='prompt')\n"
            "assert box.label == 'prompt' and callable(box.change)\n")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True, timeout=120)


def test_stub_writer_hook_stays_out_once_gradio_is_imported(monkeypatch):
    import gradio  # noqa: F401  (imported by this module's ui imports already)

    from ui.gradio_import import _StubWriterSkipper, skip_stub_writer
    without_hook = [f for f in sys.meta_path if not isinstance(f, _StubWriterSkipper)]
    monkeypatch.setattr(sys, "meta_path", list(without_hook))
    skip_stub_writer()
    assert sys.meta_path == without_hook  # too late to matter: nothing installed


def test_tidy_layout_is_a_stable_tree():
    edges = [(0, 1), (1, 2), (1, 3), (0, 4)]
    pos = tidy_layout(edges, 0)
    assert pos == tidy_layout(list(reversed(edges)), 0)  # shape and ids decide, not input order
    assert [pos[i][0] for i in range(5)] == [0, 1, 2, 2, 1]  # x = depth
    assert pos[2][1] > pos[3][1] > pos[4][1]  # leaves in id order, top to bottom
    assert pos[1][1] == (pos[2][1] + pos[3][1]) / 2  # a parent sits between its children
    # adding a new leaf under the last branch does not move the older nodes
    grown = tidy_layout(edges + [(4, 5)], 0)
    assert all(grown[i] == pos[i] for i in (1, 2, 3))


def test_tree_figure_marks_shared_nodes_and_escapes_text():
    snap = snapshot(evicted=(EvictedNodeView(9, 1, "old branch", 16, 1.0),))
    fig = tree_figure(snap)
    names = [t.get("name") for t in fig["data"]]
    assert "shared by ≥2 requests (1)" in names
    assert "locked by running requests (2)" in names and "evicted (1)" in names
    hover = " ".join(h for t in fig["data"] for h in t.get("text", []) if isinstance(h, str))
    assert "&lt;b&gt;encrypted" in hover  # user text never becomes markup in the hover
    json.dumps(fig)  # plain data, ready for the browser
    assert tree_summary(snap)["shared"] == 1 and is_shared(snap.tree[1]) and not is_shared(snap.tree[2])


def test_empty_tree_explains_itself():
    fig = tree_figure(snapshot(tree=(node(0, None, "", 0, state="root"),)))
    assert "empty" in fig["layout"]["annotations"][0]["text"]


def test_big_trees_collapse():
    tree = [node(0, None, "", 0, state="root")] + [node(i, 0, f"branch {i}", age=float(i)) for i in range(1, 41)]
    kept, folded = collapse(tree, max_nodes=100, max_children=8)
    assert len(kept) == 9 and folded[0].count == 32
    assert {n.id for n in kept[1:]} == set(range(1, 9))  # the most recently used stay
    fig = tree_figure(snapshot(tree=tuple(tree)))
    assert any("collapsed siblings (32)" == t.get("name") for t in fig["data"])


def test_block_map_colours_and_stats():
    snap = snapshot(num_blocks=40)
    fig = block_figure(snap)
    cols, rows = grid_shape(40)
    heat = fig["data"][0]
    assert len(heat["z"]) == rows and len(heat["z"][0]) == cols
    assert heat["text"][0][0] == "3"  # shared blocks show their reference count
    assert "req-1" in heat["hovertext"][0][2] and "tokens 32–36" in heat["hovertext"][0][2]
    assert heat["z"][rows - 1][cols - 1] is None  # cells past the pool stay blank
    s = block_stats(snap)
    assert (s.shared, s.request, s.cache, s.free) == (2, 1, 1, 36)
    assert s.wasted_slots == 11 and s.fragmentation == pytest.approx(11 / 16)


def test_steps_and_metrics_figures():
    steps = (StepView(1, 0.0, 0.01, (("req-1", 32), ("req-2", 16)), (), ()),
             StepView(2, 0.1, 0.01, (), ("req-1", "req-2"), ()))
    fig = steps_figure(snapshot(steps=steps))
    per_req = {t["name"]: t for t in fig["data"] if t["name"].startswith("req-")}
    assert per_req["req-1"]["x"] == [1, 2] and per_req["req-1"]["marker"]["pattern"]["shape"] == ["/", ""]
    assert "prefill chunk of 32 tokens" in per_req["req-1"]["hovertext"][0]
    m = metrics_figure(snapshot())
    assert [t["name"] for t in m["data"]] == ["tokens/s", "running", "waiting", "KV usage %"]
    json.dumps(fig), json.dumps(m)


def test_panels_say_what_the_cache_saved():
    reqs = (RequestView("req-1", "running", 512, 10, 480, 490, 31, 64, 0.1, None, 0),)
    assert "cached 480 of 512 prompt tokens" in requests_html(snapshot(requests=reqs))
    cards = metrics_html(snapshot())
    assert 'id="m-hit"' in cards and "75%" in cards and "480 of 512" in cards


def test_crash_shows_on_page():
    html = engine_info_html(snapshot(), {"status": "degraded", "last_error": "RuntimeError: boom",
                                         "engine_thread_alive": True})
    assert 'id="engine-error"' in html and "boom" in html
    stopped = engine_info_html(snapshot(), {"status": "stopped", "last_error": None, "engine_thread_alive": False})
    assert "engine thread stopped" in stopped
    # an old error after the engine recovered ("ok") is no longer shouted about
    assert "engine-error" not in engine_info_html(snapshot(), {"status": "ok", "last_error": "old"})


def test_tokens_html_shows_distributions():
    choices = [TokenChoice(5, "Hi", -0.1, [(5, "Hi", 0.9), (6, "<b>", 0.05)]),
               TokenChoice(7, " there", -3.0, [(8, " you", 0.6), (9, " all", 0.3)])]
    html = tokens_html(choices)
    assert html.count('class="tok"') == 2 and "&lt;b&gt;" in html and "<b>" not in html
    assert chosen_probability(choices[0]) == 0.9
    rows = distribution(choices[1])  # sampled from outside the top-k: appended and marked
    assert rows[-1]["c"] and rows[-1]["t"] == " there" and rows[-1]["p"] == pytest.approx(0.0498, abs=1e-3)


def test_view_cache_builds_once_per_version():
    snaps = [snapshot(version=1)]
    cache = ViewCache(lambda: snaps[-1], lambda: {"status": "ok", "error": None})
    first = cache.get()
    assert cache.get() is first and cache.builds == 1
    snaps.append(snapshot(version=2))
    assert cache.get().version == 2 and cache.builds == 2
    assert json.loads(first.tree.plot)["data"]  # serialized once, shared by every viewer


def test_controls_and_scenarios():
    p = sampling_params(32, 0.0, 0, 1.0, -1)
    assert p.top_k == -1 and p.seed is None and p.greedy
    with pytest.raises(ValueError, match="top_p"):
        sampling_params(32, 1.0, 0, 0.0, 1)
    ctx = ScenarioContext(num_blocks=64, block_size=16, max_tokens=32, seed=1)
    for s in SCENARIOS:
        assert s.build(ctx), s.key
    shared = next(s for s in SCENARIOS if s.key == "shared_system").build(ctx)
    assert len(shared) == 16 and len({c.system for c in shared}) == 1


def test_build_views_for_a_large_pool():
    """Every view builds from one snapshot of a 512-block pool (its cost is measured in
    benchmarks/ui_overhead.py, not here)."""
    snap = snapshot(num_blocks=512)
    views = build_views(snap, {"status": "ok"})
    assert views.version == snap.version


# ---- the served app ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny_loaded):
    """(url, engine_thread): the real app (page + API) on a free local port, over a tiny engine."""
    from app import build_app
    from miniyaie import Engine, EngineConfig
    from miniyaie.engine_thread import EngineThread

    loaded = tiny_loaded("llama")
    engine = Engine(EngineConfig(model=loaded.source_dir, device="cpu", dtype="float32", block_size=4,
                                 num_blocks=512, attention_backend="torch"), loaded=loaded)
    engine_thread = EngineThread(engine).start()
    with serving(build_app(engine_thread, api_key="")) as url:
        yield url + "/", engine_thread
    engine_thread.stop()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client
    return Client(served[0], verbose=False)


def _wait_idle(engine_thread, timeout=30.0) -> None:
    deadline = time.time() + timeout
    while engine_thread.health()["running"] or engine_thread.health()["waiting"]:
        assert time.time() < deadline
        time.sleep(0.05)


def test_health_and_page(served):
    import httpx
    url, _ = served
    health = httpx.get(url + "health").json()
    assert health["status"] == "ok" and health["engine_thread_alive"]
    page = httpx.get(url)
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_concurrent_prompts_stream_and_batch(served, client):
    url, engine_thread = served
    jobs = [client.submit(f"Prompt number {i}: tell me a story", 24, 0.0, -1, api_name="/generate") for i in range(8)]
    results = [job.result(timeout=120) for job in jobs]
    ids = {rid for rid, _, _ in results}
    assert len(ids) == 8
    for job, (rid, text, reason) in zip(jobs, results):
        assert reason in ("length", "stop") and text
        assert len(job.outputs()) >= 3, "text should arrive in several streamed pieces"
    # batched: some engine step ran many of these requests together
    steps = engine_thread.snapshot().steps
    best = max(len(ids & ({r for r, _ in s.prefill} | set(s.decode))) for s in steps)
    assert best >= 4, f"at most {best} of the 8 requests shared a step"
    _wait_idle(engine_thread)
    engine_thread.call(lambda e: e.check_integrity())


def test_abort_stops_and_frees_blocks(served, client):
    _, engine_thread = served
    job = client.submit("Write a very long essay about everything", 400, 0.8, 3, api_name="/generate")
    deadline = time.time() + 60
    while True:
        outs = job.outputs()
        if outs and outs[-1][1]:
            break
        assert time.time() < deadline and not job.done()
        time.sleep(0.05)
    rid = outs[-1][0]
    assert any(rid in b.owners for b in engine_thread.snapshot().blocks)
    client.predict(rid, api_name="/abort")
    rid_out, text, reason = job.result(timeout=30)
    assert reason == "abort" and len(text) < 400 * 8
    _wait_idle(engine_thread)
    snap = engine_thread.snapshot()
    assert not any(rid in b.owners for b in snap.blocks), "aborted request still holds blocks"
    engine_thread.call(lambda e: e.check_integrity())


def test_shared_system_prompt_scenario(served, client):
    _, engine_thread = served
    engine_thread.call(lambda e: e.clear_cache())
    outs = client.predict(8, 0.0, 0, 1.0, -1, api_name="/scenario_shared_system")
    assert 'id="scenario-done">16</span> of 16 conversations done' in outs[-1]
    _wait_idle(engine_thread)
    snap = engine_thread.snapshot()
    assert tree_summary(snap)["shared"] >= 1
    assert snap.metrics.cached_tokens > 0
    engine_thread.call(lambda e: e.check_integrity())


def test_engine_crash_reported(served, client):
    import httpx
    url, engine_thread = served
    state = {"armed": True}

    def boom():
        if state.pop("armed", False):
            raise RuntimeError("injected fault")

    engine_thread.fault_hook = boom
    try:
        _, _, reason = client.predict("hello", 8, 0.0, -1, api_name="/generate")
        assert reason == "error"
        health = httpx.get(url + "health").json()
        assert health["status"] != "ok" and "injected fault" in json.dumps(health)
        assert "engine-error" in build_views(engine_thread.snapshot(), engine_thread.health()).engine_info
        # and it keeps serving
        _, text, reason = client.predict("hello again", 4, 0.0, -1, api_name="/generate")
        assert reason in ("length", "stop")
    finally:
        engine_thread.fault_hook = None
        engine_thread.error = None  # later tests start from a healthy engine
        if hasattr(engine_thread, "error_time"):
            engine_thread.error_time = None

"""The page: prompt lanes, scenarios and controls on the left; the engine's insides on the right.

Every handler that sends requests is async and allows unlimited concurrency, so requests from
many lanes, tabs and users reach the engine together and are batched into the same steps
(Gradio's default of one running event per handler would serialize them).
"""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from html import escape
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import gradio as gr

from miniyaie.engine_thread import EngineThread
from miniyaie.request import SamplingParams
from ui.lanes import EMPTY_LANE, lane_html, scenario_summary_html
from ui.live import ViewCache
from ui.runs import NUM_LANES, ConversationRun, Session, Sessions, friendly_error
from ui.sampling_view import probability_legend_html
from ui.scenarios import SCENARIOS, SCENARIOS_BY_KEY, Conversation, ScenarioContext

ASSETS = Path(__file__).resolve().parent.parent / "assets"
CSS_PATH = ASSETS / "style.css"
JS_PATH = ASSETS / "app.js"
POLL_SECONDS = 0.2  # lanes re-render at most 5 times a second
REFRESH_SECONDS = 0.5  # live views: 2 refreshes a second, skipped when nothing changed
HEARTBEAT_SECONDS = 1.0  # a stream yields at least this often: Gradio notices a closed tab only at a yield
MAX_SESSION_REQUESTS = 32  # requests one tab may run at once (a scenario's conversations count)

DEFAULT_PROMPTS = (
    "Write a short poem about a robot learning to paint.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for a good night's sleep.",
    "What is a radix tree? Answer briefly.",
)

TREE_HELP = """**Radix tree (prefix cache).** Each node is a run of prompt tokens whose keys and values are
cached in KV blocks; the edge label is their text. A request whose prompt starts like an earlier one
walks down the tree and reuses those blocks instead of recomputing them. A node is **shared** (heavy
outline) when more than one request used it — that is the saving. Colours: green just inserted, amber
hit, orange locked by running requests (cannot be evicted), blue cached and evictable, grey crosses
evicted (least recently used first)."""
BLOCK_HELP = """**KV block map.** The KV cache is a pool of fixed-size *blocks* (a few tokens' keys and values
in every layer). A request holds a table of blocks instead of one long buffer, so memory is handed out
in small pieces and never needs to be contiguous. Each cell is a block: one colour per running request,
**orange with a number = shared** by that many holders (e.g. a system prompt used by 16 requests),
light blue = kept only by the prefix cache, grey = free."""
SCHED_HELP = """**Scheduler.** Each bar is one engine step (one forward pass); each segment a request in it.
Hatched = a prefill chunk of its prompt, solid = decoding one token. Continuous batching: requests join
and leave between steps, and prompts are prefilled in chunks alongside running decodes."""


TOP_ALTERNATIVES = 5  # candidates shown per token in the distribution view


def sampling_params(max_tokens: float, temperature: float, top_k: float, top_p: float, seed: Optional[float],
                    stop: tuple[str, ...] = ()) -> SamplingParams:
    """Controls → SamplingParams (top-k 0 and seed -1/blank mean off)."""
    seed_value = None if seed is None or int(seed) < 0 else int(seed)
    return SamplingParams(max_tokens=int(max_tokens), temperature=float(temperature),
                          top_k=int(top_k) if int(top_k) > 0 else -1, top_p=float(top_p), seed=seed_value,
                          stop=list(stop), logprobs=TOP_ALTERNATIVES)


def _content_text(content: Any) -> str:
    """Chatbot message content as plain text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


class DemoUI:
    """Builds the Blocks page for one EngineThread and holds what its handlers share."""

    def __init__(self, engine_thread: EngineThread, max_session_requests: int = MAX_SESSION_REQUESTS) -> None:
        self.engine_thread = engine_thread
        self.max_session_requests = max_session_requests
        self.views = ViewCache(engine_thread.snapshot, engine_thread.health)
        self.sessions = Sessions()
        self.eos_ids: set[int] = set(getattr(engine_thread.engine, "eos_token_ids", set()))

    # ---- streaming lanes ----------------------------------------------------------------------

    def _session(self, request: Optional[gr.Request]) -> Session:
        key = getattr(request, "session_hash", None) or "anonymous"
        return self.sessions.get(key)

    async def _submit(self, prompt, params: SamplingParams):
        """Submit from a worker thread (a submit waits up to one engine step). If this event is
        cancelled meanwhile (tab closed), the request is aborted as soon as it exists."""
        submitting = asyncio.ensure_future(asyncio.to_thread(
            self.engine_thread.submit, prompt, params, asyncio.get_running_loop()))
        try:
            return await asyncio.shield(submitting)
        except asyncio.CancelledError:
            def abort(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    asyncio.get_running_loop().run_in_executor(None, done.result().abort)
            submitting.add_done_callback(abort)
            raise

    async def _watch(self, session: Session, owned: dict[int, ConversationRun],
                     summary: Optional[tuple[str, list[ConversationRun]]] = None) -> AsyncIterator[tuple]:
        """Yield (lane 0..3 html, [summary]) until every owned run finished; a lane taken over by a
        newer run is left alone (gr.skip)."""
        last: dict[int, str] = {}
        last_summary = None
        last_yield = time.monotonic()
        while True:
            finished = all(run.finished for run in owned.values()) and (
                summary is None or all(r.finished for r in summary[1]))
            outs: list[Any] = []
            changed = False
            for i in range(NUM_LANES):
                run = owned.get(i)
                if run is None or session.lanes[i] is not run:
                    outs.append(gr.skip())
                    continue
                html = lane_html(run, self.eos_ids)
                if html != last.get(i):
                    last[i] = html
                    changed = True
                    outs.append(html)
                else:
                    outs.append(gr.skip())
            if summary is not None:
                html = scenario_summary_html(*summary)
                changed |= html != last_summary
                outs.append(html if html != last_summary else gr.skip())
                last_summary = html
            # yield now and then even when nothing changed (all skips): only at a yield does Gradio
            # find out that the tab is gone and close this generator (whose finally aborts)
            if changed or finished or time.monotonic() - last_yield >= HEARTBEAT_SECONDS:
                last_yield = time.monotonic()
                yield tuple(outs)
            if finished:
                return
            await asyncio.sleep(POLL_SECONDS)

    async def run_lane(self, lane: int, prompt: str, max_tokens, temperature, top_k, top_p, seed,
                       request: gr.Request) -> AsyncIterator[str]:
        session = self._session(request)
        if not prompt or not prompt.strip():
            yield '<div class="lane-error">Type a prompt first.</div>'
            return
        try:
            params = sampling_params(max_tokens, temperature, top_k, top_p, seed)
        except ValueError as err:
            yield f'<div class="lane-error">{err}</div>'
            return
        old = session.lanes[lane]
        if old is not None:
            old.stop()
        refused = session.refuse(1, self.max_session_requests)
        if refused:
            yield f'<div class="lane-error">{escape(refused)}</div>'
            return
        run = ConversationRun(self.engine_thread, Conversation(f"lane {lane + 1}", (prompt,)), params).start()
        session.lanes[lane] = run
        try:
            async with aclosing(self._watch(session, {lane: run})) as updates:
                async for outs in updates:
                    yield outs[lane]  # html, or gr.skip() (a heartbeat)
        finally:
            if not run.finished:  # page closed or event cancelled: free the blocks
                run.stop()

    def stop_lane(self, lane: int, request: gr.Request) -> None:
        run = self._session(request).lanes[lane]
        if run is not None:
            run.stop()

    async def run_scenario(self, key: str, max_tokens, temperature, top_k, top_p, seed,
                           request: gr.Request) -> AsyncIterator[tuple]:
        scenario = SCENARIOS_BY_KEY[key]
        session = self._session(request)
        session.stop_all()
        snap = self.engine_thread.snapshot()
        ctx = ScenarioContext(snap.num_blocks, snap.block_size, int(max_tokens), seed=int(time.time() * 1000) % 100000)
        try:
            params = sampling_params(scenario.max_tokens or max_tokens, temperature, top_k, top_p, seed, scenario.stop)
        except ValueError as err:
            yield tuple([gr.skip()] * NUM_LANES + [f'<div class="lane-error">{err}</div>'])
            return
        conversations = scenario.build(ctx)
        refused = session.refuse(len(conversations), self.max_session_requests)
        if refused:
            yield tuple([gr.skip()] * NUM_LANES + [f'<div class="lane-error">{escape(refused)}</div>'])
            return
        runs = [ConversationRun(self.engine_thread, conv, params) for conv in conversations]
        session.scenario = runs
        for i in range(NUM_LANES):
            session.lanes[i] = runs[i] if i < len(runs) else None
        for run in runs:  # all at once: that is the point
            run.start()
        owned = {i: runs[i] for i in range(min(NUM_LANES, len(runs)))}
        try:
            async with aclosing(self._watch(session, owned, (scenario.title, runs))) as updates:
                async for outs in updates:
                    yield outs
        finally:
            if not all(r.finished for r in runs):
                for run in runs:
                    run.stop()

    def stop_all(self, request: gr.Request) -> None:
        self._session(request).stop_all()

    # ---- chat -----------------------------------------------------------------------------------

    async def chat(self, message: str, history: list, max_tokens, temperature, top_k, top_p, seed,
                   request: gr.Request = None) -> AsyncIterator[tuple[str, list]]:
        if not message or not message.strip():
            yield "", history
            return
        session = self._session(request)
        messages = [{"role": m["role"], "content": _content_text(m["content"])} for m in history or []]
        messages.append({"role": "user", "content": message})
        history = [*messages, {"role": "assistant", "content": "…"}]
        yield "", history
        refused = session.refuse(1, self.max_session_requests)
        if refused:
            history[-1] = {"role": "assistant", "content": f"⚠️ {refused}"}
            yield "", history
            return
        session.other += 1
        handle = None
        try:
            try:
                params = sampling_params(max_tokens, temperature, top_k, top_p, seed)
                handle = await self._submit(messages, params)
            except Exception as err:
                history[-1] = {"role": "assistant", "content": f"⚠️ {friendly_error(err)}"}
                yield "", history
                return
            async for _ in handle:
                history[-1] = {"role": "assistant", "content": handle.text}
                yield "", history
            note = f"\n\n*cached {handle.cached_tokens} of {handle.prompt_tokens} prompt tokens*"
            if handle.error:
                note = f"\n\n⚠️ {handle.error}"
            history[-1] = {"role": "assistant", "content": handle.text + note}
            yield "", history
        finally:
            session.other -= 1
            if handle is not None and handle.finish_reason is None:  # tab closed or event cancelled
                handle.abort()

    # ---- engine controls and live views -----------------------------------------------------------

    def set_prefix_cache(self, enabled: bool) -> None:
        self.engine_thread.call(lambda e: e.set_options(enable_prefix_cache=bool(enabled)))
        gr.Info(f"Prefix caching {'on' if enabled else 'off (cache cleared)'}")

    def set_policy(self, policy: str) -> None:
        self.engine_thread.call(lambda e: e.set_options(schedule_policy=policy))
        gr.Info(f"Scheduling policy: {policy}")

    def clear_cache(self) -> None:
        freed = self.engine_thread.call(lambda e: e.clear_cache())
        gr.Info(f"Prefix cache cleared: {freed} blocks freed (blocks of running requests stay).")

    def refresh(self, seen_version: Optional[int]) -> tuple:
        """Timer tick: the shared views for the newest snapshot, or nothing if this tab has them."""
        views = self.views.get()
        marker = (views.version, views.engine_info)
        if seen_version is not None and seen_version == hash(marker):
            return tuple([gr.skip()] * 10)
        return (views.engine_info, views.tree, views.tree_info, views.blocks, views.blocks_info, views.steps,
                views.metrics, views.cards, views.requests, hash(marker))

    # ---- API endpoints for scripts and tests (gradio_client) ------------------------------------

    async def api_generate(self, prompt: str, max_tokens: float, temperature: float, seed: float,
                           request: gr.Request = None) -> AsyncIterator[tuple[str, str, str]]:
        """Stream (request id, text so far, finish reason or ""). Refusals raise gr.Error with the
        reason (gradio_client raises it as AppError)."""
        session = self._session(request)
        refused = session.refuse(1, self.max_session_requests)
        if refused:
            raise gr.Error(refused, print_exception=False)
        session.other += 1
        handle = None
        try:
            try:
                params = sampling_params(max_tokens, temperature, 0, 1.0, seed)
                handle = await self._submit(prompt, params)
            except Exception as err:
                raise gr.Error(friendly_error(err), print_exception=False) from None
            yield handle.request_id, "", ""
            async for _ in handle:
                yield handle.request_id, handle.text, handle.finish_reason or ""
        finally:
            session.other -= 1
            if handle is not None and handle.finish_reason is None:  # client gone or cancelled
                handle.abort()

    def api_abort(self, request_id: str) -> str:
        self.engine_thread.abort(request_id)
        return request_id

    # ---- the page ---------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        snap = self.engine_thread.snapshot()
        with gr.Blocks(title="Mini-YAIE · live inference engine") as demo:
            engine_info = gr.HTML(elem_id="engine-info-box")
            gr.HTML('<div class="page-head"><h1>Mini-YAIE <span>live</span></h1><p>A small SGLang-style '
                    'inference engine running for real: radix-tree prefix cache, paged KV blocks, continuous '
                    'batching. Send several prompts at once and watch its insides on the right.</p></div>')
            with gr.Row(equal_height=False, elem_classes="main-row"):
                with gr.Column(scale=5, min_width=420, elem_classes="left-col"):
                    controls = self._build_controls()
                    lanes_out = self._build_lanes(controls)
                    self._build_chat(controls)
                with gr.Column(scale=6, min_width=520, elem_classes="right-col"):
                    views = self._build_views(snap)
            self._wire_scenarios(controls, lanes_out)
            seen = gr.State(None)
            outputs = [engine_info, *views, seen]
            timer = gr.Timer(REFRESH_SECONDS)
            timer.tick(self.refresh, inputs=seen, outputs=outputs, show_progress="hidden",
                       api_visibility="undocumented", concurrency_limit=None)
            demo.load(self.refresh, inputs=seen, outputs=outputs, show_progress="hidden",
                      api_visibility="undocumented")
            self._build_api()
        return demo

    def _build_controls(self) -> dict:
        c: dict = {}
        with gr.Group(elem_classes="panel"):
            gr.HTML('<div class="panel-title">Scenarios <span>— many real requests at once</span></div>')
            with gr.Row(elem_classes="scenario-row"):
                c["scenario_buttons"] = [gr.Button(s.title, size="sm", elem_id=f"scenario-{s.key}",
                                                   elem_classes="scenario-btn") for s in SCENARIOS]
            c["summary"] = gr.HTML('<div class="muted">' + "<br>".join(
                f"<b>{s.title}</b>: {s.explains}" for s in SCENARIOS[:1]) + "</div>", elem_id="scenario-box")
            c["stop_all"] = gr.Button("Stop all", size="sm", variant="stop", elem_id="stop-all")
        with gr.Accordion("Sampling", open=True, elem_classes="panel"):
            with gr.Row():
                c["temperature"] = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature", info="0 = greedy")
                c["top_k"] = gr.Slider(0, 100, value=40, step=1, label="top-k", info="0 = off")
                c["top_p"] = gr.Slider(0.05, 1, value=0.95, step=0.05, label="top-p")
            with gr.Row():
                cap = self.engine_thread.engine.config.max_tokens_cap or 512
                c["max_tokens"] = gr.Slider(1, min(512, cap), value=min(48, cap), step=1, label="max tokens")
                c["seed"] = gr.Number(value=-1, precision=0, label="seed", info="-1 = random")
        c["params"] = [c["max_tokens"], c["temperature"], c["top_k"], c["top_p"], c["seed"]]
        return c

    def _build_lanes(self, c: dict) -> list[gr.HTML]:
        gr.HTML(probability_legend_html())
        outs = []
        for i in range(NUM_LANES):
            with gr.Group(elem_classes="lane"):
                with gr.Row(elem_classes="lane-row"):
                    prompt = gr.Textbox(value=DEFAULT_PROMPTS[i], show_label=False, lines=1, max_lines=4, scale=6,
                                        elem_id=f"lane-{i}-prompt", container=False)
                    run = gr.Button("Run", variant="primary", size="sm", scale=0, min_width=60, elem_id=f"lane-{i}-run")
                    stop = gr.Button("Stop", size="sm", scale=0, min_width=60, elem_id=f"lane-{i}-stop")
                out = gr.HTML(EMPTY_LANE, elem_id=f"lane-{i}", elem_classes="lane-out")
            go, halt = self._lane_handlers(i)
            for trigger in (run.click, prompt.submit):
                trigger(go, inputs=[prompt, *c["params"]], outputs=out, concurrency_limit=None,
                        show_progress="hidden", api_visibility="undocumented")
            stop.click(halt, inputs=None, outputs=None, concurrency_limit=None, api_visibility="undocumented")
            outs.append(out)
        return outs

    def _lane_handlers(self, lane: int):
        """Handlers bound to one lane (explicit parameters: Gradio maps inputs by position)."""
        async def go(prompt, max_tokens, temperature, top_k, top_p, seed, request: gr.Request):
            # aclosing: when Gradio closes this generator (tab gone), run_lane's finally runs now
            async with aclosing(self.run_lane(lane, prompt, max_tokens, temperature, top_k, top_p, seed,
                                              request)) as updates:
                async for html in updates:
                    yield html

        def halt(request: gr.Request) -> None:
            self.stop_lane(lane, request)

        return go, halt

    def _scenario_handler(self, key: str):
        async def fire(max_tokens, temperature, top_k, top_p, seed, request: gr.Request):
            async with aclosing(self.run_scenario(key, max_tokens, temperature, top_k, top_p, seed,
                                                  request)) as updates:
                async for outs in updates:
                    yield outs

        return fire

    def _build_chat(self, c: dict) -> None:
        with gr.Accordion("Chat (multi-turn: each turn reuses the cached conversation)", open=False,
                          elem_classes="panel"):
            chatbot = gr.Chatbot(height=320, show_label=False, elem_id="chatbot")
            with gr.Row():
                box = gr.Textbox(placeholder="Say something…", show_label=False, scale=6, container=False)
                send = gr.Button("Send", variant="primary", scale=0, min_width=70)
            for trigger in (send.click, box.submit):
                trigger(self.chat, inputs=[box, chatbot, *c["params"]], outputs=[box, chatbot],
                        concurrency_limit=None, show_progress="hidden", api_visibility="undocumented")

    def _wire_scenarios(self, c: dict, lanes_out: list[gr.HTML]) -> None:
        for button, scenario in zip(c["scenario_buttons"], SCENARIOS):
            fire = self._scenario_handler(scenario.key)
            button.click(fire, inputs=c["params"], outputs=[*lanes_out, c["summary"]], concurrency_limit=None,
                         show_progress="hidden", api_name=f"scenario_{scenario.key}")
        c["stop_all"].click(self.stop_all, inputs=None, outputs=None, concurrency_limit=None,
                            api_visibility="undocumented")

    def _build_views(self, snap) -> list:
        with gr.Group(elem_classes="panel"):
            with gr.Row(elem_classes="engine-controls"):
                prefix = gr.Checkbox(value=snap.enable_prefix_cache, label="prefix caching", elem_id="opt-prefix",
                                     scale=1)
                policy = gr.Radio(["lpm", "fcfs"], value=snap.schedule_policy, label="scheduling policy",
                                  info="lpm: longest cached prefix first", scale=2, elem_id="opt-policy")
                clear = gr.Button("Clear prefix cache", size="sm", scale=1, elem_id="clear-cache")
            prefix.change(self.set_prefix_cache, inputs=prefix, outputs=None, api_visibility="undocumented")
            policy.change(self.set_policy, inputs=policy, outputs=None, api_visibility="undocumented")
            clear.click(self.clear_cache, inputs=None, outputs=None, api_visibility="undocumented")
        with gr.Group(elem_classes="panel view"):
            gr.Markdown(TREE_HELP, elem_classes="help")
            tree_info = gr.HTML(elem_id="tree-info")
            tree = gr.Plot(show_label=False, elem_id="tree-plot")
        with gr.Group(elem_classes="panel view"):
            gr.Markdown(BLOCK_HELP, elem_classes="help")
            blocks_info = gr.HTML(elem_id="blocks-info")
            blocks = gr.Plot(show_label=False, elem_id="block-plot")
        with gr.Group(elem_classes="panel view"):
            gr.Markdown(SCHED_HELP, elem_classes="help")
            steps = gr.Plot(show_label=False, elem_id="steps-plot")
        with gr.Group(elem_classes="panel view"):
            cards = gr.HTML(elem_id="metric-cards")
            metrics = gr.Plot(show_label=False, elem_id="metrics-plot")
            requests = gr.HTML(elem_id="requests-table")
        return [tree, tree_info, blocks, blocks_info, steps, metrics, cards, requests]

    def _build_api(self) -> None:
        """Hidden components backing two API endpoints: /generate (streams) and /abort."""
        with gr.Row(visible=False):
            prompt = gr.Textbox()
            max_tokens = gr.Number(value=32)
            temperature = gr.Number(value=0.0)
            seed = gr.Number(value=-1)
            rid = gr.Textbox()
            text = gr.Textbox()
            reason = gr.Textbox()
            go = gr.Button()
            abort = gr.Button()
        go.click(self.api_generate, inputs=[prompt, max_tokens, temperature, seed], outputs=[rid, text, reason],
                 api_name="generate", concurrency_limit=None)
        abort.click(self.api_abort, inputs=rid, outputs=rid, api_name="abort", concurrency_limit=None)


def build_ui(engine_thread: EngineThread, max_session_requests: int = MAX_SESSION_REQUESTS) -> gr.Blocks:
    """The Blocks page for an engine thread (mount it with ``css_paths=CSS_PATH, js=page_js()``).
    ``max_session_requests``: engine requests one tab (Gradio session) may run at once; 0 = no limit."""
    return DemoUI(engine_thread, max_session_requests).build()


def page_js() -> str:
    """The page script: token distribution popups (``assets/app.js``)."""
    return JS_PATH.read_text()

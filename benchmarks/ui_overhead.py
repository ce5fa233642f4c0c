"""What does the live page cost the engine? Throughput of one workload run three ways:

1. headless: the engine thread alone;
2. viewers: the served app with N simulated viewers polling the live views twice a second
   (the server-side cost: snapshot + figure build, shared per version, + JSON to each viewer);
3. browser: the same app with N real headless Chromium tabs open (adds the browser's own CPU
   when it runs on the same machine, as on a laptop demo).

Prints tokens/s per mode, the UI cost in percent, and the snapshot/figure build time per refresh.

    python benchmarks/ui_overhead.py                      # embedded SmolLM2-135M
    python benchmarks/ui_overhead.py --model /path/to/tiny --requests 16 --max-tokens 32
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from miniyaie import Engine, EngineConfig, SamplingParams  # noqa: E402
from miniyaie.engine_thread import EngineThread  # noqa: E402
from ui.scenarios import QUESTIONS, SYSTEM_PROMPT  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def workload(engine_thread: EngineThread, n: int, max_tokens: int) -> float:
    """16 users sharing a system prompt, greedy, all at once; returns generated tokens/s."""
    engine_thread.call(lambda e: e.clear_cache())
    start = time.perf_counter()
    handles = [engine_thread.submit([{"role": "system", "content": SYSTEM_PROMPT},
                                     {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}],
                                    SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
               for i in range(n)]
    tokens = sum(len(h.result() and h.token_ids) for h in handles)
    return tokens / (time.perf_counter() - start)


def serve(engine_thread: EngineThread):
    """The real app on a free port; returns (url, DemoUI, stop)."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from ui.layout import CSS_PATH, DemoUI, page_js

    demo_ui = DemoUI(engine_thread)
    app = gr.mount_gradio_app(FastAPI(), demo_ui.build(), path="/", css_paths=[CSS_PATH], js=page_js())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(5)  # daemon thread: open streaming connections may hold it a little longer

    return f"http://127.0.0.1:{port}/", demo_ui, stop


def simulated_viewers(demo_ui, n: int, stop: threading.Event) -> list[threading.Thread]:
    """Each viewer does what a tab's timer does: refresh twice a second, serializing what it got."""
    def viewer() -> None:
        seen = None
        while not stop.is_set():
            out = demo_ui.refresh(seen)
            if not isinstance(out[0], dict):  # not a skip: a new version to send
                seen = out[-1]
                _ = [getattr(o, "plot", o) for o in out]
            stop.wait(0.5)
    threads = [threading.Thread(target=viewer, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=os.environ.get("MINIYAIE_MODEL", "embedded"))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--viewers", type=int, default=2)
    p.add_argument("--num-blocks", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-browser", action="store_true")
    args = p.parse_args(argv)

    engine = Engine(EngineConfig(model=args.model, device="cpu", dtype="float32", num_blocks=args.num_blocks))
    engine_thread = EngineThread(engine).start()
    workload(engine_thread, 4, 4)  # warm up

    def best(label: str) -> float:
        rates = [workload(engine_thread, args.requests, args.max_tokens) for _ in range(args.repeats)]
        print(f"  {label:<28} {max(rates):8.1f} tok/s   (runs: {', '.join(f'{r:.1f}' for r in rates)})", flush=True)
        return max(rates)

    print(f"model {engine.model_name} · {args.requests} requests × {args.max_tokens} tokens · "
          f"{args.viewers} viewers · torch threads {__import__('torch').get_num_threads()}")
    headless = best("headless")
    url, demo_ui, stop_server = serve(engine_thread)
    stop = threading.Event()
    threads = simulated_viewers(demo_ui, args.viewers, stop)
    served = best(f"app + {args.viewers} polling viewers")
    stop.set()
    for t in threads:
        t.join()
    browser = None
    if not args.no_browser and os.path.exists(CHROMIUM):
        from playwright.sync_api import sync_playwright
        with sync_playwright() as pw:
            b = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            pages = [b.new_page(viewport={"width": 1600, "height": 1000}) for _ in range(args.viewers)]
            for page in pages:
                page.goto(url)
                page.wait_for_selector("#tree-plot .js-plotly-plot", timeout=60_000)
            browser = best(f"app + {args.viewers} Chromium tabs")
            b.close()
    stop_server()
    views = demo_ui.views
    per_build = views.build_seconds / max(views.builds, 1)
    per_snap = views.snapshot_seconds / max(views.builds, 1)
    print(f"\nUI cost, server side (polling viewers): {100 * (1 - served / headless):5.1f}% of headless throughput")
    if browser is not None:
        print(f"UI cost with Chromium on the same machine: {100 * (1 - browser / headless):5.1f}%")
    print(f"refreshes built: {views.builds} · figure build {1000 * per_build:.1f} ms/refresh · "
          f"snapshot {1000 * per_snap:.1f} ms/refresh (incl. waiting for the engine lock)")
    engine_thread.stop()


if __name__ == "__main__":
    main()

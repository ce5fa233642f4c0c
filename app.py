"""Mini-YAIE demo: load the engine, start its thread, build the page, mount the API, serve.

    python app.py                       # embedded SmolLM2-135M-Instruct on 127.0.0.1:7860
    python app.py --model Qwen/Qwen2.5-0.5B-Instruct --port 8000
    MINIYAIE_MODEL=/path/to/model python app.py

This is also the Hugging Face Spaces ``app_file``: on Spaces (``SPACE_ID`` set) it listens on
0.0.0.0. One process serves the Gradio page at ``/`` and the OpenAI-compatible API (``/v1/...``,
``/health``, ``/metrics``) from ``miniyaie.server`` on the same port.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import types
from typing import Optional, Sequence

from fastapi import FastAPI

from miniyaie import Engine, EngineConfig
from miniyaie.engine_thread import EngineThread
from miniyaie.server import create_api

# Limits for a shared public demo (README "Reliability"); each has a flag and a MINIYAIE_* variable.
DEFAULT_MAX_WAITING = 256  # waiting-queue length; over it: HTTP 429 + Retry-After, a message in the page
DEFAULT_MAX_PROMPT_TOKENS = 4096  # longer prompts: 400
DEFAULT_MAX_TOKENS_CAP = 1024  # larger max_tokens: 400
DEFAULT_MAX_BODY_BYTES = 1 << 20  # larger request bodies: 413, before any parsing
DEFAULT_MAX_SESSION_REQUESTS = 32  # requests one browser tab may have running at once
CPU_DEMO_BLOCKS = 256  # small pool on CPU: the block map stays readable and eviction is reachable
GPU_DEMO_BLOCKS = 2048

# Gradio's reload mode re-imports this file; module globals would be reset and a second engine
# (and a second copy of the weights) started. State kept in a module of its own survives that.
_STATE = sys.modules.setdefault("_miniyaie_app_state", types.ModuleType("_miniyaie_app_state"))
if not hasattr(_STATE, "lock"):
    _STATE.lock = threading.Lock()
    _STATE.engine_thread = None


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags, each defaulting to a MINIYAIE_* environment variable (handy on Spaces)."""
    on_spaces = bool(_env("SPACE_ID"))
    p = argparse.ArgumentParser(description="Mini-YAIE live demo + OpenAI-compatible API on one port")
    p.add_argument("--host", default=_env("MINIYAIE_HOST", _env("GRADIO_SERVER_NAME", "0.0.0.0" if on_spaces else "127.0.0.1")))
    p.add_argument("--port", type=int, default=int(_env("MINIYAIE_PORT", _env("GRADIO_SERVER_PORT", "7860"))))
    p.add_argument("--model", default=_env("MINIYAIE_MODEL", "embedded"),
                   help="'embedded' (SmolLM2-135M-Instruct), an HF hub id, a local directory or a .gguf file")
    p.add_argument("--load-format", default=_env("MINIYAIE_LOAD_FORMAT", "auto"), choices=["auto", "dummy"])
    p.add_argument("--device", default=_env("MINIYAIE_DEVICE", "auto"))
    p.add_argument("--dtype", default=_env("MINIYAIE_DTYPE", "auto"))
    p.add_argument("--num-blocks", type=int, default=_int_env("MINIYAIE_NUM_BLOCKS"),
                   help=f"KV blocks in the pool (default {CPU_DEMO_BLOCKS} on CPU, {GPU_DEMO_BLOCKS} on CUDA)")
    p.add_argument("--block-size", type=int, default=_int_env("MINIYAIE_BLOCK_SIZE") or 16)
    p.add_argument("--max-num-seqs", type=int, default=_int_env("MINIYAIE_MAX_NUM_SEQS") or 64)
    p.add_argument("--max-num-batched-tokens", type=int, default=_int_env("MINIYAIE_MAX_NUM_BATCHED_TOKENS") or 2048)
    p.add_argument("--no-prefix-cache", action="store_true", default=_env("MINIYAIE_NO_PREFIX_CACHE") == "1")
    p.add_argument("--policy", default=_env("MINIYAIE_POLICY", "lpm"), choices=["lpm", "fcfs"])
    p.add_argument("--api-key", default=_env("MINIYAIE_API_KEY"), help="required as Bearer token on /v1 when set")
    g = p.add_argument_group("limits (0 turns a limit off)")
    g.add_argument("--max-waiting", type=int, default=_int_env("MINIYAIE_MAX_WAITING") or DEFAULT_MAX_WAITING,
                   help=f"waiting-queue length before new requests get 429 (default {DEFAULT_MAX_WAITING})")
    g.add_argument("--max-prompt-tokens", type=int, default=_int_env("MINIYAIE_MAX_PROMPT_TOKENS", DEFAULT_MAX_PROMPT_TOKENS),
                   help=f"longest prompt accepted, in tokens (default {DEFAULT_MAX_PROMPT_TOKENS})")
    g.add_argument("--max-tokens-cap", type=int, default=_int_env("MINIYAIE_MAX_TOKENS_CAP", DEFAULT_MAX_TOKENS_CAP),
                   help=f"largest max_tokens accepted (default {DEFAULT_MAX_TOKENS_CAP})")
    g.add_argument("--max-body-bytes", type=int, default=_int_env("MINIYAIE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
                   help=f"largest request body, page and API (default {DEFAULT_MAX_BODY_BYTES})")
    g.add_argument("--max-session-requests", type=int,
                   default=_int_env("MINIYAIE_MAX_SESSION_REQUESTS", DEFAULT_MAX_SESSION_REQUESTS),
                   help=f"requests one browser tab may run at once (default {DEFAULT_MAX_SESSION_REQUESTS})")
    g.add_argument("--api-max-concurrent-per-client", type=int, default=_int_env("MINIYAIE_API_MAX_CONCURRENT_PER_CLIENT", 0),
                   help="API requests in flight per client IP (default 0 = off; behind a proxy all users share one IP)")
    return p.parse_args(argv)


def _int_env(name: str, default: Optional[int] = None) -> Optional[int]:
    value = _env(name)
    return int(value) if value is not None else default


def engine_config(args: argparse.Namespace) -> EngineConfig:
    device = args.device
    if args.num_blocks is None:
        import torch
        on_gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        num_blocks = GPU_DEMO_BLOCKS if on_gpu else CPU_DEMO_BLOCKS
    else:
        num_blocks = args.num_blocks
    return EngineConfig(model=args.model, load_format=args.load_format, device=device, dtype=args.dtype,
                        num_blocks=num_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_cache=not args.no_prefix_cache, schedule_policy=args.policy,
                        max_waiting=args.max_waiting, max_prompt_tokens=args.max_prompt_tokens or None,
                        max_tokens_cap=args.max_tokens_cap or None)


def get_engine_thread(config: EngineConfig) -> EngineThread:
    """The process's one EngineThread: started on first call, reused after (reload-safe)."""
    with _STATE.lock:
        existing: Optional[EngineThread] = _STATE.engine_thread
        if existing is not None and existing.alive:
            return existing
        _STATE.engine_thread = EngineThread(Engine(config)).start()
        return _STATE.engine_thread


def build_app(engine_thread: EngineThread, api_key: Optional[str] = None, *,
              max_body_bytes: Optional[int] = None, max_concurrent_per_client: Optional[int] = None,
              max_session_requests: int = DEFAULT_MAX_SESSION_REQUESTS) -> FastAPI:
    """FastAPI app serving the API routes and the Gradio page at "/" (API routes win: they are
    registered before the mount). The body-size cap wraps both. Gradio serves no files of ours:
    no ``allowed_paths``; the stylesheet and script are inlined into the page."""
    from ui import CSS_PATH, build_ui, page_js  # first: it makes importing gradio skip its stub writer

    import gradio as gr

    app = create_api(engine_thread, api_key=api_key, max_body_bytes=max_body_bytes,
                     max_concurrent_per_client=max_concurrent_per_client)
    blocks = build_ui(engine_thread, max_session_requests=max_session_requests)
    theme = gr.themes.Soft(primary_hue="orange", neutral_hue="slate",
                           font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"])
    return gr.mount_gradio_app(app, blocks, path="/", css_paths=[CSS_PATH], js=page_js(), theme=theme,
                               footer_links=["api"], ssr_mode=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import uvicorn

    args = parse_args(argv)
    engine_thread = get_engine_thread(engine_config(args))
    app = build_app(engine_thread, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                    max_concurrent_per_client=args.api_max_concurrent_per_client,
                    max_session_requests=args.max_session_requests)
    print(f"[miniyaie] demo on http://{args.host}:{args.port}/  ·  API on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine_thread.stop()


if __name__ == "__main__":
    main()

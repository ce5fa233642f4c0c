"""The command line: ``python -m miniyaie serve|generate|chat|bench``.

``serve`` hands its arguments to ``app.main`` (the demo + API on one port) when app.py is there,
else serves the API alone with uvicorn. ``generate`` and ``chat`` drive an Engine directly in
this process (no thread, no server). ``bench`` runs a module from ``benchmarks/``.

Engine flags are the same everywhere; ``add_engine_args`` and ``engine_config_from_args`` are
what app.py uses too, so one flag means one thing across the project.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from typing import Callable, Optional

from miniyaie.config import EMBEDDED_MODEL, EngineConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ENV = "MINIYAIE_MODEL"


# ---- shared flags ------------------------------------------------------------------------------


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags that build an EngineConfig. Unset flags keep EngineConfig's defaults."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=os.environ.get(MODEL_ENV, EMBEDDED_MODEL),
                   help=f"'embedded' (SmolLM2-135M-Instruct), a hub id, a local HF directory or a .gguf "
                        f"(default: ${MODEL_ENV} or 'embedded')")
    g.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                   help="'dummy' keeps the architecture but uses random weights")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N | auto (default auto)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    g.add_argument("--attention-backend", choices=["auto", "torch", "triton", "cpu"], default=None)
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    g.add_argument("--num-blocks", type=int, default=None, help="KV pool size (default: sized from memory)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="most requests in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    g.add_argument("--no-prefix-cache", action="store_true", help="turn the radix prefix cache off")
    g.add_argument("--policy", choices=["lpm", "fcfs"], default=None,
                   help="scheduling: longest prefix match (default) or first come first served")
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--max-waiting", type=int, default=None, help="waiting-queue length before 429 (default 1024)")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (default: context)")
    g.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens accepted (default: none)")
    return parser


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    """EngineConfig from ``add_engine_args`` flags; ``overrides`` win. Raises ValueError on bad values."""
    given = {
        "model": args.model, "load_format": args.load_format, "device": args.device, "dtype": args.dtype,
        "attention_backend": args.attention_backend, "block_size": args.block_size,
        "num_blocks": args.num_blocks, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.max_model_len,
        "schedule_policy": args.policy, "num_threads": args.num_threads,
        "max_waiting": getattr(args, "max_waiting", None),
        "max_prompt_tokens": getattr(args, "max_prompt_tokens", None) or None,
        "max_tokens_cap": getattr(args, "max_tokens_cap", None) or None,
    }
    settings = {k: v for k, v in given.items() if v is not None}
    if args.no_prefix_cache:
        settings["enable_prefix_cache"] = False
    settings.update(overrides)
    return EngineConfig(**settings)


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"default {max_tokens}")
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1, help="-1: off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace):
    from miniyaie.request import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed, stop=args.stop)


def _make_engine(args: argparse.Namespace):
    from miniyaie.engine import Engine  # torch/transformers load here, not for --help

    return Engine(engine_config_from_args(args))


def _say(message: str) -> None:
    """Status lines go to stderr so stdout carries only the generated text."""
    print(f"[miniyaie] {message}", file=sys.stderr, flush=True)


# ---- serve -------------------------------------------------------------------------------------


def _load_app() -> Optional[Callable[[list[str]], object]]:
    """``main`` of the repository's app.py, or None when it is absent or its UI cannot import."""
    path = os.path.join(REPO_ROOT, "app.py")
    if not os.path.isfile(path):
        return None
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)  # app.py imports ui/ from the repository root
    spec = importlib.util.spec_from_file_location("app", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:  # e.g. gradio not installed: the API alone still works
        _say(f"the demo is unavailable ({err}); serving the API only")
        return None
    return getattr(module, "main", None)


def _strip(argv: list[str], flag: str, takes_value: bool) -> list[str]:
    """argv without ``flag`` (``--flag v`` or ``--flag=v``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = takes_value
        elif not (takes_value and a.startswith(flag + "=")):
            out.append(a)
    return out


def add_server_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--host, --port, --api-key, --served-model-name (app.py may share them)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=7860)
    g.add_argument("--api-key", default=os.environ.get("MINIYAIE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MINIYAIE_API_KEY)")
    g.add_argument("--served-model-name", default=None, help="model id the API reports and accepts")
    g.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body; larger gets 413 (default: $MINIYAIE_MAX_BODY_BYTES or 1 MiB)")
    g.add_argument("--api-max-concurrent-per-client", type=int, default=None,
                   help="API requests in flight per client IP; more get 429 (default 0 = off)")
    return parser


def cmd_serve(args: argparse.Namespace, rest: list[str], raw: list[str]) -> int:
    # create_api reads these from the environment when its caller passes none, so they work
    # however app.py parses its own flags; they are not forwarded as flags
    if args.api_key:
        os.environ["MINIYAIE_API_KEY"] = args.api_key
    if args.served_model_name:
        os.environ["MINIYAIE_SERVED_MODEL_NAME"] = args.served_model_name
    app_main = None if args.api_only else _load_app()
    if app_main is not None:
        forward = _strip(_strip(_strip(raw, "--api-only", False), "--api-key", True), "--served-model-name", True)
        return int(app_main(forward) or 0)
    if rest:
        _say(f"unknown arguments: {' '.join(rest)}")
        return 2
    import uvicorn

    from miniyaie.engine_thread import EngineThread
    from miniyaie.server import create_api

    engine_thread = EngineThread(_make_engine(args)).start()
    app = create_api(engine_thread, api_key=args.api_key or None, model_name=args.served_model_name,
                     max_body_bytes=args.max_body_bytes, max_concurrent_per_client=args.api_max_concurrent_per_client)
    _say(f"serving the OpenAI-compatible API on http://{args.host}:{args.port}/v1")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine_thread.stop()
    return 0


# ---- generate / chat ---------------------------------------------------------------------------


def _stream(engine, prompt, params) -> tuple[str, int, Optional[float], int]:
    """Stream one answer to stdout; returns (text, tokens, seconds to first token, cached tokens)."""
    start = time.perf_counter()
    text, tokens, ttft, cached = [], 0, None, 0
    for out in engine.stream(prompt, params):
        if out.new_token_ids and ttft is None:
            ttft = time.perf_counter() - start
        tokens += len(out.new_token_ids)
        cached = out.num_cached_tokens
        if out.delta_text:
            text.append(out.delta_text)
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
        if out.finished and out.finish_reason == "error":
            raise RuntimeError(out.error or "the engine failed this request")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text), tokens, ttft, cached


def _stats(tokens: int, seconds: float, ttft: Optional[float], cached: int) -> str:
    rate = tokens / seconds if seconds > 0 else 0.0
    first = f", first token {ttft * 1000:.0f} ms" if ttft is not None else ""
    return f"{tokens} tokens in {seconds:.2f} s ({rate:.1f} tok/s){first}, {cached} prompt tokens cached"


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
    params = _sampling_params(args)
    engine = _make_engine(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = messages + [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    _, tokens, ttft, cached = _stream(engine, prompt, params)
    if not args.quiet:
        _say(_stats(tokens, time.perf_counter() - start, ttft, cached))
    return 0


CHAT_HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D)"


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    engine = _make_engine(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    if interactive:
        _say(f"chatting with {engine.model_name}; {CHAT_HELP}")
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and line == "":
            break  # EOF
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(system)
            continue
        if line.startswith("/"):
            _say(CHAT_HELP)
            continue
        messages.append({"role": "user", "content": line})
        start = time.perf_counter()
        try:
            answer, tokens, ttft, cached = _stream(engine, messages, params)
        except ValueError as err:  # e.g. the conversation outgrew the context
            messages.pop()
            _say(f"error: {err} (/reset starts over)")
            continue
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            messages.pop()
            print(file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": answer})
        if args.verbose:
            _say(_stats(tokens, time.perf_counter() - start, ttft, cached))
    return 0


# ---- bench -------------------------------------------------------------------------------------


def _suites() -> list[str]:
    folder = os.path.join(REPO_ROOT, "benchmarks")
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith("_bench.py"))


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.list:
        print("\n".join(_suites()) or "no benchmark suites found in benchmarks/")
        return 0
    path = os.path.join(REPO_ROOT, "benchmarks", f"{args.suite}.py")
    if not os.path.isfile(path):
        _say(f"benchmarks/{args.suite}.py is not there, so there is nothing to run "
             f"(found: {', '.join(_suites()) or 'none'}).")
        return 2
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    module = importlib.import_module(f"benchmarks.{args.suite}")
    if not hasattr(module, "main"):
        _say(f"benchmarks/{args.suite}.py has no main(argv)")
        return 2
    return int(module.main(rest[1:] if rest[:1] == ["--"] else rest) or 0)


# ---- the parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m miniyaie", description="Mini-YAIE: a small, readable SGLang-style inference engine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="the demo and the OpenAI-compatible API on one port",
                           description="Serve the Gradio demo and the OpenAI-compatible API (/v1) on one "
                                       "port via app.py; with --api-only (or without app.py) just the API. "
                                       "Unknown flags are passed on to app.py.")
    serve.add_argument("--api-only", action="store_true", help="no demo: serve the API with uvicorn")
    add_server_args(serve)
    add_engine_args(serve)

    gen = sub.add_parser("generate", help="stream one completion to the terminal",
                         description="Generate from one prompt, streaming text to stdout (stats to stderr).")
    gen.add_argument("prompt", nargs="?", help="the prompt ('-' or omitted: read stdin)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--quiet", action="store_true", help="no stats line")
    _add_sampling_args(gen, max_tokens=128)
    add_engine_args(gen)

    chat = sub.add_parser("chat", help="interactive chat in the terminal",
                          description=f"Chat interactively; answers stream as they are generated. {CHAT_HELP}.")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--verbose", action="store_true", help="print stats after each answer")
    _add_sampling_args(chat, max_tokens=256)
    add_engine_args(chat)

    bench = sub.add_parser("bench", help="run the benchmark workloads (benchmarks/)",
                           description="Run a benchmark suite from benchmarks/. Arguments after the suite "
                                       "options go to the suite's own main(); benchmarks fix their engine "
                                       "configs themselves so results stay comparable, e.g. "
                                       "'python -m miniyaie bench -- --only chat_burst'.")
    bench.add_argument("--suite", default="cpu_bench", help="module in benchmarks/ (default cpu_bench)")
    bench.add_argument("--list", action="store_true", help="list the suites and exit")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # serve and bench forward flags they do not know (to app.py / the benchmark)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("serve", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "serve":
            return cmd_serve(args, rest, argv[argv.index("serve") + 1:])
        if args.command == "bench":
            return cmd_bench(args, rest)
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_chat(args)
    except ValueError as err:  # bad flags or sampling values: say which, no traceback
        _say(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        from miniyaie.loader import ModelLoadError

        if isinstance(err, ModelLoadError):
            _say(f"error: {err}")
            return 1
        raise

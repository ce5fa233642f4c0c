"""CPU benchmarks: Mini-YAIE vs transformers on the embedded SmolLM2-135M-Instruct, same dtype, same run.

    python benchmarks/cpu_bench.py [--dtype float32] [--rounds 5] [--only chat_burst,sampled_burst,single_stream,shared_prefix,startup]

Prints one markdown table per workload (ours and the peer side by side, with the ratio); paste
them into benchmarks/RESULTS.md. Progress goes to stderr. Chat burst and single stream run
``--rounds`` times, ours and the peer's ``generate`` taking turns, because a shared 2-core machine
drifts by 10-20% from one minute to the next: the tables give medians and each round's ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.workloads import chat_burst_prompts  # noqa: E402
from miniyaie import Engine, EngineConfig, SamplingParams  # noqa: E402
from miniyaie.loader import load_model  # noqa: E402


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def table(title: str, rows: list[tuple[str, str, str, str]]) -> str:
    lines = [f"### {title}", "", "| metric | Mini-YAIE | transformers | ratio |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


class Peer:
    """transformers on the same weights (the converted embedded checkpoint) and dtype."""

    def __init__(self, source_dir: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(source_dir)
        self.tokenizer.padding_side = "left"

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int, **sampling) -> float:
        """Static padded batch, greedy unless ``sampling`` (temperature, top_k, top_p) is given;
        returns seconds."""
        batch = self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        started = time.perf_counter()
        self.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=bool(sampling),
                            pad_token_id=self.tokenizer.pad_token_id, **sampling)
        return time.perf_counter() - started

    @torch.inference_mode()
    def generate_batch(self, prompts: list[list[int]], new_tokens: int) -> float:
        from transformers import GenerationConfig
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=self.tokenizer.pad_token_id)
        # its paged cache works with the model's sdpa attention as loaded (transformers 5.24 warns that
        # the old "paged|sdpa" name is going away)
        started = time.perf_counter()
        self.model.generate_batch(inputs=prompts, generation_config=config)
        return time.perf_counter() - started


def new_engine(args, **overrides) -> Engine:
    config = dict(model="embedded", device="cpu", dtype=args.dtype)
    config.update(overrides)
    return Engine(EngineConfig(**config), loaded=args.loaded)


def ratio_cell(ours: list[float], peer: list[float]) -> str:
    """The median ratio and each round's, in order (ours and the peer measured back to back)."""
    ratios = [a / b for a, b in zip(ours, peer)]
    return f"{statistics.median(ratios):.2f}x ({' / '.join(f'{r:.2f}' for r in ratios)})"


DEMO_SAMPLING = dict(temperature=0.7, top_k=40, top_p=0.95)  # the demo's defaults (ui/layout.py)


def burst_rounds(args, peer: Peer, engine: Engine, prompts: list[list[int]], sampling: dict) -> tuple[list, list]:
    """Output tok/s of ours and the peer's ``generate`` on 16 x 64 new tokens, a turn each a round."""
    ours, theirs = [], []
    for round_ in range(args.rounds):
        params = [SamplingParams(max_tokens=64, ignore_eos=True, seed=100 * round_ + i if sampling else None,
                                 **(sampling or dict(temperature=0))) for i in range(len(prompts))]
        engine.clear_cache()  # every round starts cold: the system prompt is computed once per round
        started = time.perf_counter()
        engine.generate(prompts, params)
        ours.append(16 * 64 / (time.perf_counter() - started))
        torch.manual_seed(round_)
        theirs.append(16 * 64 / peer.generate(prompts, 64, **sampling))
        log(f"  round {round_ + 1}: Mini-YAIE {ours[-1]:.1f} tok/s, transformers generate {theirs[-1]:.1f}")
    return ours, theirs


def chat_burst(args, peer: Peer, sampling: dict) -> str:
    """The chat burst, greedy (the issue's workload, with ``generate_batch`` too) or sampled as the demo samples."""
    engine = new_engine(args)
    prompts = [engine.tokenize(p) for p in chat_burst_prompts(16)]
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    how = "sampled as the demo samples (temperature 0.7, top-k 40, top-p 0.95)" if sampling else "greedy"
    log(f"chat burst, {how}: 16 x ({len(prompts[0])}-{max(map(len, prompts))} prompt tokens), 64 new tokens each")
    ours, peer_static = burst_rounds(args, peer, engine, prompts, sampling)
    med = statistics.median
    rows = [("output tok/s vs `generate` (padded batch of 16)", f"{med(ours):.1f}", f"{med(peer_static):.1f}",
             ratio_cell(ours, peer_static))]
    if not sampling:
        log("  transformers generate_batch (once: it is 3-4x behind, and a round takes a minute)…")
        peer_cb = 16 * 64 / peer.generate_batch(prompts, 64)
        rows.append(("output tok/s vs `generate_batch` (paged, continuous)", f"{ours[-1]:.1f}", f"{peer_cb:.1f}",
                     f"{ours[-1] / peer_cb:.2f}x"))
    return table(f"Chat burst (16 chats, shared ~200-token system prompt, 64 new tokens, {how}; {args.rounds} rounds)",
                 rows)


def single_stream(args, peer: Peer) -> str:
    engine = new_engine(args, enable_prefix_cache=False)
    prompt = engine.tokenize([{"role": "user", "content": "Tell me a long story about a robot who learns to paint."}])
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    log("single stream: 128 new tokens")
    decode, ttft, peer_decode, peer_ttft = [], [], [], []
    for round_ in range(args.rounds):
        out = engine.generate([prompt], SamplingParams(max_tokens=128, temperature=0, ignore_eos=True))[0]
        ttft.append(out.metrics.ttft)
        decode.append(127 / (out.metrics.finished - out.metrics.first_token))
        peer_ttft.append(min(peer.generate([prompt], 1) for _ in range(2)))
        peer_decode.append(127 / (peer.generate([prompt], 128) - peer_ttft[-1]))
        log(f"  round {round_ + 1}: Mini-YAIE {decode[-1]:.1f} tok/s, transformers {peer_decode[-1]:.1f}")
    med = statistics.median
    return table(f"Single stream (one chat, 128 new tokens, greedy; {args.rounds} rounds)", [
        ("decode tok/s", f"{med(decode):.1f}", f"{med(peer_decode):.1f}", ratio_cell(decode, peer_decode)),
        ("TTFT (s)", f"{med(ttft):.3f}", f"{med(peer_ttft):.3f}", f"{ratio_cell(peer_ttft, ttft)} faster"),
    ])


def shared_prefix(args) -> str:
    rng = random.Random(0)
    engine = new_engine(args)
    vocab = engine.vocab_size
    prefix = [rng.randrange(100, vocab) for _ in range(1000)]
    suffixes = [[rng.randrange(100, vocab) for _ in range(20)] for _ in range(32)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.generate([prefix[:16]], params)  # warm-up
    engine.clear_cache()
    log("shared prefix: cold TTFT, then a cache hit")
    cold = engine.generate([prefix + suffixes[0]], params)[0].metrics.ttft
    hit = engine.generate([prefix + suffixes[1]], params)[0]
    computed = {}
    for cache in (True, False):
        eng = new_engine(args, enable_prefix_cache=cache)
        before = eng.num_forward_tokens
        eng.generate([prefix + s for s in suffixes], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        computed[cache] = eng.num_forward_tokens - before
    return ("### Shared long prefix (32 requests, 1,000-token prefix + 20-token suffixes)\n\n"
            "| metric | value |\n|---|---|\n"
            f"| TTFT cold (s) | {cold:.3f} |\n| TTFT cache hit (s) | {hit.metrics.ttft:.3f} "
            f"({hit.cached_tokens} cached tokens) |\n| hit / cold | {hit.metrics.ttft / cold:.1%} |\n"
            f"| tokens computed, cache on | {computed[True]:,} |\n| tokens computed, cache off | {computed[False]:,} |\n")


def startup(args) -> str:
    def served_in(env: dict) -> float:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=root, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < 600:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                        if r.status == 200:
                            return time.perf_counter() - started
                except OSError:
                    time.sleep(0.2)
            raise RuntimeError("the app did not serve its page within 600 s")
        finally:
            proc.terminate()
            proc.wait(30)

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MINIYAIE_CACHE=cache)
        log("start-up: first start (convert into an empty cache)")
        first = served_in(env)
        log("start-up: later start")
        later = served_in(env)
    return ("### Start-up (`python app.py` until the page is served)\n\n| start | seconds |\n|---|---|\n"
            f"| first (fetch + convert) | {first:.1f} |\n| later (cached) | {later:.1f} |\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5, help="turns of ours and the peer (chat burst, single stream)")
    parser.add_argument("--only", default="chat_burst,sampled_burst,single_stream,shared_prefix,startup")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    log("loading the embedded model")
    args.loaded = load_model("embedded")
    dtype = getattr(torch, args.dtype)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, dtype {args.dtype}\n")
    peer = Peer(args.loaded.source_dir, dtype) if only & {"chat_burst", "sampled_burst", "single_stream"} else None
    if "chat_burst" in only:
        print(chat_burst(args, peer, {}), flush=True)
    if "sampled_burst" in only:
        print(chat_burst(args, peer, DEMO_SAMPLING), flush=True)
    if "single_stream" in only:
        print(single_stream(args, peer), flush=True)
    if "shared_prefix" in only:
        print(shared_prefix(args), flush=True)
    if "startup" in only:
        print(startup(args), flush=True)


if __name__ == "__main__":
    main()

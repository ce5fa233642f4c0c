"""GPU benchmarks on one H200: Mini-YAIE (Triton attention, CUDA graphs, bf16) vs transformers, same run.

    python benchmarks/gpu_bench.py [--only throughput,peers,shared_prefix,breakdown] [--out DIR]
                                   [--peer-requests 48] [--static-batches 1]

Qwen3-0.6B's architecture with random weights (no hub on the machine): the config is written to a
temporary directory, transformers builds the model on the GPU, and our engine is handed the very
same tensors, so both sides run the same weights.

1. throughput: nano-vllm's workload (256 requests, prompt 100-1024 random ids, output 100-1024,
   ignore_eos, seed 0), output tokens/s, and the share of the memory-bandwidth roofline.
2. peers: transformers ``generate_batch``-style continuous batching (paged|sdpa) and static
   ``generate`` in padded batches of 64, on the first requests of the same workload (stated).
3. shared_prefix: 128 requests = one 2,048-token prefix + distinct 64-token suffix, 128 tokens out;
   prefix cache on vs off: throughput and mean TTFT.
4. breakdown: per decode step at batch 256, where the time goes (scheduler, batch building,
   forward on the GPU, sampling, the rest), with and without CUDA graphs.
Results go to stdout as markdown and to OUT/gpu_bench.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import miniyaie.engine as engine_module  # noqa: E402
from miniyaie import Engine, EngineConfig, SamplingParams  # noqa: E402
from miniyaie.loader import LoadedModel  # noqa: E402

HBM_BYTES_PER_S = 4.3e12  # measured device-to-device copy on this kind of machine (KINDS.md)
RESULTS: dict = {}


def log(message: str) -> None:
    print(f"[gpu-bench] {message}", file=sys.stderr, flush=True)


def qwen3_0_6b_config():
    from transformers import Qwen3Config
    config = Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=None,
        bos_token_id=None, pad_token_id=0)
    config.architectures = ["Qwen3ForCausalLM"]
    return config


def build_models(tmp: str):
    """transformers' model (bf16, on the GPU) and a LoadedModel for our engine over its weights."""
    from transformers import AutoModelForCausalLM
    config = qwen3_0_6b_config()
    config.save_pretrained(tmp)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hf.eval()
    weights = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    return hf, LoadedModel("Qwen3-0.6B (dummy weights)", config, None, weights, tmp)


def nano_vllm_workload(num_seqs: int = 256, max_in: int = 1024, max_out: int = 1024):
    """nano-vllm's bench.py: prompt ids in [0, 10000], prompt and output lengths in [100, 1024]."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, max_in))] for _ in range(num_seqs)]
    outputs = [rng.randint(100, max_out) for _ in range(num_seqs)]
    return prompts, outputs


def new_engine(loaded, **overrides) -> Engine:
    # the previous section's engine is gone, but torch's caching allocator still holds its memory:
    # hand it back before this engine sizes its KV pool from free GPU memory
    gc.collect()
    torch.cuda.empty_cache()
    config = dict(model=loaded.source_dir, device="cuda", dtype="bfloat16", attention_backend="triton",
                  max_num_seqs=256, max_num_batched_tokens=16384, memory_fraction=0.85)
    config.update(overrides)
    start = time.perf_counter()
    engine = Engine(EngineConfig(**config), loaded=loaded)
    log(f"engine up in {time.perf_counter() - start:.1f} s: {engine.runner.kv.num_blocks} KV blocks, "
        f"graphs {engine.runner.graphs.sizes if engine.runner.graphs else None}")
    return engine


class ByteCounter:
    """Wraps ModelRunner.forward: the bytes a step must read at least (all weights once + the KV
    of every token each sequence attends to), summed over steps — the roofline's numerator."""

    def __init__(self, engine: Engine) -> None:
        runner = engine.runner
        # parameters() lists the tied embedding once: it is read once per step, as the lm_head
        self.weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        a = runner.args
        self.kv_per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * 2
        self.total = 0
        self.steps = 0
        inner = runner.forward

        def counted(batch):
            self.total += self.weight_bytes + int(batch.seq_lens.sum()) * self.kv_per_token
            self.steps += 1
            return inner(batch)
        runner.forward = counted
        self.runner = runner

    def detach(self) -> None:
        # the wrapper refers back to the runner; the engine froze its objects out of the garbage
        # collector, so that cycle would keep the engine (and its KV pool) alive for good
        del self.runner.forward


def bench_throughput(loaded) -> None:
    """The workload twice on one engine: steps processed one at a time, then overlapped (default)."""
    prompts, out_lens = nano_vllm_workload()
    engine = new_engine(loaded)
    # warm-up: kernels for extend shapes, the sampler
    engine.generate([p[:200] for p in prompts[:8]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    counter = ByteCounter(engine)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in out_lens]
    for overlap in (False, True):
        engine.overlap = overlap
        engine.clear_cache()
        counter.total = counter.steps = 0
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.token_ids) for o in outs)
        assert tokens == sum(out_lens), (tokens, sum(out_lens))
        roofline_s = counter.total / HBM_BYTES_PER_S
        RESULTS["throughput" if overlap else "throughput_no_overlap"] = dict(
            requests=len(prompts), prompt_tokens=sum(map(len, prompts)), output_tokens=tokens,
            seconds=elapsed, output_tok_per_s=tokens / elapsed, steps=counter.steps,
            bytes_read_min=counter.total, roofline_seconds=roofline_s, roofline_fraction=roofline_s / elapsed,
            weight_bytes=counter.weight_bytes, preemptions=engine.scheduler.num_preemptions)
        log(f"throughput, overlap {overlap}: {tokens / elapsed:,.0f} tok/s, {elapsed:.1f} s, "
            f"{counter.steps} steps, roofline {roofline_s / elapsed:.0%}")
    counter.detach()


def bench_peers(hf, peer_requests: int, static_batches: int) -> None:
    from transformers import GenerationConfig
    prompts, out_lens = nano_vllm_workload()
    res = {}
    # -- continuous batching (paged|sdpa) on the first peer_requests requests -------------------
    sub_p, sub_o = prompts[:peer_requests], out_lens[:peer_requests]
    try:
        hf.config._attn_implementation = "paged|sdpa"
        hf.set_attn_implementation("paged|sdpa") if hasattr(hf, "set_attn_implementation") else None
        gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(sub_o), eos_token_id=None,
                                      pad_token_id=0)
        try:  # per-request output lengths through the manager (generate_batch takes one max_new_tokens)
            manager = hf.init_continuous_batching(generation_config=gen_config)
            manager.start()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i, (p, n) in enumerate(zip(sub_p, sub_o)):
                manager.add_request(p, request_id=f"r{i}", max_new_tokens=n)
            done, tokens = 0, 0
            while done < len(sub_p):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    done += 1
                    tokens += len(result.generated_tokens)
            elapsed = time.perf_counter() - start
            manager.stop(block=True)
            how = "ContinuousBatchingManager (the engine behind generate_batch), per-request max_new_tokens"
        except Exception as err:  # noqa: BLE001
            log(f"manager path failed ({err!r}); generate_batch with the mean output length")
            mean = sum(sub_o) // len(sub_o)
            gen_config.max_new_tokens = mean
            start = time.perf_counter()
            out = hf.generate_batch(inputs=sub_p, generation_config=gen_config)
            elapsed = time.perf_counter() - start
            tokens = sum(len(r.generated_tokens) for r in out.values())
            how = f"generate_batch, max_new_tokens={mean} for every request"
        res["generate_batch"] = dict(requests=len(sub_p), output_tokens=tokens, seconds=elapsed,
                                     output_tok_per_s=tokens / elapsed, how=how)
        log(f"peer generate_batch: {res['generate_batch']}")
    except Exception as err:  # noqa: BLE001
        res["generate_batch"] = dict(error=repr(err))
        log(f"peer generate_batch failed: {err!r}")
    # -- static generate, padded batches of 64 --------------------------------------------------
    try:
        hf.config._attn_implementation = "sdpa"
        if hasattr(hf, "set_attn_implementation"):
            hf.set_attn_implementation("sdpa")
        total_tokens, total_s = 0, 0.0
        for b in range(static_batches):
            batch_p, batch_o = prompts[64 * b:64 * (b + 1)], out_lens[64 * b:64 * (b + 1)]
            width = max(map(len, batch_p))
            ids = torch.zeros(len(batch_p), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(batch_p):  # left padding
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(batch_o),
                                          min_new_tokens=max(batch_o), eos_token_id=None, pad_token_id=0)
            torch.cuda.synchronize()
            start = time.perf_counter()
            hf.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), generation_config=gen_config)
            torch.cuda.synchronize()
            total_s += time.perf_counter() - start
            total_tokens += sum(batch_o)  # useful tokens: each request's own length (nano-vllm's count)
        res["static_generate"] = dict(requests=64 * static_batches, useful_output_tokens=total_tokens,
                                      seconds=total_s, output_tok_per_s=total_tokens / total_s)
        log(f"peer static generate: {res['static_generate']}")
    except Exception as err:  # noqa: BLE001
        res["static_generate"] = dict(error=repr(err))
        log(f"peer static generate failed: {err!r}")
    RESULTS["peers"] = res


def bench_shared_prefix(loaded) -> None:
    rng = random.Random(1)
    prefix = [rng.randint(0, 10000) for _ in range(2048)]
    prompts = [prefix + [rng.randint(0, 10000) for _ in range(64)] for _ in range(128)]
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    res = {}
    engine = new_engine(loaded)
    # warm-up, both paths: Triton compiles kernel variants on first use (prefix hits included)
    warm = [prefix[:256] + [i] * 16 for i in range(4)]
    for cache in (False, True):
        engine.set_options(enable_prefix_cache=cache)
        engine.generate(warm, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    for cache in (False, True):
        engine.set_options(enable_prefix_cache=cache)
        # the workload twice: the first pass also pays Triton's one-time compiles of kernel
        # variants the warm-up did not reach; the second is the figure
        for attempt in ("first_pass", "figure"):
            engine.clear_cache()
            torch.cuda.synchronize()
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            elapsed = time.perf_counter() - start
            ttfts = [o.metrics.ttft for o in outs]
            key = ("cache_on" if cache else "cache_off") + ("" if attempt == "figure" else "_first_pass")
            res[key] = dict(seconds=elapsed, output_tok_per_s=sum(len(o.token_ids) for o in outs) / elapsed,
                            mean_ttft_s=sum(ttfts) / len(ttfts), cached_tokens=sum(o.cached_tokens for o in outs))
            log(f"shared prefix, {key}: {res[key]}")
    res["speedup"] = res["cache_on"]["output_tok_per_s"] / res["cache_off"]["output_tok_per_s"]
    RESULTS["shared_prefix"] = res


def bench_breakdown(loaded) -> None:
    """256 sequences decoding at ~1,000 tokens of context; time each part of engine.step, step by
    step (eager, CUDA graphs) and overlapped (CUDA graphs, step N+1 prepared while N runs)."""
    rng = random.Random(2)
    prompts = [[rng.randint(0, 10000) for _ in range(1000)] for _ in range(256)]
    res = {}
    engine = new_engine(loaded)
    graphs = engine.runner.graphs
    timers: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            timers[name] += time.perf_counter() - t
            return out
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    build = engine_module.ForwardBatch.build
    engine_module.ForwardBatch.build = timed("build_batch", build)
    gpu_events = []
    inner_forward = engine.runner.forward

    def forward(batch):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = inner_forward(batch)
        end.record()
        gpu_events.append((begin, end))
        return out
    engine.runner.forward = timed("forward_launch", forward)
    # reading a step back includes waiting for the GPU when nothing else is left to do
    engine._process = timed("read_back_and_append", engine._process)
    engine.telemetry.on_step = timed("telemetry", engine.telemetry.on_step)
    sampler_call = engine.sampler.__class__.__call__
    engine.sampler.__class__.__call__ = timed("sample_launch", sampler_call)
    try:
        for mode in ("eager", "graphs", "graphs_overlap"):
            engine.runner.graphs = graphs if mode != "eager" else None
            engine.overlap = mode == "graphs_overlap"
            engine.clear_cache()
            ids = [engine.add_request(p, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
                   for p in prompts]
            while any(engine.requests[i].num_computed_tokens < 1000 or not engine.requests[i].output_token_ids
                      for i in ids):
                engine.step()  # prefill until every request decodes
            torch.cuda.synchronize()
            timers.clear()
            gpu_events.clear()
            steps, start = 0, time.perf_counter()
            for _ in range(40):
                engine.step()
                steps += 1
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / steps
            gpu = sum(b.elapsed_time(e) for b, e in gpu_events) / 1e3 / steps
            part = {k: v / steps for k, v in timers.items()}
            part["rest"] = wall - sum(part.values())
            res[mode] = dict(step_ms=wall * 1e3, gpu_forward_ms=gpu * 1e3, batch=256,
                             **{f"{k}_ms": v * 1e3 for k, v in part.items()})
            log(f"breakdown {mode}: {res[mode]}")
            while engine.has_unfinished:
                engine.step()
            for i in ids:
                engine.result(i)
    finally:
        engine_module.ForwardBatch.build = build
        engine.sampler.__class__.__call__ = sampler_call
        # the wrappers refer back to the engine: drop them, or the frozen engine never goes (see ByteCounter)
        del engine.scheduler.schedule, engine.runner.forward, engine._process, engine.telemetry.on_step
    RESULTS["breakdown"] = res


def bench_profile(loaded, out_dir: str) -> None:
    """cProfile of 30 decode steps at batch 256 with CUDA graphs: where the engine's CPU time goes."""
    import cProfile
    import io
    import pstats
    rng = random.Random(2)
    prompts = [[rng.randint(0, 10000) for _ in range(1000)] for _ in range(256)]
    engine = new_engine(loaded)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    for _ in range(30):  # prefill (16 steps of 16k tokens) and a few decodes
        engine.step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    for _ in range(30):
        engine.step()
    prof.disable()
    RESULTS["profile"] = dict(step_ms=(time.perf_counter() - start) / 30 * 1e3)
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    with open(os.path.join(out_dir, "profile.txt"), "w") as f:
        f.write(text.getvalue())
    log(f"profile: {RESULTS['profile']} (profile.txt)")


def bench_kernels() -> None:
    """Decode attention alone at batch 256 x ~1,050 tokens (Qwen3-0.6B heads): configs vs bandwidth."""
    import triton.testing
    from miniyaie.attention.triton_kernels import decode_attention
    batch, ctx, heads, kv_heads, dim, page = 256, 1050, 16, 8, 128, 16
    blocks = batch * (ctx // page + 1)
    k_cache = torch.randn(blocks * page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(blocks, device="cuda", dtype=torch.int64).to(torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    nbytes = 2 * batch * ctx * kv_heads * dim * 2
    res = {}
    for splits in (1, 2, 4):
        mid_o = torch.empty(batch, heads, splits, dim, device="cuda", dtype=torch.float32)
        mid_lse = torch.empty(batch, heads, splits, device="cuda", dtype=torch.float32)
        for block_n in (32, 64, 128):
            for warps, stages in ((4, 2), (4, 3), (8, 2)):
                def fn():
                    decode_attention(q, k_cache, v_cache, tables, seq_lens, out, 0.088, page, splits,
                                     mid_o, mid_lse, block_n=block_n, num_warps=warps, num_stages=stages)
                try:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                    res[f"s{splits}_n{block_n}_w{warps}_st{stages}"] = dict(ms=ms, tb_s=nbytes / ms / 1e9)
                except Exception as err:  # noqa: BLE001
                    res[f"s{splits}_n{block_n}_w{warps}_st{stages}"] = dict(error=repr(err)[:100])
    best = min((v["ms"], k) for k, v in res.items() if "ms" in v)
    log(f"kernels: best {best}, KV bytes {nbytes / 1e9:.1f} GB")
    RESULTS["kernels"] = dict(best=best, all=res, kv_gb=nbytes / 1e9)


def bench_extend_kernels() -> None:
    """Extend attention alone (Qwen3-0.6B heads, bf16): a shared-prefix step (127 sequences x 64 new
    tokens after a 2,048-token cached prefix) and a cold prefill (8 x 2,048), over tile configs."""
    import triton.testing
    from miniyaie.attention.triton_kernels import extend_attention
    heads, kv_heads, dim, page = 16, 8, 128, 16
    res = {}
    for name, seqs, q_len, prefix in (("shared_prefix_step", 127, 64, 2048), ("cold_prefill", 8, 2048, 0)):
        seq_len = prefix + q_len
        blocks = seqs * (seq_len // page + 1)
        k_cache = torch.randn(blocks * page, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        tables = torch.randperm(blocks, device="cuda", dtype=torch.int64).to(torch.int32).view(seqs, -1)
        seq_lens = torch.full((seqs,), seq_len, dtype=torch.int32, device="cuda")
        cu = torch.arange(seqs + 1, dtype=torch.int32, device="cuda") * q_len
        q = torch.randn(seqs * q_len, heads, dim, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        flops = 4 * seqs * heads * dim * q_len * (prefix + (q_len + 1) / 2)
        for bm, bn, warps, stages in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                                      (128, 128, 8, 2), (64, 128, 4, 2), (64, 32, 4, 3)):
            key = f"{name}_m{bm}_n{bn}_w{warps}_s{stages}"
            try:
                ms = triton.testing.do_bench(lambda: extend_attention(
                    q, k_cache, v_cache, tables, seq_lens, cu, out, 0.088, page, seqs, q_len,
                    block_m=bm, block_n=bn, num_warps=warps, num_stages=stages), warmup=10, rep=50)
                res[key] = dict(ms=ms, tflops=flops / ms / 1e9)
            except Exception as err:  # noqa: BLE001
                res[key] = dict(error=repr(err)[:100])
            log(f"extend {key}: {res[key]}")
    RESULTS["extend_kernels"] = res


def markdown() -> str:
    lines = []
    t = RESULTS.get("throughput")
    p = RESULTS.get("peers", {})
    if t:
        lines += ["### Offline throughput (nano-vllm workload, Qwen3-0.6B shape, bf16, one H200)", "",
                  "| engine | requests | output tokens | seconds | output tok/s |", "|---|---|---|---|---|",
                  f"| Mini-YAIE (triton + CUDA graphs, overlapped steps) | {t['requests']} | {t['output_tokens']} | "
                  f"{t['seconds']:.1f} | **{t['output_tok_per_s']:,.0f}** |"]
        sync = RESULTS.get("throughput_no_overlap")
        if sync:
            lines.append(f"| Mini-YAIE, steps not overlapped | {sync['requests']} | {sync['output_tokens']} | "
                         f"{sync['seconds']:.1f} | {sync['output_tok_per_s']:,.0f} |")
        for name, r in p.items():
            if "error" in r:
                lines.append(f"| transformers {name} | - | - | - | failed: {r['error'][:80]} |")
            else:
                lines.append(f"| transformers {name} | {r['requests']} (subset) | "
                             f"{r.get('output_tokens', r.get('useful_output_tokens'))} | {r['seconds']:.1f} | "
                             f"{r['output_tok_per_s']:,.0f} |")
        lines += ["", f"Roofline: the steps had to read at least {t['bytes_read_min'] / 1e9:,.0f} GB "
                  f"(weights {t['weight_bytes'] / 1e9:.2f} GB per step + the KV of every context token), "
                  f"{t['roofline_seconds']:.2f} s at 4.3 TB/s: **{t['roofline_fraction']:.0%} of the "
                  f"memory-bandwidth roofline** ({t['steps']} steps).", ""]
    s = RESULTS.get("shared_prefix")
    if s:
        lines += ["### Shared prefix (128 x (2,048 shared + 64 own) tokens, 128 out)", "",
                  "| prefix cache | seconds | output tok/s | mean TTFT (s) | cached prompt tokens |",
                  "|---|---|---|---|---|"]
        for key in ("cache_off", "cache_on"):
            r = s[key]
            lines.append(f"| {key[6:]} | {r['seconds']:.2f} | {r['output_tok_per_s']:,.0f} | "
                         f"{r['mean_ttft_s']:.3f} | {r['cached_tokens']} |")
        lines += ["", f"Speed-up with the cache: **{s['speedup']:.1f}x**.", ""]
    b = RESULTS.get("breakdown")
    if b:
        keys = ["step_ms", "gpu_forward_ms", "schedule_ms", "build_batch_ms", "forward_launch_ms",
                "sample_launch_ms", "read_back_and_append_ms", "telemetry_ms", "rest_ms"]
        lines += ["### Decode step at batch 256 (~1,000-token contexts), ms per step", "",
                  "| | " + " | ".join(k[:-3] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, r in b.items():
            lines.append(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="throughput,peers,shared_prefix,breakdown")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--peer-requests", type=int, default=48)
    parser.add_argument("--static-batches", type=int, default=1)
    parser.add_argument("--gc-tuned", action="store_true",
                        help="gc.freeze() after start-up and gen-0 threshold 50,000 (what we ask the engine to do)")
    args = parser.parse_args(argv)
    if args.gc_tuned:
        import gc as _gc
        _gc.collect()
        _gc.freeze()
        _gc.set_threshold(50_000, 20, 100)
        RESULTS["gc_tuned"] = True
    only = args.only.split(",")
    log(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        hf, loaded = build_models(tmp)
        for name, fn in (("throughput", lambda: bench_throughput(loaded)),
                         ("shared_prefix", lambda: bench_shared_prefix(loaded)),
                         ("breakdown", lambda: bench_breakdown(loaded)),
                         ("profile", lambda: bench_profile(loaded, args.out)),
                         ("kernels", bench_kernels),
                         ("extend_kernels", bench_extend_kernels),
                         ("peers", lambda: bench_peers(hf, args.peer_requests, args.static_batches))):
            if name not in only:
                continue
            try:
                fn()
            except Exception as err:  # noqa: BLE001  (one failing section must not lose the others)
                import traceback
                traceback.print_exc()
                RESULTS[name] = {"error": repr(err)}
            with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
                json.dump(RESULTS, f, indent=1, default=str)
    print(markdown())


if __name__ == "__main__":
    main()

"""The Triton backend and CUDA graphs against the torch backend (and transformers), on CUDA.

Skipped without CUDA. ``TRITON_INTERPRET=1`` runs the kernel tests on the CPU through Triton's
interpreter (slow, small shapes only; triton 3.6's interpreter needs numpy < 2.4) for development
on machines without a GPU.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="needs CUDA (or TRITON_INTERPRET=1)")]

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a real GPU")


def _backends():
    from miniyaie.attention.torch_backend import TorchAttentionBackend
    from miniyaie.attention.triton_backend import TritonAttentionBackend
    return TorchAttentionBackend(), TritonAttentionBackend()


def _random_step(rng: random.Random, specs, block_size: int, num_blocks: int, kv_heads: int,
                 group: int, head_dim: int, dtype: torch.dtype, shared_blocks: int = 0):
    """specs: (prefix_len, q_len) per sequence, extends first. Blocks are drawn at random
    (shuffled, so tables are not contiguous); the pool is filled with random values. The first
    ``shared_blocks`` blocks of every decode sequence's table are the same blocks (a cached prefix)."""
    from miniyaie.attention import ForwardBatch

    blocks = list(range(1, num_blocks))  # block 0 stays unused: padding points there
    rng.shuffle(blocks)
    shared = [blocks.pop() for _ in range(shared_blocks)]
    tables, token_ids, prefix_lens = [], [], []
    for prefix, q_len in specs:
        need = -(-(prefix + q_len) // block_size)
        common = shared[:need] if q_len == 1 else []
        tables.append(common + [blocks.pop() for _ in range(need - len(common))])
        token_ids.append([0] * q_len)
        prefix_lens.append(prefix)
    batch = ForwardBatch.build(token_ids, prefix_lens, tables, [True] * len(specs), block_size, DEVICE)
    if batch.shared_prefix_len and batch.shared_prefix_len_device is None:  # interpreter: tensors on the CPU
        batch.shared_prefix_len_device = torch.tensor([batch.shared_prefix_len], dtype=torch.int32)
    slots = num_blocks * block_size
    gen = torch.Generator(device=DEVICE).manual_seed(rng.randrange(1 << 30))
    k_cache = torch.randn(slots, kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    v_cache = torch.randn(slots, kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    t = batch.num_tokens
    q = torch.randn(t, kv_heads * group, head_dim, generator=gen, device=DEVICE).to(dtype)
    k = torch.randn(t, kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(t, kv_heads, head_dim, generator=gen, device=DEVICE).to(dtype)
    return batch, q, k, v, k_cache, v_cache


def _compare(batch, q, k, v, k_cache, v_cache, dtype, max_seq_len=None):
    torch_be, triton_be = _backends()
    scale = q.shape[-1] ** -0.5
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    torch_be.plan(batch)
    ref = torch_be.forward(q.float(), k.float(), v.float(), kc_ref.float(), vc_ref.float(), scale, batch) \
        if dtype != torch.float32 else torch_be.forward(q, k, v, kc_ref, vc_ref, scale, batch)
    # the reference computes in fp32 from the same (rounded) inputs
    if dtype != torch.float32:
        kc_ref.index_copy_(0, batch.slot_mapping, k)
        vc_ref.index_copy_(0, batch.slot_mapping, v)
    triton_be.plan(batch, max_seq_len=max_seq_len)
    out = triton_be.forward(q, k, v, k_cache, v_cache, scale, batch)
    assert torch.equal(k_cache, kc_ref) and torch.equal(v_cache, vc_ref), "KV store differs"
    assert torch.isfinite(out).all()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    assert err < limit, f"relative error {err:.2e} >= {limit:.0e}"
    return err


def _specs(rng, num_extends, num_decodes, max_prefix, max_q, block_size):
    specs = []
    for _ in range(num_extends):
        prefix = rng.choice([0, rng.randrange(0, max_prefix + 1), block_size * rng.randrange(0, 4)])
        specs.append((prefix, rng.randrange(2, max_q + 1)))
    for _ in range(num_decodes):
        specs.append((rng.randrange(0, max_prefix + 1), 1))
    return specs


SMALL = INTERPRET and not HAS_CUDA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["extend", "decode", "mixed"])
def test_kernels_match_torch(dtype, block_size, group, kind):
    if SMALL and (dtype == torch.bfloat16 or group in (2, 8) or block_size == 32):
        pytest.skip("interpreter: a few cases only")
    rng = random.Random(hash((str(dtype), block_size, group, kind)) & 0xFFFF)
    head_dim = 64 if SMALL else 128
    kv_heads = 2
    max_prefix, max_q = (40, 20) if SMALL else (1500, 300)
    rounds = 1 if SMALL else 3
    for _ in range(rounds):
        n_ext = {"extend": 3, "decode": 0, "mixed": 2}[kind] if SMALL else {"extend": 7, "decode": 0, "mixed": 5}[kind]
        n_dec = {"extend": 0, "decode": 4, "mixed": 3}[kind] if SMALL else {"extend": 0, "decode": 37, "mixed": 19}[kind]
        specs = _specs(rng, n_ext, n_dec, max_prefix, max_q, block_size)
        blocks_needed = sum(-(-(p + n) // block_size) for p, n in specs) + 2
        step = _random_step(rng, specs, block_size, blocks_needed + 5, kv_heads, group, head_dim, dtype)
        _compare(*step, dtype)


@pytest.mark.parametrize("num_splits_hint", [None, 40000])
def test_decode_split_k_long_contexts(num_splits_hint):
    """Few long sequences: the split-K path (and its reduce) against one-split results."""
    rng = random.Random(7)
    dtype = torch.float32
    lengths = [5, 16, 17, 31, 33] if SMALL else [1, 15, 16, 17, 1000, 4095, 4096, 7777]
    bs = 16
    specs = [(n - 1, 1) for n in lengths]
    blocks = sum(-(-n // bs) for n in lengths) + 3
    step = _random_step(rng, specs, bs, blocks, 2, 4, 64, dtype)
    _compare(*step, dtype, max_seq_len=num_splits_hint)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_cascade_decode_over_a_shared_prefix(dtype, block_size, group):
    """Decodes whose tables start with the same blocks: the shared part is attended once for all
    (cascade) and merged with each sequence's own part; eager and graph-style plans."""
    if SMALL and (dtype == torch.bfloat16 or group in (2, 8) or block_size == 32):
        pytest.skip("interpreter: a few cases only")
    rng = random.Random(hash(("cascade", str(dtype), block_size, group)) & 0xFFFF)
    head_dim = 64 if SMALL else 128
    shared_blocks = 3 if SMALL else rng.choice([5, 64, 130])
    shared = shared_blocks * block_size
    own = [1, 2, 15, 40, 300] if not SMALL else [1, 7, 20]
    num_decodes = 5 if SMALL else rng.choice([2, 37, 130])
    # extends in front (1 or 2: the decode rows then start at sequence 1 or 2)
    specs = [(rng.randrange(0, 300), rng.randrange(2, 200)) for _ in range(0 if SMALL else 1 + group % 2)]
    specs += [(shared + rng.choice(own) - 1, 1) for _ in range(num_decodes)]
    blocks = sum(-(-(p + n) // block_size) for p, n in specs) + 5
    step = _random_step(rng, specs, block_size, blocks, 2, group, head_dim, dtype, shared_blocks=shared_blocks)
    assert step[0].shared_prefix_len == shared
    _compare(*step, dtype)
    _compare(*step, dtype, max_seq_len=shared + 400)  # as captured in a graph: the length is read on the device


def test_cascade_caps_at_the_shortest_sequence():
    """A sequence that ends inside the blocks the others share bounds the shared part."""
    rng = random.Random(11)
    bs, dtype = 16, torch.float32
    specs = [(2 * bs + 3, 1), (5 * bs + 9, 1), (3 * bs, 1)]
    step = _random_step(rng, specs, bs, 40, 2, 2, 64, dtype, shared_blocks=3)
    assert step[0].shared_prefix_len == 2 * bs + 4
    _compare(*step, dtype)


def test_split_heuristic():
    from miniyaie.attention.triton_backend import num_decode_splits
    assert num_decode_splits(256, 8, 2048, 132) == 1
    assert num_decode_splits(1, 8, 40960, 132) == 16
    assert num_decode_splits(1, 8, 100, 132) == 1
    for b in (1, 3, 64, 300):
        s = num_decode_splits(b, 4, 5000, 132)
        assert s & (s - 1) == 0 and 1 <= s <= 16


# ---- engine level (real GPU only) ----------------------------------------------------------------

def _tiny_llama(tmp_path, **overrides):
    from transformers import LlamaConfig
    cfg = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
               num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
               rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None)
    cfg.update(overrides)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    path = tmp_path / "tiny"
    path.mkdir(exist_ok=True)
    config.save_pretrained(path)
    return str(path), config


def _prompts(n, vocab, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(1, 200))] for _ in range(n)]


@needs_cuda
def test_engine_triton_graphs_equal_torch_backend_fp32(tmp_path):
    from miniyaie import Engine, EngineConfig, SamplingParams
    path, _ = _tiny_llama(tmp_path)
    prompts = _prompts(24, 512)
    # a shared prefix (prefix-cache hits ending mid-block) and a repeated prompt
    prompts += [prompts[0][:37] + [5, 6, 7], prompts[0][:37] + [9], prompts[3]]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    results = {}
    for backend, graphs, overlap in (("torch", False, False), ("triton", True, True), ("triton", True, False),
                                     ("triton", False, True)):
        engine = Engine(EngineConfig(model=path, load_format="dummy", device="cuda", dtype="float32",
                                     attention_backend=backend, cuda_graphs=graphs, num_blocks=600,
                                     max_num_seqs=16, max_num_batched_tokens=256, seed=3,
                                     overlap_schedule=overlap))
        if graphs:
            assert engine.runner.graphs is not None
        outs = engine.generate(prompts, params)
        results[(backend, graphs, overlap)] = [o.token_ids for o in outs]
        if graphs:
            assert engine.runner.graphs.num_replays > 0
        engine.clear_cache()
        engine.check_integrity()
        del engine
    ref = results[("torch", False, False)]
    for key, got in results.items():
        mismatches = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
        assert not mismatches, f"{key}: prompts {mismatches} differ from the torch backend"


@needs_cuda
def test_cascade_decode_in_the_engine_equals_torch_backend_fp32(tmp_path):
    """Requests decoding together after a cached system prompt share its blocks, so the triton
    backend attends to it once per step (cascade), in CUDA graphs and eagerly: greedy tokens
    equal the torch backend's."""
    from miniyaie import Engine, EngineConfig, SamplingParams
    path, _ = _tiny_llama(tmp_path)
    rng = random.Random(5)
    system = [rng.randrange(512) for _ in range(150)]
    prompts = [system + [rng.randrange(512) for _ in range(rng.randrange(1, 30))] for _ in range(14)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    results = {}
    for backend, graphs in (("torch", False), ("triton", True), ("triton", False)):
        engine = Engine(EngineConfig(model=path, load_format="dummy", device="cuda", dtype="float32",
                                     attention_backend=backend, cuda_graphs=graphs, num_blocks=600,
                                     max_num_seqs=16, max_num_batched_tokens=512, seed=3))
        engine.generate([system + [1]], params)  # puts the system prompt's blocks in the cache
        shared_lens = []
        forward = engine.runner.forward
        engine.runner.forward = lambda batch: (shared_lens.append(batch.shared_prefix_len), forward(batch))[1]
        results[backend, graphs] = [o.token_ids for o in engine.generate(prompts, params)]
        del engine.runner.forward  # the wrapper refers to the runner: no cycle left behind
        assert max(shared_lens) >= 144, "the decoding requests did not share the system prompt's blocks"
        engine.check_integrity()
        del engine
    ref = results["torch", False]
    for key, got in results.items():
        mismatches = [i for i, (a, b) in enumerate(zip(ref, got)) if a != b]
        assert not mismatches, f"{key}: prompts {mismatches} differ from the torch backend"


@needs_cuda
def test_overlapped_steps_answer_exactly_as_sequential_ones(tmp_path):
    """On the GPU, where the overlap is real: seeded sampling, penalties, stop tokens and lengths
    give the very same tokens with step N+1 launched before step N is read back."""
    from miniyaie import Engine, EngineConfig, SamplingParams
    path, _ = _tiny_llama(tmp_path)
    prompts = _prompts(20, 512, seed=4)
    kinds = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
             SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True),
             SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.2, ignore_eos=True),
             SamplingParams(max_tokens=40, temperature=1.0, top_k=20, seed=5, stop_token_ids=list(range(0, 512, 7)))]
    params = [kinds[i % len(kinds)] for i in range(len(prompts))]
    results = {}
    for overlap in (False, True):
        engine = Engine(EngineConfig(model=path, load_format="dummy", device="cuda", dtype="float32",
                                     attention_backend="triton", num_blocks=400, max_num_seqs=8,
                                     max_num_batched_tokens=256, seed=3, overlap_schedule=overlap))
        assert engine.overlap == overlap
        outs = engine.generate(prompts, params)
        results[overlap] = [(o.token_ids, o.finish_reason) for o in outs]
        engine.clear_cache()
        engine.check_integrity()
        del engine
    assert results[True] == results[False]
    assert any(reason == "stop" for _, reason in results[True])


@needs_cuda
def test_bf16_logits_close_to_transformers(tmp_path):
    """Our bf16 network (Triton attention) against transformers' bf16 model on the same weights."""
    from transformers import AutoModelForCausalLM
    from miniyaie import Engine, EngineConfig
    from miniyaie.attention import ForwardBatch
    from miniyaie.loader import LoadedModel

    path, config = _tiny_llama(tmp_path)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16).cuda().eval()
    weights = {k: v for k, v in hf.state_dict().items()}
    engine = Engine(EngineConfig(model=path, device="cuda", dtype="bfloat16", attention_backend="triton",
                                 num_blocks=64, cuda_graphs=False),
                    loaded=LoadedModel("tiny", config, None, weights, path))
    ids = _prompts(1, 512, seed=5)[0][:150] + [1, 2, 3]
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    kv = engine.runner.kv
    table = kv.allocate(-(-len(ids) // kv.block_size))
    batch = ForwardBatch.build([ids], [0], [table], [True], kv.block_size, engine.runner.device)
    batch.logits_indices = torch.arange(len(ids), device="cuda")
    ours = engine.runner.forward(batch)
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err < 2e-2, f"bf16 logits relative error {err:.3e}"
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, f"argmax agrees on only {agree:.0%} of positions"


@needs_cuda
def test_graph_replay_matches_eager_bf16(tmp_path):
    """A decode step through a CUDA graph (padded batch) gives the eager step's logits. In bf16 the
    two differ by rounding only (other GEMM shapes, other split counts), so greedy tokens may
    diverge after many steps; the exact-token check is the fp32 engine test above."""
    from miniyaie import Engine, EngineConfig
    from miniyaie.attention import ForwardBatch
    path, _ = _tiny_llama(tmp_path)
    engine = Engine(EngineConfig(model=path, load_format="dummy", device="cuda", dtype="bfloat16",
                                 attention_backend="triton", cuda_graphs=True, num_blocks=400, seed=1))
    runner, kv = engine.runner, engine.runner.kv
    prompts = _prompts(13, 512, seed=9)
    tables = [kv.allocate(-(-(len(p) + 1) // kv.block_size)) for p in prompts]
    prefill = ForwardBatch.build(prompts, [0] * 13, tables, [True] * 13, kv.block_size, runner.device)
    runner.forward(prefill)
    nxt = [[7] for _ in prompts]
    decode = ForwardBatch.build(nxt, [len(p) for p in prompts], tables, [True] * 13, kv.block_size,
                                runner.device)
    assert runner.graphs.can_run(decode)
    graphed = runner.forward(decode)  # replays the size-16 graph (3 padding rows)
    graphs, runner.graphs = runner.graphs, None
    eager = runner.forward(decode)
    runner.graphs = graphs
    err = ((graphed - eager).norm() / eager.norm()).item()
    assert err < 1e-2, f"graph vs eager relative error {err:.2e}"
    assert (graphed.argmax(-1) == eager.argmax(-1)).float().mean() > 0.9

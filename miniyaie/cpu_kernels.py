"""The CPU's C kernels (``miniyaie/csrc/*.c``): compiled on first use with the machine's C
compiler into one library, cached, and called through ctypes on torch tensors' memory.

- ``paged_attention``: attention reading K/V in place from the paged pool (the ``cpu`` attention
  backend): extending sequences through ``paged_extend_attention``, decoding ones through
  ``paged_decode_attention``; ``write_kv`` stores a step's new K/V rows into their slots.
- ``linear``: every fp32 Linear on the CPU, decode steps and prefill chunks (``CpuLinear``), on
  fp32 weights or on their exact block codes (``find_block_codes``); Q4_1's codes, laid out by
  ``q4_panels``, multiply in integers where the CPU has AVX-512 VNNI (``linear_q4.c``).
- ``rms_norm``, ``silu_and_mul``, ``rotary``: the small ops between the matrix products, one call
  each instead of several torch ops (``miniyaie/model.py`` uses them for fp32 on the CPU).
- ``sample_rows``: the sampling pipeline — temperature, top-k, top-p, min-p, the token, its
  log-probability and the most likely alternatives (``miniyaie/sampling.py``).
- ``forward_step``: a whole forward step in one call (embedding, layers, final norm, head),
  stringing the kernels above together (``miniyaie/cpu_forward.py``).

Compiling takes a few seconds and happens once per machine: the library is cached under the
model cache (``$MINIYAIE_CACHE/kernels``), named by a hash of the sources, the flags, the compiler
and the CPU (it is built with ``-march=native``, so a cache carried to another CPU is rebuilt).
Where there is no C compiler the kernels are not available and torch's ops do the work.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from miniyaie.loader import default_cache_dir, default_progress

if TYPE_CHECKING:
    from miniyaie.attention.batch import ForwardBatch

SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.c"))
HEADERS = sorted(Path(__file__).with_name("csrc").glob("*.h"))
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
MAX_GROUP, MAX_HEAD_DIM, MAX_BLOCK = 16, 256, 256  # the C arrays' bounds (paged_*_attention.c)
MAX_TOP = 64  # the most alternatives sample_rows reports (sampling.c)
BLOCK_CODE_SIZE = 32  # weights per (scale, offset) of block codes (BLOCK in linear.c)
GREEDY_LANES = 16  # vocabulary rows side by side in a HeadScreen (LANES in greedy_head.c), and weight rows in Q4Panels
Q4_TILE_COLS = 32  # weight rows a tile of linear_q4 covers: Q4Panels pads to a multiple (TILE_COLS in linear_q4.c)


def _cpu_description() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as cpuinfo:
            return b"".join(line for line in cpuinfo if line.startswith((b"model name", b"flags")))
    except OSError:
        return os.uname().machine.encode()


@functools.lru_cache(maxsize=None)
def load_cpu_kernels() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        default_progress("no C compiler found (cc/gcc): the Linears, decode attention and the small ops run on "
             "torch's, which are slower on the CPU; install gcc to use the C kernels")
        return None
    sources = [source.read_bytes() for source in SOURCES + HEADERS]  # a header change rebuilds too
    version = subprocess.run([compiler, "--version"], capture_output=True).stdout
    key = hashlib.sha256(b"\0".join([*sources, " ".join(FLAGS).encode(), version, _cpu_description()])).hexdigest()[:16]
    folder = os.path.join(default_cache_dir(), "kernels")
    path = os.path.join(folder, f"cpu_kernels-{key}.so")
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)  # then renamed: concurrent builds don't clash
        os.close(fd)
        built = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", partial, "-lm"],
                               capture_output=True, text=True)
        if built.returncode != 0:
            os.unlink(partial)
            default_progress(f"could not compile the CPU kernels ({compiler}: {built.stderr.strip()[:300]}); "
                 "torch's ops do their work")
            return None
        os.replace(partial, path)
    # loaded after torch, so its libgomp.so.1 resolves to the OpenMP runtime torch loaded: one thread pool
    lib = ctypes.CDLL(path)
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.paged_attention.argtypes = [ptr, i64, ptr, ptr, ctypes.POINTER(StepBatch), ptr, i32, i32, i32, i32,
                                    ctypes.c_float]
    lib.linear.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32]
    lib.linear.restype = None
    lib.find_block_codes.argtypes = [ptr, i32, i32, ptr, ptr, ptr]
    lib.find_block_codes.restype = i32
    lib.q4_products_fast.restype = i32
    lib.q4_layout.argtypes = [ptr, ptr, ptr, i32, i32, Q4Panels.Struct]
    lib.q4_layout.restype = i32
    lib.linear_q4.argtypes = [ptr, Q4Panels.Struct, ptr, ptr, i32, i32, i32]
    lib.linear_q4.restype = None
    lib.rms_norm.argtypes = [ptr, i64, ptr, ptr, i32, i32, ctypes.c_float]
    lib.silu_and_mul.argtypes = [ptr, ptr, i32, i32]
    lib.rotary.argtypes = [ptr, i64, ptr, ptr, ptr, i32, i32, i32]
    lib.write_kv.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i32, i32]
    lib.greedy_head_fast.restype = i32
    lib.head_screen_layout.argtypes = [ptr, ptr, ptr, i32, i32, ptr, ptr, ptr, ptr, ptr]
    lib.head_screen_layout.restype = i32
    lib.greedy_head.argtypes = [ptr, i32, ptr, ptr, ptr, ptr, i32, i32, ptr]
    lib.sample_rows.argtypes = [ptr, i32, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, ptr, ptr, ptr, ptr]
    for name in ("paged_attention", "rms_norm", "silu_and_mul", "rotary", "write_kv", "sample_rows", "greedy_head"):
        getattr(lib, name).restype = None
    return lib


def handles(x: torch.Tensor) -> bool:
    """Whether ``x``'s ops go through the C kernels: fp32 on the CPU, where they compiled. One call
    there replaces several torch ops, whose dispatch outweighs their arithmetic at decode batch
    sizes; torch's ops stay the reference and the path everywhere else."""
    return x.is_cpu and x.dtype == torch.float32 and load_cpu_kernels() is not None


def kernel_supports(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
    return (num_heads // num_kv_heads <= MAX_GROUP and head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0
            and block_size <= MAX_BLOCK)


class StepBatch(ctypes.Structure):
    """``step_batch`` of ``csrc/layers.c``: where a step's tokens go, as pointers into a
    ``ForwardBatch``'s tensors (which must outlive it)."""

    _fields_ = [("num_seqs", ctypes.c_int32), ("num_extends", ctypes.c_int32), ("block_tables", ctypes.c_void_p),
                ("table_stride", ctypes.c_int64), ("seq_lens", ctypes.c_void_p), ("cu_q_lens", ctypes.c_void_p),
                ("slots", ctypes.c_void_p), ("input_ids", ctypes.c_void_p), ("positions", ctypes.c_void_p),
                ("logits_indices", ctypes.c_void_p), ("num_logits", ctypes.c_int32),
                ("shared_prefix_len", ctypes.c_int32)]

    @classmethod
    def of(cls, batch: ForwardBatch) -> StepBatch:
        tables, seq_lens, cu_q_lens = batch.block_tables, batch.seq_lens, batch.cu_q_lens
        assert tables.dtype == seq_lens.dtype == cu_q_lens.dtype == torch.int32 and tables.stride(1) == 1
        assert seq_lens.is_contiguous() and cu_q_lens.is_contiguous()
        per_token = (batch.slot_mapping, batch.input_ids, batch.positions, batch.logits_indices)
        assert all(t.dtype == torch.int64 and t.is_contiguous() for t in per_token)
        return cls(batch.num_seqs, batch.num_extends, tables.data_ptr(), tables.stride(0), seq_lens.data_ptr(),
                   cu_q_lens.data_ptr(), *(t.data_ptr() for t in per_token), batch.logits_indices.numel(),
                   batch.shared_prefix_len)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                    scale: float) -> torch.Tensor:
    """The attention of every query row of ``q`` ([T, H, D], fp32, rows of heads contiguous) over
    its sequence's blocks of the pool, causal within the step's new tokens, as [T, H, D]."""
    assert q.dtype == k_cache.dtype == torch.float32 and q.stride(2) == 1 and q.stride(1) == q.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    tokens, heads, head_dim = q.shape
    out = torch.empty(tokens, heads, head_dim)
    load_cpu_kernels().paged_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                                       ctypes.byref(StepBatch.of(batch)), out.data_ptr(), heads, k_cache.shape[1],
                                       head_dim, batch.block_size, scale)
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """``k_cache[slots[t]] = k[t]`` and ``v_cache[slots[t]] = v[t]`` for fp32 ``k``, ``v`` [T, KVH, D]
    whose tokens' rows are contiguous (strided tokens allowed) and int64 ``slots`` [T]."""
    assert k.dtype == v.dtype == k_cache.dtype == torch.float32 and slots.dtype == torch.int64 and slots.is_contiguous()
    assert k[0].is_contiguous() and v[0].is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    load_cpu_kernels().write_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                                v_cache.data_ptr(), slots.data_ptr(), k.shape[0], k[0].numel())


@dataclass(frozen=True)
class BlockCodes:
    """A weight [n, k] held as int8 codes with one (scale, offset) per block of 32 along k, such that
    ``weight == scales * codes + offsets`` exactly, value for value (GGUF's Q4_1 and Q8_0 layouts)."""

    codes: torch.Tensor    # int8 [n, k]
    scales: torch.Tensor   # fp32 [n, k // 32]
    offsets: torch.Tensor  # fp32 [n, k // 32]


def find_block_codes(weight: torch.Tensor) -> BlockCodes | None:
    """The block codes of an fp32 ``weight`` [n, k], or None when it has none: some block is not
    exactly a float16 scale times Q4_1's [0, 15] plus its minimum, or times Q8_0's [-127, 127]."""
    n, k = weight.shape
    if weight.dtype != torch.float32 or k % BLOCK_CODE_SIZE:
        return None
    weight = weight.detach().contiguous()
    codes = BlockCodes(torch.empty(n, k, dtype=torch.int8), torch.empty(n, k // BLOCK_CODE_SIZE),
                       torch.empty(n, k // BLOCK_CODE_SIZE))
    exact = load_cpu_kernels().find_block_codes(weight.data_ptr(), n, k, codes.codes.data_ptr(),
                                                codes.scales.data_ptr(), codes.offsets.data_ptr())
    return codes if exact else None


@dataclass(frozen=True)
class Q4Panels:
    """A weight's Q4_1 block codes (every code in [0, 15]) laid out for ``linear_q4``
    (``csrc/linear_q4.c``): 16 weight rows side by side, their codes 4 along k at a time, and per
    block their scales and offsets; rows padded to a multiple of 32 with zeros. As many bytes as the
    codes. ``struct`` is the C ``q4_panels``, pointing into these tensors."""

    class Struct(ctypes.Structure):
        _fields_ = [(name, ctypes.c_void_p) for name in ("codes", "scales", "offsets")]

    codes: torch.Tensor    # uint8 [panels, k // 4, 16, 4]
    scales: torch.Tensor   # fp32 [panels, k // 32, 16]
    offsets: torch.Tensor  # fp32 [panels, k // 32, 16]
    out_features: int

    @property
    def struct(self) -> Q4Panels.Struct:
        return self.Struct(self.codes.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr())


def q4_panels(codes: BlockCodes) -> Q4Panels | None:
    """``codes`` laid out for ``linear_q4``, or None when some code is outside Q4_1's [0, 15]."""
    n, k = codes.codes.shape
    panels, blocks = -(-n // Q4_TILE_COLS) * Q4_TILE_COLS // GREEDY_LANES, k // BLOCK_CODE_SIZE
    q4 = Q4Panels(torch.empty(panels, k // 4, GREEDY_LANES, 4, dtype=torch.uint8),
                  torch.empty(panels, blocks, GREEDY_LANES), torch.empty(panels, blocks, GREEDY_LANES), n)
    fits = load_cpu_kernels().q4_layout(codes.codes.data_ptr(), codes.scales.data_ptr(), codes.offsets.data_ptr(),
                                        n, k, q4.struct)
    return q4 if fits else None


def multiplies_q4_codes_fast() -> bool:
    """Whether ``linear_q4`` beats the fp32 kernel on Q4_1 codes here: it takes AVX-512 VNNI (without
    it the same arithmetic runs in plain C, for the tests)."""
    lib = load_cpu_kernels()
    return lib is not None and bool(lib.q4_products_fast())


class HeadScreen:
    """A head's block codes laid out for ``greedy_head``'s integer screen (``csrc/greedy_head.c``):
    16 vocabulary rows side by side, their codes 4 at a time as unsigned bytes (code + 128), and
    per block their scales, offsets and sums of |weight|. Built once from the head's ``BlockCodes``;
    as large again as the codes (SmolLM2: 28 MB, and 10 MB of block values). ``struct`` is the C
    ``head_screen``, pointing into the tensors held here."""

    class Struct(ctypes.Structure):
        _fields_ = ([(name, ctypes.c_void_p) for name in ("codes4", "scales", "offsets", "l1", "l1_peaks")]
                    + [("any_offsets", ctypes.c_int32)])

    def __init__(self, codes: BlockCodes) -> None:
        n, k = codes.codes.shape
        panels, blocks = -(-n // GREEDY_LANES), k // BLOCK_CODE_SIZE
        self.codes4 = torch.empty(panels, k // 4, GREEDY_LANES, 4, dtype=torch.uint8)
        self.scales, self.offsets, self.l1 = (torch.empty(panels, blocks, GREEDY_LANES) for _ in range(3))
        self.l1_peaks = torch.empty(n)
        tensors = (self.codes4, self.scales, self.offsets, self.l1, self.l1_peaks)
        any_offsets = load_cpu_kernels().head_screen_layout(
            codes.codes.data_ptr(), codes.scales.data_ptr(), codes.offsets.data_ptr(), n, k, *(t.data_ptr() for t in tensors))
        self.struct = self.Struct(*(t.data_ptr() for t in tensors), any_offsets)


def screens_greedy_head() -> bool:
    """Whether ``greedy_head`` beats the full head here: its integer screen takes AVX-512 VNNI
    (without it the same scores come from plain C: exact, but slower than the fp32 head)."""
    lib = load_cpu_kernels()
    return lib is not None and bool(lib.greedy_head_fast())


def greedy_head(x: torch.Tensor, codes: BlockCodes, screen: HeadScreen) -> torch.Tensor:
    """``linear(x, codes).argmax(-1)`` (its first maximum, from the fp32 kernel's very logits) for
    contiguous fp32 ``x`` [m, k], without most of the logits: an integer screen rules out the tokens
    that cannot be the maximum (``csrc/greedy_head.c``)."""
    n, k = codes.codes.shape
    assert x.dim() == 2 and x.shape[1] == k and x.is_contiguous() and x.dtype == torch.float32
    tokens = torch.empty(x.shape[0], dtype=torch.int64)
    load_cpu_kernels().greedy_head(x.data_ptr(), x.shape[0], codes.codes.data_ptr(), codes.scales.data_ptr(),
                                   codes.offsets.data_ptr(), ctypes.byref(screen.struct), n, k, tokens.data_ptr())
    return tokens


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's address for a C argument; None (NULL) for no tensor."""
    return None if t is None else t.data_ptr()


KernelWeight = torch.Tensor | BlockCodes | Q4Panels  # what the C Linears read: fp32 rows or codes


def weight_pointers(weight: torch.Tensor | BlockCodes) -> tuple[int | None, int | None, int | None, int | None]:
    """The C ``linear``'s (weight, codes, scales, offsets) arguments for a contiguous fp32 weight
    (the last three None) or for its ``BlockCodes`` (the first None)."""
    if isinstance(weight, BlockCodes):
        return None, weight.codes.data_ptr(), weight.scales.data_ptr(), weight.offsets.data_ptr()
    assert weight.is_contiguous() and weight.dtype == torch.float32
    return weight.data_ptr(), None, None, None


def linear(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for contiguous fp32 ``x`` [m, k], with k a multiple of 8 and
    ``weight`` contiguous fp32 [n, k], its ``BlockCodes`` or its ``Q4Panels``."""
    assert x.dim() == 2 and x.is_contiguous() and x.dtype == torch.float32 and x.shape[1] % 8 == 0
    if isinstance(weight, Q4Panels):
        y = torch.empty(x.shape[0], weight.out_features)
        load_cpu_kernels().linear_q4(x.data_ptr(), weight.struct, pointer(bias), y.data_ptr(), x.shape[0],
                                     weight.out_features, x.shape[1])
        return y
    n = (weight.codes if isinstance(weight, BlockCodes) else weight).shape[0]
    y = torch.empty(x.shape[0], n)
    load_cpu_kernels().linear(x.data_ptr(), *weight_pointers(weight), pointer(bias),
                              y.data_ptr(), x.shape[0], n, x.shape[1])
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``model.rms_norm`` for fp32 ``x`` [..., dim] whose rows are contiguous."""
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)
    assert x.dtype == weight.dtype == torch.float32 and rows.stride(1) == 1 and weight.is_contiguous()
    out = torch.empty(x.shape)
    load_cpu_kernels().rms_norm(rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(),
                                rows.shape[0], dim, eps)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``model.silu_and_mul`` for contiguous fp32 ``x`` [..., 2 * half]."""
    assert x.dtype == torch.float32 and x.is_contiguous()
    half = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], half)
    load_cpu_kernels().silu_and_mul(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], half)
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``model.rotate`` for fp32 ``x`` [T, heads, D] (heads contiguous within a token) and the
    contiguous [T, 1, D] tables of ``RotaryEmbedding``."""
    tokens, heads, head_dim = x.shape
    assert x.dtype == cos.dtype == torch.float32 and x.stride(2) == 1 and x.stride(1) == head_dim
    assert cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape == (tokens, 1, head_dim)
    out = torch.empty(x.shape)
    load_cpu_kernels().rotary(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                              tokens, heads, head_dim)
    return out


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor | None, top_ks: torch.Tensor | None,
                top_ps: torch.Tensor | None, min_ps: torch.Tensor | None, greedy: list[bool],
                uniforms: torch.Tensor | None, num_top: int, want_logprob: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``SamplingKernel``'s pipeline after the penalties, for contiguous fp32 ``logits`` [B, V]: per
    row the token, its log-probability and the ``num_top`` (<= MAX_TOP) most likely ids with their
    probabilities, most likely first, under the processed distribution. Parameters are per row
    (float32, top_ks int64); None means the stage is off for every row. ``uniforms`` (float64) are
    read for sampled rows only. A greedy row nobody asked a log-probability or alternatives of gets
    NaN: its normaliser is skipped."""
    assert logits.dtype == torch.float32 and logits.is_contiguous() and 0 <= num_top <= MAX_TOP
    rows, vocab = logits.shape
    for values, dtype in ((temperatures, torch.float32), (top_ks, torch.int64), (top_ps, torch.float32),
                          (min_ps, torch.float32), (uniforms, torch.float64)):
        assert values is None or (values.dtype == dtype and values.is_contiguous() and values.shape == (rows,))
    flags = bytes(greedy)  # one byte a row, 1 = greedy
    token, logprob = torch.empty(rows, dtype=torch.int64), torch.empty(rows)
    top_ids, top_probs = torch.empty(rows, num_top, dtype=torch.int64), torch.empty(rows, num_top)
    load_cpu_kernels().sample_rows(logits.data_ptr(), rows, vocab, *map(pointer, (temperatures, top_ks, top_ps, min_ps)),
                                   flags, pointer(uniforms), num_top, int(want_logprob), token.data_ptr(),
                                   logprob.data_ptr(), top_ids.data_ptr(), top_probs.data_ptr())
    return token, logprob, top_ids, top_probs

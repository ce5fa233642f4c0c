"""The CPU's C kernels (``miniyaie/csrc/*.c``): compiled on first use with the machine's C
compiler into one library, cached, and called through ctypes on torch tensors' memory.

- ``paged_decode_attention``: decode attention reading K/V in place from the paged pool
  (the ``cpu`` attention backend).
- ``gemv``: a Linear applied to one token (``PackedLinear`` at decode batches of one).

Compiling takes about a second and happens once per machine: the library is cached under the
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
from pathlib import Path

import torch

from miniyaie.loader import default_cache_dir, default_progress

SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.c"))
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC"]
MAX_GROUP, MAX_HEAD_DIM, MAX_BLOCK = 16, 256, 256  # the C arrays' bounds (paged_decode_attention.c)


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
        default_progress("no C compiler found (cc/gcc): decode attention and one-token Linears run on torch's ops, "
             "which are slower on the CPU; install gcc to use the C kernels")
        return None
    sources = [source.read_bytes() for source in SOURCES]
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
    lib.paged_decode_attention.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64,
                                           i32, i32, i32, i32, i32, ctypes.c_float]
    lib.paged_decode_attention.restype = None
    lib.gemv.argtypes = [ptr, ptr, ptr, ptr, i32, i32]
    lib.gemv.restype = None
    return lib


def kernel_supports(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> bool:
    return num_heads // num_kv_heads <= MAX_GROUP and head_dim <= MAX_HEAD_DIM and block_size <= MAX_BLOCK


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, out: torch.Tensor,
                           scale: float, block_size: int) -> None:
    """``out[b]`` = the attention of query ``q[b]`` ([B, H, D], fp32) over the first
    ``seq_lens[b]`` tokens of sequence b's blocks (``block_tables`` [B, W] int32)."""
    assert q.dtype == k_cache.dtype == torch.float32 and q.stride(2) == 1 and out.stride(2) == 1
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.dtype == seq_lens.dtype == torch.int32 and block_tables.stride(1) == 1 and seq_lens.is_contiguous()
    num_seqs, num_heads, head_dim = q.shape
    load_cpu_kernels().paged_decode_attention(
        q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
        out.data_ptr(), out.stride(0), out.stride(1),
        num_seqs, num_heads, k_cache.shape[1], head_dim, block_size, scale)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of one fp32 row ``x`` [1, k] (contiguous) with ``weight`` [n, k] (contiguous)."""
    assert x.shape[0] == 1 and x.is_contiguous() and weight.is_contiguous() and x.dtype == weight.dtype == torch.float32
    n, k = weight.shape
    y = torch.empty(1, n)
    load_cpu_kernels().gemv(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), n, k)
    return y

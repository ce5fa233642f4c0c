"""KVCacheManager: the paged KV pool and its blocks' reference counts."""
from __future__ import annotations

import heapq
import math
import mmap

import torch


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class KVCacheManager:
    """Owns the KV pool — one K and one V tensor per layer, ``[num_slots, kv_heads, head_dim]``,
    where ``num_slots = num_blocks * block_size`` — and each block's reference count.

    A *slot* holds one token's K/V; a *block* is ``block_size`` consecutive slots, the unit of
    allocation and of prefix sharing. Block ``b`` covers slots ``b*block_size .. (b+1)*block_size-1``.

    Invariants: a block is free iff its reference count is 0; the free list holds each free block
    exactly once; every holder (a running request, the radix tree) holds exactly one reference.
    Allocation takes the lowest-numbered free blocks; allocate and free are O(log num_blocks) per block.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k_pool = _zeros(shape, dtype, device)
        self.v_pool = _zeros(shape, dtype, device)
        self.ref_counts = [0] * num_blocks
        # A min-heap: the lowest free block goes first, so the blocks in use stay packed at the start
        # of each layer's pool. On the CPU that keeps the memory a step touches compact: few fresh
        # pages to fault in (~2% of a 16-chat burst on the 2-core dev machine, measured before the
        # pool got huge pages, against FIFO order, which spread each burst over pages never touched
        # before), and few huge pages (see _zeros) for attention's reads to translate.
        self._free: list[int] = list(range(num_blocks))

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with reference count 1 (held by the caller)."""
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [heapq.heappop(self._free) for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        """Add a holder to blocks that are already held (sharing a cached prefix)."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"incref of free block {b}")
            self.ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one holder from each block; blocks nobody holds go back to the free list."""
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"release of free block {b}: double free")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                heapq.heappush(self._free, b)

    def check_integrity(self) -> None:
        free = list(self._free)
        if len(set(free)) != len(free):
            raise AssertionError("a block is on the free list twice")
        free_set = set(free)
        for b in range(self.num_blocks):
            if self.ref_counts[b] < 0:
                raise AssertionError(f"block {b} has negative reference count")
            if (self.ref_counts[b] == 0) != (b in free_set):
                raise AssertionError(
                    f"block {b}: ref count {self.ref_counts[b]} but "
                    f"{'on' if b in free_set else 'not on'} the free list")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled pool. On the CPU an anonymous memory mapping: the OS maps zeroed pages in as
    they are first written, where torch.zeros writes every byte up front (0.8 s of start-up for the
    demo's 2 x 1 GiB on the 2-core machine), and it asks for transparent huge pages where the
    kernel grants them on request: decode attention reads blocks spread over the pool, and one 2 MiB
    page covers what 512 TLB entries would. The mapping is private: a shared one (Python's default)
    is shared memory, which the kernel does not back with huge pages unless told to system-wide
    (decode attention over 30 cold layers of the chat burst: ~4% faster on huge pages)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    memory = mmap.mmap(-1, math.prod(shape) * torch.empty((), dtype=dtype).element_size(), flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps the mapping alive

"""KVCacheManager: allocation, sharing and release keep every block owned by exactly its holders."""
from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from miniyaie.kv_cache import KVCacheManager, OutOfBlocks


def make_kv(num_blocks: int = 8, block_size: int = 4) -> KVCacheManager:
    return KVCacheManager(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=num_blocks,
                          block_size=block_size, dtype=torch.float32, device=torch.device("cpu"))


def test_pool_shape_and_bytes():
    kv = make_kv(num_blocks=5, block_size=4)
    assert kv.k_pool.shape == (2, 20, 2, 8) and kv.v_pool.shape == (2, 20, 2, 8)
    assert KVCacheManager.bytes_per_block(2, 2, 8, 4, torch.float32) == 2 * 2 * 4 * 2 * 8 * 4
    assert kv.num_free_blocks == 5 and kv.usage == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_starts_zeroed_writable_and_separate(dtype):
    """On the CPU the pool is an anonymous memory mapping: still zeros, contiguous, and K apart from V
    (the torch backend reads padding slots, masked, and would turn garbage NaNs into NaN outputs),
    small or large, and alive as long as the tensor is."""
    for num_blocks in (5, 4096):
        kv = KVCacheManager(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=num_blocks, block_size=16,
                            dtype=dtype, device=torch.device("cpu"))
        assert kv.k_pool.dtype == dtype and kv.k_pool.is_contiguous() and not kv.k_pool.any() and not kv.v_pool.any()
        k_pool, v_pool = kv.k_pool, kv.v_pool
        del kv
        k_pool[1, -1] = 1.0
        assert k_pool.sum() == 16 and not v_pool.any()


def _mapping_of(address: int) -> tuple[str, list[str]]:
    """The permissions and smaps fields ("Key: value" lines) of this process's mapping holding ``address``."""
    found = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            header = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if header:
                if found:
                    break
                if int(header[1], 16) <= address < int(header[2], 16):
                    found = (header[3], [])
            elif found:
                found[1].append(line.strip())
    assert found, f"no mapping holds {address:#x}"
    return found


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_cpu_pool_is_private_memory_eligible_for_huge_pages():
    """A shared anonymous mapping (Python's mmap default) is shared memory, which the kernel backs
    with huge pages only when told to system-wide: the pool must be a private mapping."""
    kv = KVCacheManager(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=4096, block_size=16,
                        dtype=torch.float32, device=torch.device("cpu"))
    permissions, details = _mapping_of(kv.k_pool.data_ptr())
    assert permissions == "rw-p", f"pool mapped {permissions}: private and writable expected"
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else "[never]"
    eligible = [line.split()[1] for line in details if line.startswith("THPeligible:")]
    if "[never]" not in thp and eligible:  # the field is there on kernels since 4.x
        assert eligible == ["1"], details


def test_the_lowest_free_blocks_go_first():
    """Blocks in use stay packed at the start of the pool: a freed block is the next one handed out."""
    kv = make_kv(num_blocks=8)
    assert kv.allocate(3) == [0, 1, 2]
    kv.release([1])
    kv.release([0])
    assert kv.allocate(3) == [0, 1, 3]
    kv.check_integrity()


def test_allocate_incref_release():
    kv = make_kv()
    a = kv.allocate(3)
    b = kv.allocate(2)
    assert len(set(a) | set(b)) == 5, "no block handed out twice"
    assert kv.num_free_blocks == 3 and kv.usage == pytest.approx(5 / 8)
    kv.incref(a[:2])  # a second holder shares a prefix
    assert [kv.ref_counts[x] for x in a] == [2, 2, 1]
    kv.release(a)  # the first holder leaves: shared blocks stay
    assert kv.num_free_blocks == 4
    assert [kv.ref_counts[x] for x in a] == [1, 1, 0]
    kv.check_integrity()
    kv.release(a[:2])
    kv.release(b)
    assert kv.num_free_blocks == 8 and all(c == 0 for c in kv.ref_counts)
    kv.check_integrity()


def test_errors():
    kv = make_kv(num_blocks=4)
    blocks = kv.allocate(4)
    with pytest.raises(OutOfBlocks, match="asked for 1 KV blocks, 0 free"):
        kv.allocate(1)
    kv.release(blocks[:1])
    with pytest.raises(RuntimeError, match="double free"):
        kv.release(blocks[:1])
    with pytest.raises(RuntimeError, match="incref of free block"):
        kv.incref(blocks[:1])
    kv.check_integrity()  # failed calls changed nothing


def test_failed_allocation_takes_nothing():
    kv = make_kv(num_blocks=4)
    kv.allocate(3)
    with pytest.raises(OutOfBlocks):
        kv.allocate(2)
    assert kv.num_free_blocks == 1
    kv.check_integrity()


def test_check_integrity_catches_corruption():
    kv = make_kv(num_blocks=4)
    blocks = kv.allocate(2)
    kv.ref_counts[blocks[0]] = 0  # a held block with no count
    with pytest.raises(AssertionError):
        kv.check_integrity()
    kv = make_kv(num_blocks=4)
    kv._free.append(kv._free[0])  # a block on the free list twice
    with pytest.raises(AssertionError):
        kv.check_integrity()


ops = st.lists(st.tuples(st.sampled_from(["alloc", "share", "release"]), st.integers(0, 10 ** 6),
                         st.integers(1, 6)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_operations_match_naive_model(operations):
    """Holders allocate, share each other's blocks and release, in random order. A naive model —
    a list of holders, each a list of blocks — predicts every reference count and the free set."""
    num_blocks = 12
    kv = make_kv(num_blocks=num_blocks)
    holders: list[list[int]] = []
    for op, pick, n in operations:
        if op == "alloc":
            free_before = kv.num_free_blocks
            if n > free_before:
                with pytest.raises(OutOfBlocks):
                    kv.allocate(n)
                continue
            blocks = kv.allocate(n)
            assert len(set(blocks)) == n
            owned = {b for h in holders for b in h}
            assert not owned & set(blocks), "a block was handed out while still owned"
            holders.append(blocks)
        elif op == "share" and holders:
            source = holders[pick % len(holders)]
            shared = source[: 1 + pick % len(source)] if source else []
            kv.incref(shared)
            holders.append(list(shared))
        elif op == "release" and holders:
            kv.release(holders.pop(pick % len(holders)))
        kv.check_integrity()
        expected = [0] * num_blocks
        for h in holders:
            for b in h:
                expected[b] += 1
        assert kv.ref_counts == expected
        assert kv.num_free_blocks == expected.count(0)
    for h in holders:
        kv.release(h)
    kv.check_integrity()
    assert kv.num_free_blocks == num_blocks and all(c == 0 for c in kv.ref_counts)

"""ForwardBatch: the per-step metadata every attention layer reads (built once per step)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class ForwardBatch:
    """One forward pass over a flat list of T new tokens from B sequences.

    Sequences come in two groups, extends first, then decodes: an *extend* sequence feeds
    ``q_len > 1`` new tokens (a prefill chunk, possibly after a cached prefix); a *decode*
    sequence feeds exactly one. New token ``j`` of sequence ``i`` sits at position
    ``seq_lens[i] - q_lens[i] + j`` and attends to every earlier token of the sequence — cached
    prefix, earlier chunks and itself — through the sequence's block table.

    ``shared_prefix_len`` counts the leading tokens that every decode sequence (when there are at
    least two) reads from the very same blocks — a cached system prompt, say; cascade attention
    reads them once for the whole batch.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: the KV slot each new token is written to
    q_lens: torch.Tensor  # [B] int32 (cpu): new tokens per sequence
    seq_lens: torch.Tensor  # [B] int32 (cpu): tokens in the cache after this step (prefix + new)
    cu_q_lens: torch.Tensor  # [B + 1] int32 (cpu): offsets of each sequence's tokens in the flat list
    block_tables: torch.Tensor  # [B, max_blocks] int32 on device, padded with 0
    num_extends: int  # sequences [0, num_extends) are extends; the rest decode
    logits_indices: torch.Tensor  # [S] int64: rows of the flat list whose logits are needed
    block_size: int
    shared_prefix_len: int = 0
    # device copies the GPU kernels read; the torch backend uses the cpu ones
    seq_lens_device: Optional[torch.Tensor] = None
    q_lens_device: Optional[torch.Tensor] = None
    cu_q_lens_device: Optional[torch.Tensor] = None
    shared_prefix_len_device: Optional[torch.Tensor] = None  # [1] int32

    @property
    def num_seqs(self) -> int:
        return int(self.q_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_extend_tokens(self) -> int:
        return int(self.cu_q_lens[self.num_extends])

    @classmethod
    def build(cls, token_ids: list[list[int]], prefix_lens: list[int], block_tables: list[list[int]],
              sample: list[bool], block_size: int, device: torch.device) -> "ForwardBatch":
        """Lay out a step: sequence ``i`` feeds ``token_ids[i]`` after ``prefix_lens[i]`` tokens
        already in its blocks. Callers order extends (more than one token) before decodes.
        ``sample[i]`` says whether sequence ``i`` needs logits for its last token."""
        q_lens = np.fromiter((len(t) for t in token_ids), dtype=np.int64, count=len(token_ids))
        num_extends = int((q_lens > 1).sum())
        if (q_lens[num_extends:] > 1).any():
            raise ValueError("extend sequences must come before decode sequences")
        starts = np.asarray(prefix_lens, dtype=np.int64)
        seq_lens = starts + q_lens
        cu = np.zeros(len(q_lens) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        # one padded [B, W] table; rows copied from the requests' lists (the only per-sequence loop)
        width = max(max((len(t) for t in block_tables), default=1), 1)
        tables = np.zeros((len(block_tables), width), dtype=np.int64)
        for row, table in zip(tables, block_tables):
            row[:len(table)] = table
        # every new token's position and the slot its K/V goes to, vectorised
        seq_of_token = np.repeat(np.arange(len(q_lens)), q_lens)
        positions = starts[seq_of_token] + (np.arange(int(cu[-1])) - cu[:-1][seq_of_token])
        slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
        shared = shared_prefix_len(tables[num_extends:], seq_lens[num_extends:], block_size)
        logits_indices = (cu[1:] - 1)[np.asarray(sample, dtype=bool)]
        flat_ids = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(cu[-1]))

        def on_device(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(values).to(device=device, dtype=dtype, non_blocking=True)

        seq_lens_t = torch.from_numpy(seq_lens.astype(np.int32))
        q_lens_t = torch.from_numpy(q_lens.astype(np.int32))
        cu_t = torch.from_numpy(cu.astype(np.int32))
        on_cpu = torch.device(device).type == "cpu"
        return cls(
            input_ids=on_device(flat_ids, torch.int64),
            positions=on_device(positions, torch.int64),
            slot_mapping=on_device(slots, torch.int64),
            q_lens=q_lens_t,
            seq_lens=seq_lens_t,
            cu_q_lens=cu_t,
            block_tables=on_device(tables, torch.int32),
            num_extends=num_extends,
            logits_indices=on_device(logits_indices, torch.int64),
            block_size=block_size,
            shared_prefix_len=shared,
            seq_lens_device=seq_lens_t if on_cpu else seq_lens_t.to(device, non_blocking=True),
            q_lens_device=q_lens_t if on_cpu else q_lens_t.to(device, non_blocking=True),
            cu_q_lens_device=cu_t if on_cpu else cu_t.to(device, non_blocking=True),
            shared_prefix_len_device=None if on_cpu or not shared else on_device(np.array([shared]), torch.int32),
        )


def shared_prefix_len(tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> int:
    """Tokens at the start of every sequence that live in the same blocks for all of them (0 for
    fewer than two sequences). Only full blocks are ever shared (a sequence writes into its own
    last block), so the common leading block ids, capped by the shortest sequence, are exact."""
    if len(tables) < 2:
        return 0
    same = (tables == tables[0]).all(axis=0)
    common_blocks = int(np.argmin(same)) if not same.all() else len(same)
    return min(common_blocks * block_size, int(seq_lens.min()))

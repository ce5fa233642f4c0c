"""CUDA graphs for decode steps: one captured forward pass per batch size, replayed every step.

A decode step of a small model is hundreds of tiny kernel launches (28 layers x ~15); on the GPU
each takes microseconds, but launching them from Python takes longer than running them. A CUDA
graph records the launches once and replays them with one call.

A graph fixes its tensors' addresses, so the step's inputs live in static buffers that are
overwritten before each replay: token ids, positions, slots, context lengths, block tables and the
length of the prefix every sequence shares. Batch sizes are captured from a fixed set (1, 2, 4, 8,
16, 32, 64, then every 32 up to ``max_num_seqs``); a batch of n runs the smallest graph of size >= n,
the extra rows being padding: slot -1 (the KV store skips it) and context length 0 (attention reads
nothing). Each size >= 2 is captured twice: with cascade attention, for batches whose sequences
share prefix blocks (the shared length is an input), and without, for those that do not (the
cascade's extra launches and merge would cost them a little on every step).
Sampling runs after the graph, eagerly, so per-request sampling parameters need no capture.
"""
from __future__ import annotations

import weakref

import torch

from miniyaie.attention.batch import ForwardBatch
from miniyaie.attention.layer import AttentionContext

SMALL_SIZES = (1, 2, 4, 8, 16, 32, 64)
LARGE_STEP = 32


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes to capture: powers of two up to 64, then multiples of 32, covering max_num_seqs."""
    sizes = [s for s in SMALL_SIZES if s < max_num_seqs]
    size = SMALL_SIZES[-1]
    while size < max_num_seqs:
        size += LARGE_STEP
        sizes.append(size)
    if not sizes or sizes[-1] < max_num_seqs:
        sizes.append(next(s for s in SMALL_SIZES if s >= max_num_seqs))
    return sorted(set(sizes))


class DecodeCUDAGraphs:
    """Owns the static input buffers and one captured graph per batch size, all sharing one
    memory pool (captured largest first, so smaller graphs reuse the largest one's memory).

    Invariants: a replay reads only the static buffers and the KV pool; padding rows never write
    the pool. ``run`` returns a fresh tensor (the graph's output buffer is reused by the next
    replay). Cost: two captures per size at start-up (~0.1 s each), then per step a handful of
    small copies and one ``replay``.
    """

    def __init__(self, runner) -> None:
        self.runner = weakref.proxy(runner)  # the runner owns us; no cycle (see Telemetry)
        config = runner.config
        self.block_size = config.block_size
        self.max_model_len = min(config.max_model_len or runner.args.max_position_embeddings,
                                 runner.args.max_position_embeddings)
        self.sizes = graph_batch_sizes(config.max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-self.max_model_len // self.block_size)
        device = runner.device
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.shared_prefix_len = torch.zeros(1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (size, cascade)
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.pool = None
        self.num_replays = 0
        self.capture()

    def _static_batch(self, size: int, cascade: bool) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:size], positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            q_lens=torch.ones(size, dtype=torch.int32),
            seq_lens=torch.zeros(size, dtype=torch.int32),  # host copy unused by the triton backend
            cu_q_lens=torch.arange(size + 1, dtype=torch.int32),
            block_tables=self.block_tables[:size], num_extends=0,
            logits_indices=self.logits_indices[:size], block_size=self.block_size,
            seq_lens_device=self.seq_lens[:size],
            shared_prefix_len_device=self.shared_prefix_len if cascade else None)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        runner = self.runner
        # plan for the longest context a sequence may have: the split count is fixed per graph
        runner.backend.plan(batch, max_seq_len=self.max_model_len)
        return runner.model(AttentionContext(batch, runner.backend, runner.kv.k_pool, runner.kv.v_pool))

    @torch.inference_mode()
    def capture(self) -> None:
        for size in reversed(self.sizes):
            for cascade in (False, True) if size >= 2 else (False,):
                batch = self._static_batch(size, cascade)
                self._forward(batch)  # warm-up: compiles the kernels, sets up cuBLAS
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._forward(batch)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[size, cascade] = graph
                self.outputs[size, cascade] = out
        torch.cuda.synchronize()

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.num_extends == 0 and 0 < batch.num_seqs <= self.max_batch
                and batch.block_tables.shape[1] <= self.max_blocks)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Copy the step's inputs into the static buffers, replay, return the needed logits."""
        n = batch.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        self.positions[:n].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(batch.seq_lens_device, non_blocking=True)
        if size > n:
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(0)
        width = batch.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        cascade = batch.shared_prefix_len > 0
        if cascade:
            self.shared_prefix_len.fill_(batch.shared_prefix_len)
        self.graphs[size, cascade].replay()
        self.num_replays += 1
        out = self.outputs[size, cascade]
        if batch.logits_indices.shape[0] == n:  # every row samples: rows 0..n-1
            return out[:n].clone()
        return out.index_select(0, batch.logits_indices)

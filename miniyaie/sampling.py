"""SamplingKernel: batched logits -> tokens, with per-request parameters and per-request RNGs.

Pipeline, per step and vectorised over the batch (vLLM's order):

    float32 logits -> penalties (repetition, presence, frequency) -> temperature
    -> top-k -> top-p -> min-p (masked tokens get -inf) -> softmax -> choose

Greedy rows (``temperature == 0``) take the argmax and report the distribution at temperature 1
(after penalties and filters). Sampled rows use *inverse-CDF sampling with one uniform per row per
step*: a row with its own generator draws exactly one number from it each step, so a seeded request
produces the same tokens alone or in a batch of 50, whatever its neighbours do. (The alternative,
the exponential race ``argmax(p / Exp(1))``, needs a vocab-sized draw per row per step from that
row's generator: B extra kernel launches or a B x V host->device copy. One uniform is cheaper and
just as exact; the CDF is accumulated in float64 so tokens with tiny probability keep their mass.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from miniyaie import cpu_kernels
from miniyaie.request import SamplingParams


def on_device(values: list, dtype: torch.dtype, device: Union[str, torch.device]) -> Tensor:
    """A host list as a device tensor without waiting for the device: a blocking copy would wait
    for every kernel queued before it, which would undo the engine's overlap of steps."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per step from the requests in the batch.

    Disabled filters hold neutral values (``top_k = vocab_size``, ``top_p = 1``, ``min_p = 0``) and
    the ``any_*`` / ``all_greedy`` flags let the kernel skip whole stages; a stage no row uses gets
    no tensors at all (None): each is a tensor built from a list (and sent to the device), and at a
    CPU decode step the seven cost ~0.3 ms for stages a greedy batch never runs.
    ``generators[i] is None`` means row ``i`` draws from the kernel's shared generator (unseeded
    requests).
    """

    temperatures: Optional[Tensor]  # [B] float32, 0 = greedy row; None when all_unit_temperature
    top_ks: Optional[Tensor]  # [B] int64, vocab size when disabled; None (with top_ps) when no row filters
    top_ps: Optional[Tensor]  # [B] float32
    min_ps: Optional[Tensor]  # [B] float32; None unless any_min_p
    repetition_penalties: Optional[Tensor]  # [B] float32; the three None unless any_penalty
    presence_penalties: Optional[Tensor]  # [B] float32
    frequency_penalties: Optional[Tensor]  # [B] float32
    generators: list[Optional[torch.Generator]]
    prompt_token_ids: list[list[int]]  # only read when any_penalty
    output_token_ids: list[list[int]]
    greedy: list[bool]  # host copy of temperatures == 0, so the kernel never syncs to read it
    num_top: int  # alternatives returned per row (top_ids / top_probs width)
    any_logprobs: bool  # some row reports log p(chosen): the greedy fast path skips the normaliser otherwise
    filter_rows: list[int]  # rows that use top-k or top-p (only these are sorted)
    filter_width: int  # largest top-k among filter_rows; vocab size if one of them has top-p only
    any_penalty: bool
    all_unit_temperature: bool  # every row greedy or temperature 1: skip the division
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[Optional[torch.Generator]],
        vocab_size: int,
        device: Union[str, torch.device],
        num_top: int = 5,
    ) -> "SamplingBatch":
        """Gather the rows' parameters into tensors on ``device``. Assumes validated params."""
        n = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == n):
            raise ValueError("SamplingBatch.build: params, token lists and generators differ in length")
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        uses_penalty = [p.uses_penalties for p in params]
        greedy = [p.temperature == 0.0 for p in params]
        filter_rows = [i for i, p in enumerate(params) if top_ks[i] < vocab_size or p.top_p < 1.0]

        all_unit_temperature = all(p.temperature in (0.0, 1.0) for p in params)
        any_min_p, any_penalty = any(p.min_p > 0.0 for p in params), any(uses_penalty)

        def f32(used: bool, values: list[float]) -> Optional[Tensor]:
            return on_device(values, torch.float32, device) if used else None

        return cls(
            temperatures=f32(not all_unit_temperature, [p.temperature for p in params]),
            top_ks=on_device(top_ks, torch.int64, device) if filter_rows else None,
            top_ps=f32(bool(filter_rows), [p.top_p for p in params]),
            min_ps=f32(any_min_p, [p.min_p for p in params]),
            repetition_penalties=f32(any_penalty, [p.repetition_penalty for p in params]),
            presence_penalties=f32(any_penalty, [p.presence_penalty for p in params]),
            frequency_penalties=f32(any_penalty, [p.frequency_penalty for p in params]),
            generators=list(generators),
            # Rows without penalties carry no tokens, so the kernel's penalty pass skips them.
            prompt_token_ids=[list(t) if u else [] for t, u in zip(prompt_token_ids, uses_penalty)],
            output_token_ids=[list(t) if u else [] for t, u in zip(output_token_ids, uses_penalty)],
            greedy=greedy,
            num_top=min(vocab_size, max([num_top] + [p.logprobs or 0 for p in params])),
            any_logprobs=any(p.logprobs is not None for p in params),
            filter_rows=filter_rows,
            filter_width=max((top_ks[i] for i in filter_rows), default=vocab_size),
            any_penalty=any_penalty,
            all_unit_temperature=all_unit_temperature,
            all_greedy=all(greedy),
            any_top_k=any(k < vocab_size for k in top_ks),
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any_min_p,
        )


@dataclass
class SamplerOutput:
    """What the kernel chose, and the processed distribution it chose from."""

    token_ids: Tensor  # [B] int64
    logprobs: Tensor  # [B] float32, log p(chosen) under the processed distribution (may be NaN unless any_logprobs)
    top_ids: Tensor  # [B, num_top] int64, most likely first
    top_probs: Tensor  # [B, num_top] float32

    @classmethod
    def tokens_only(cls, token_ids: Tensor) -> "SamplerOutput":
        """Tokens chosen without their distribution (greedy rows nobody asked log-probabilities of)."""
        rows = token_ids.shape[0]
        return cls(token_ids, torch.full((rows,), float("nan"), device=token_ids.device),
                   token_ids.new_empty(rows, 0), torch.empty(rows, 0, device=token_ids.device))


class SamplingKernel:
    """Owns the shared RNG (for unseeded requests) and turns ``[B, V]`` logits into tokens.

    Invariants: a row with its own generator consumes exactly one uniform from it per sampled step
    and nothing from anyone else's, so seeded output is independent of batch composition; greedy
    rows consume no randomness. Cost per step: a few O(B*V) elementwise passes; a sort only of the
    rows using top-k/top-p (a partial ``topk`` when all of them have a top-k); penalties touch only
    the seen tokens; a Python loop over rows (not vocab) draws the uniforms. Runs on whatever
    device the logits live on; on the CPU, where the C kernels compiled, the stages after the
    penalties are one C pass a row (``csrc/sampling.c``, the same rules; the torch stages are its
    reference). Use :meth:`make_generator` (host generators) for seeded requests.
    """

    def __init__(self, seed: int = 0, device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)
        # The uniforms are drawn on the host (one small copy per step beats B tiny device launches).
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    @staticmethod
    def make_generator(seed: int) -> torch.Generator:
        """A per-request generator of the kind the kernel draws from cheaply (host side)."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        return gen

    @torch.no_grad()
    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(batch.generators):
            raise ValueError(f"SamplingKernel: logits shape {tuple(logits.shape)} does not match "
                             f"a batch of {len(batch.generators)} rows")
        logits = logits.float()  # may alias the caller's tensor: every step below is out-of-place
        if batch.any_penalty:
            logits = self._apply_penalties(logits, batch)

        if cpu_kernels.handles(logits) and batch.num_top <= cpu_kernels.MAX_TOP:
            # the stages below in one C pass a row (csrc/sampling.c): ~20 [B, V] torch passes cost
            # ~9.5 ms of a 16-row CPU step with the demo's top-k / top-p
            uniforms = None if batch.all_greedy else self._uniforms(batch, logits.device)
            return SamplerOutput(*cpu_kernels.sample_rows(
                logits.contiguous(), batch.temperatures, batch.top_ks, batch.top_ps, batch.min_ps, batch.greedy,
                uniforms, batch.num_top, batch.any_logprobs))

        if batch.all_greedy and not (batch.any_top_k or batch.any_top_p or batch.any_min_p):
            # Fast path: no sort, no CDF; the reported distribution is softmax at temperature 1.
            token_ids = logits.argmax(dim=-1)
            logprobs_all = torch.log_softmax(logits, dim=-1)
            return self._output(token_ids, logprobs_all, batch.num_top)

        # Greedy rows use temperature 1 for the distribution they report.
        if batch.all_unit_temperature:
            scaled = logits  # saves a [B, V] pass in the common greedy / temperature-1 batches
        else:
            temps = torch.where(batch.temperatures > 0, batch.temperatures,
                                torch.ones_like(batch.temperatures))
            scaled = logits / temps.unsqueeze(1)
        if batch.any_top_k or batch.any_top_p:
            scaled = self._apply_top_k_top_p(scaled, batch)
        if batch.any_min_p:
            # p >= min_p * p_max  <=>  logit >= max_logit + log(min_p): no softmax needed,
            # and min_p = 0 gives log 0 = -inf, which keeps every row untouched.
            floor = scaled.max(dim=-1, keepdim=True).values + batch.min_ps.log().unsqueeze(1)
            scaled = scaled.masked_fill(scaled < floor, float("-inf"))
        logprobs_all = torch.log_softmax(scaled, dim=-1)

        if batch.all_greedy:
            token_ids = scaled.argmax(dim=-1)  # filters never remove the argmax
        else:
            token_ids = self._inverse_cdf(logprobs_all.exp(), self._uniforms(batch, logits.device))
            if any(batch.greedy):
                greedy = on_device(batch.greedy, torch.bool, logits.device)
                token_ids = torch.where(greedy, scaled.argmax(dim=-1), token_ids)
        return self._output(token_ids, logprobs_all, batch.num_top)

    # -- stages ---------------------------------------------------------------------------------

    @staticmethod
    def _apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
        """Repetition (transformers' rule, over prompt + output) then presence/frequency
        (OpenAI's rule, over output only), touching only the tokens a row has seen.

        Each row's distinct seen tokens (with their output counts) are padded into ``[B, U]``;
        the new logits are computed there and added back as deltas with one ``scatter_add_``.
        Distinct ids mean no double counting; padding entries carry a zero delta. This is
        O(B*U) instead of several passes over ``[B, V]``.
        """
        rows: list[list[int]] = []
        counts: list[list[int]] = []
        for prompt, output in zip(batch.prompt_token_ids, batch.output_token_ids):
            seen = dict.fromkeys(prompt, 0)  # insertion-ordered set of prompt tokens, count 0
            for tok in output:
                seen[tok] = seen.get(tok, 0) + 1
            rows.append(list(seen))
            counts.append(list(seen.values()))
        width = max((len(r) for r in rows), default=0)
        if width == 0:
            return logits
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        count = torch.zeros(len(rows), width, dtype=torch.float32)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (r, c) in enumerate(zip(rows, counts)):
            if r:
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.int64)
                count[i, :len(r)] = torch.tensor(c, dtype=torch.float32)
                valid[i, :len(r)] = True
        device = logits.device
        ids, count, valid = (t.to(device, non_blocking=True) for t in (ids, count, valid))

        old = logits.gather(1, ids)
        rep = batch.repetition_penalties.unsqueeze(1)
        new = torch.where(old > 0, old / rep, old * rep)
        new = new - batch.presence_penalties.unsqueeze(1) * (count > 0).float()
        new = new - batch.frequency_penalties.unsqueeze(1) * count
        delta = torch.where(valid, new - old, torch.zeros_like(new))
        return logits.scatter_add(1, ids, delta)

    @staticmethod
    def _apply_top_k_top_p(scaled: Tensor, batch: SamplingBatch) -> Tensor:
        """Only the rows that use top-k or top-p are sorted, and only as far as they need:
        when all of them have a top-k, a ``topk(max k)`` replaces the full sort (the usual
        ``top_k=50, top_p=0.9`` costs a partial selection, not a ``V log V`` sort).

        In sorted order, top-k keeps the first k positions (exactly k, ties broken by the
        selection); top-p keeps a position while the mass strictly before it is < p, i.e. the
        smallest prefix reaching p, renormalised after top-k (position 0 always survives)."""
        num_rows, vocab = scaled.shape
        every_row = len(batch.filter_rows) == num_rows
        rows = None if every_row else on_device(batch.filter_rows, torch.int64, scaled.device)
        sub = scaled if rows is None else scaled.index_select(0, rows)
        top_ks = batch.top_ks if rows is None else batch.top_ks.index_select(0, rows)
        top_ps = batch.top_ps if rows is None else batch.top_ps.index_select(0, rows)

        if batch.filter_width < vocab:
            values, idx = sub.topk(batch.filter_width, dim=-1)  # sorted, largest first
        else:
            values, idx = sub.sort(dim=-1, descending=True)
        positions = torch.arange(values.shape[-1], device=scaled.device).unsqueeze(0)
        keep = positions < top_ks.unsqueeze(1)
        if batch.any_top_p:
            probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            top_p = top_ps.unsqueeze(1)
            # top_p == 1 keeps everything even where float cumsum rounds up to 1 early.
            keep &= (mass_before < top_p) | (top_p >= 1.0)
        filtered = torch.full_like(sub, float("-inf"))
        filtered.scatter_(1, idx, values.masked_fill(~keep, float("-inf")))
        return filtered if rows is None else scaled.index_copy(0, rows, filtered)

    def _uniforms(self, batch: SamplingBatch, device: torch.device) -> Tensor:
        """One U[0,1) per sampled row: seeded rows from their own generator, the rest from the
        shared one (in row order). Greedy rows draw nothing and get a placeholder 0."""
        values = [0.0] * len(batch.greedy)
        shared_rows = [i for i, (g, greedy) in enumerate(zip(batch.generators, batch.greedy))
                       if g is None and not greedy]
        if shared_rows:
            draws = torch.rand(len(shared_rows), generator=self.generator, dtype=torch.float64)
            for i, u in zip(shared_rows, draws.tolist()):
                values[i] = u
        for i, (gen, greedy) in enumerate(zip(batch.generators, batch.greedy)):
            if gen is not None and not greedy:
                values[i] = torch.rand(1, generator=gen, dtype=torch.float64,
                                       device=gen.device).item()
        return on_device(values, torch.float64, device)

    @staticmethod
    def _inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
        """Token i with cdf[i-1] <= u * total < cdf[i], in vocabulary order (so the choice does not
        depend on how a sort broke ties). Masked tokens (prob 0) leave the CDF flat, so they can
        never be picked. Scaling u by the row total absorbs softmax rounding."""
        cdf = probs.double().cumsum(dim=-1)
        total = cdf[:, -1]
        # Keep the target strictly below the total (u * total can round up to it when u is
        # within 2^-53 of 1), so the search always lands on a token with positive mass.
        target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)

    @staticmethod
    def _output(token_ids: Tensor, logprobs_all: Tensor, num_top: int) -> SamplerOutput:
        top_logprobs, top_ids = logprobs_all.topk(num_top, dim=-1)
        return SamplerOutput(
            token_ids=token_ids,
            logprobs=logprobs_all.gather(1, token_ids.unsqueeze(1)).squeeze(1),
            top_ids=top_ids,
            top_probs=top_logprobs.exp(),
        )

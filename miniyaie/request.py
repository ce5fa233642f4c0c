"""Requests and what comes back: SamplingParams, the engine's Request state, outputs."""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Optional, Union

ChatMessages = list[dict]
Prompt = Union[str, list[int], ChatMessages]
# A generated token that was sampled on the device but not read back yet (overlapped steps):
# the next step feeds it to the network straight from the device.
PENDING = -1


@dataclass
class SamplingParams:
    """How to pick each next token. ``temperature=0`` is greedy. Invalid values raise
    ``ValueError`` naming the field (checked on construction and by :meth:`validate`)."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # per-token distribution record: None = none (cheapest), 0 = the chosen token's logprob,
    # k = also the top-k alternatives (OpenAI's top_logprobs; the demo's distribution view)
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name} {why} (got {getattr(self, name)!r})")

        def number(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
              and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            check(number(name), name, "must be a finite number")
        check(self.temperature >= 0, "temperature", "must be >= 0 (0 means greedy)")
        check(isinstance(self.top_k, int) and (self.top_k >= 1 or self.top_k in (0, -1)), "top_k",
              "must be -1/0 (disabled) or a positive integer")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 disables it)")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
        check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
              "seed", "must be an integer or None")
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be non-negative integers")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
              "logprobs", "must be None or an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def wants_argmax_only(self) -> bool:
        """Greedy with no log-probabilities and no penalties: the token is the logits' argmax, and
        nothing else of the distribution is read (filters never remove the argmax)."""
        return self.greedy and self.logprobs is None and not self.uses_penalties

    @property
    def uses_penalties(self) -> bool:
        """Penalties read the tokens generated so far on the host, every step."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenChoice:
    """One generated token and the distribution it was drawn from (after temperature/top-k/top-p)."""

    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]]  # (token id, text, probability), most likely first


@dataclass
class RequestOutput:
    """What one engine step produced for one request: new text since the last output."""

    request_id: str
    delta_text: str
    new_token_ids: list[int]
    new_choices: list[TokenChoice]
    finished: bool
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | "error"
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the radix cache


@dataclass
class GenerationOutput:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    cached_tokens: int
    choices: list[TokenChoice]
    metrics: "RequestMetrics"
    error: Optional[str] = None


@dataclass
class RequestMetrics:
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    finished: Optional[float] = None

    @property
    def queue_time(self) -> Optional[float]:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token is None else self.first_token - self.arrival


@dataclass(eq=False)
class Request:
    """The engine's state for one request. Everything else is derived from three lengths:
    ``num_tokens`` (prompt + generated so far), ``num_computed_tokens`` (tokens whose K/V sits in
    ``block_table``'s slots) and ``num_cached_tokens`` (prompt tokens the radix cache served).

    Invariants: the request holds one reference on each block of ``block_table``;
    ``num_computed_tokens <= num_tokens``; while running, ``tree_node`` (if any) is locked by it.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_index: int
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    tree_node: object = None  # radix_tree.TreeNode locked by this request
    generator: object = None  # torch.Generator when params.seed is set
    detokenizer: object = None  # detokenizer.IncrementalDetokenizer
    choices: list[TokenChoice] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    num_preemptions: int = 0
    emitted_chars: int = 0  # text already streamed to the client
    # prompt + output, kept as one list because every step slices it (a fresh concatenation per
    # step per request showed up in decode-step profiles)
    all_token_ids: list[int] = field(default_factory=list)
    # (launched step, row) whose sampled token is this request's last, PENDING, token
    pending: Optional[tuple] = None

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_pending(self) -> int:
        """Hold a place for a token being sampled; returns its position in ``all_token_ids``.
        ``output_token_ids`` only ever holds tokens whose value is known."""
        self.all_token_ids.append(PENDING)
        return len(self.all_token_ids) - 1

    def resolve_token(self, position: int, token_id: int) -> None:
        """The PENDING token at ``position`` is back from the device. Steps are read back in the
        order they were launched, so it is always the next output token."""
        self.all_token_ids[position] = token_id
        self.output_token_ids.append(token_id)

    def drop_pending(self) -> None:
        """Forget tokens still being sampled (the request ended before they arrived)."""
        del self.all_token_ids[self.num_prompt_tokens + len(self.output_token_ids):]
        self.pending = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """Still computing its prompt (a chunk at a time), or recomputing after preemption."""
        return self.num_tokens - self.num_computed_tokens > 1

"""The Engine: requests in, tokens out, one step at a time (schedule → run the model → sample)."""
from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from miniyaie.attention import ForwardBatch
from miniyaie.config import EngineConfig
from miniyaie.detokenizer import IncrementalDetokenizer
from miniyaie.loader import load_model
from miniyaie.model_runner import ModelRunner
from miniyaie.request import (GenerationOutput, Prompt, Request, RequestOutput,
                              RequestStatus, SamplingParams, TokenChoice)
from miniyaie.sampling import SamplerOutput, SamplingBatch, SamplingKernel, on_device
from miniyaie.scheduler import Scheduler, SchedulerOutput
from miniyaie.telemetry import EngineSnapshot, Telemetry

class Engine:
    """Owns the model runner (network + KV pool), the scheduler (queues + radix tree) and the
    sampling kernel, and drives them one step at a time. Not thread-safe: one thread calls it
    (see ``EngineThread`` for serving many clients).

    A step schedules a batch (decodes and prefill chunks together), runs one forward pass,
    samples a token for every request that reached its last position, detokenizes, checks stop
    conditions and retires finished requests into the prefix cache.
    """

    def __init__(self, config: Optional[EngineConfig] = None, *, loaded=None) -> None:
        self.config = config or EngineConfig()
        loaded = loaded or load_model(self.config.model, self.config.load_format, self.config.cache_dir)
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.runner = ModelRunner(self.config, loaded.hf_config, loaded.weights)
        self.vocab_size = self.runner.args.vocab_size
        self.max_model_len = min(self.config.max_model_len or self.runner.args.max_position_embeddings,
                                 self.runner.args.max_position_embeddings)
        self.eos_token_ids = _eos_ids(loaded.hf_config, self.tokenizer)
        self.scheduler = Scheduler(self.config, self.runner.kv)
        self.sampler = SamplingKernel(self.config.seed, self.runner.device)
        self.requests: dict[str, Request] = {}
        self.telemetry = Telemetry(self)
        self._ids = itertools.count()
        self._pending: list[RequestOutput] = []  # aborts reported at the next step
        # overlap: launch step N+1 before reading back step N (pointless where the device is the CPU)
        self.overlap = (self.config.overlap_schedule if self.config.overlap_schedule is not None
                        else self.runner.device.type == "cuda")
        self._in_flight: Optional[LaunchedStep] = None
        self.num_forward_tokens = 0  # every token fed to the network: proves prefix hits skip compute
        # The model, tokenizer and config are hundreds of thousands of long-lived objects; freezing
        # them keeps the garbage collector from rescanning them during steps (measured: ~15 ms a
        # step at batch 256 on the H200 before this).
        gc.collect()
        gc.freeze()

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Queue a prompt (text, token ids or chat messages). Raises ValueError on bad input."""
        params = params or SamplingParams()
        params.validate()
        cap, longest = self.config.max_tokens_cap, self.config.max_prompt_tokens
        if cap is not None and params.max_tokens > cap:
            raise ValueError(f"max_tokens={params.max_tokens} is over this server's cap of {cap}; ask for fewer tokens")
        token_ids = self.tokenize(prompt)
        if longest is not None and len(token_ids) > longest:
            raise ValueError(f"prompt is {len(token_ids)} tokens; this server accepts at most {longest} prompt "
                             f"tokens. Shorten the prompt.")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens; the context holds {self.max_model_len} "
                             f"(prompt + max_tokens). Shorten the prompt.")
        if len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens={params.max_tokens} does not fit: the prompt takes {len(token_ids)} "
                             f"of {self.max_model_len} context tokens, leaving {self.max_model_len - len(token_ids)}")
        # the last sampled token is never stored, so a request needs slots for all but one token
        capacity = self.runner.kv.num_blocks * self.runner.kv.block_size
        if len(token_ids) + params.max_tokens - 1 > capacity:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens={params.max_tokens} needs more KV "
                             f"cache than the whole pool holds ({capacity} tokens); lower max_tokens or "
                             f"shorten the prompt")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests are waiting (max_waiting); retry later")
        index = next(self._ids)
        request_id = request_id or f"req-{index}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = Request(request_id, token_ids, params, index)
        if params.seed is not None:
            request.generator = self.sampler.make_generator(params.seed)
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids)
        self.requests[request_id] = request
        self.scheduler.add(request)
        self.telemetry.on_add(request)
        return request_id

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            _check_text(prompt, "prompt")
            ids = self._require_tokenizer().encode(prompt)
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError("each chat message needs a string 'role' and 'content'")
                _check_text(m["content"], "message content")
            tok = self._require_tokenizer()
            text = tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            ids = tok.encode(text, add_special_tokens=False)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token ids must be integers in [0, {self.vocab_size}); got {bad[:5]}")
        else:
            raise ValueError("prompt must be a string, a list of token ids or a list of chat messages")
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        return ids

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is; its blocks go back at once. False if it is not active."""
        request = self.requests.get(request_id)
        if request is None or request.finish_reason is not None:
            return False
        self.scheduler.remove(request)
        self._pending.append(self._retire(request, "abort"))
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One round: schedule a batch, launch its forward pass and sampling, and process sampled
        tokens. With overlap on (the default on CUDA) the tokens processed are the *previous*
        step's: the GPU runs this step while Python reads back, detokenizes and checks the last
        one, instead of idling while Python works (SGLang's overlap scheduler)."""
        outputs, self._pending = self._pending, []
        started = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        if previous is not None and any(r.params.uses_penalties for r in self.scheduler.running):
            outputs += self._process(previous)  # penalties read every generated token on the host
            previous = None
        plan = self.scheduler.schedule()
        launched = None
        if plan.scheduled:
            try:
                launched = self._launch(plan, previous)
            except Exception as err:  # a failed forward pass fails its batch, not the engine
                outputs += self._fail([s.request for s in plan.scheduled], err)
        if previous is not None:
            outputs += self._process(previous)
        if launched is not None:
            if self.overlap:
                self._release_at_length(launched)
                self._in_flight = launched
            else:
                outputs += self._process(launched)
            self.telemetry.on_step(plan, len(launched.rows), time.perf_counter() - started)
        return outputs

    def _launch(self, plan: SchedulerOutput, previous: Optional["LaunchedStep"]) -> "LaunchedStep":
        """Queue the step's forward pass and sampling on the device and advance every request's
        state as if its token were known: sampled tokens are appended as PENDING."""
        scheduled = plan.scheduled
        batch = ForwardBatch.build(
            [s.request.all_token_ids[s.request.num_computed_tokens:s.request.num_computed_tokens + s.num_new_tokens]
             for s in scheduled],
            [s.request.num_computed_tokens for s in scheduled],
            [s.request.block_table for s in scheduled],
            [s.samples for s in scheduled],
            self.runner.kv.block_size, self.runner.device)
        self._feed_pending(batch, scheduled, previous)
        self.num_forward_tokens += batch.num_tokens
        rows = [s.request for s in scheduled if s.samples]
        output = None
        if rows and self.runner.picks_greedy_tokens and all(r.params.wants_argmax_only for r in rows):
            # only argmaxes wanted: the CPU head finds them exactly without most of the logits
            # (csrc/greedy_head.c; a chat burst's 16-row head 5.4 -> 3.0 ms)
            output = SamplerOutput.tokens_only(self.runner.greedy_tokens(batch))
        else:
            logits = self.runner.forward(batch)
            if rows:
                output = self.sampler(logits, SamplingBatch.build(
                    [r.params for r in rows], [r.prompt_token_ids for r in rows],
                    [r.output_token_ids for r in rows], [r.generator for r in rows],
                    self.vocab_size, self.runner.device, num_top=0))
        now = time.perf_counter()
        for item in scheduled:
            request = item.request
            if request.metrics.first_scheduled is None:
                request.metrics.first_scheduled = now
                self.telemetry.on_admit(request)
            request.num_computed_tokens += item.num_new_tokens
            if request.num_computed_tokens <= request.num_prompt_tokens:
                self.scheduler.cache_prefill(request)
        launched = LaunchedStep(rows, [r.append_pending() for r in rows], output)
        for i, request in enumerate(rows):
            request.pending = (launched, i)
        return launched

    def _feed_pending(self, batch: ForwardBatch, scheduled: list, previous: Optional["LaunchedStep"]) -> None:
        """Requests whose last token is still PENDING take it from the previous step's sampled
        tokens on the device (their slice of the batch ends with it), without a round trip."""
        fills = [(i, s.request.pending) for i, s in enumerate(scheduled) if s.request.pending is not None]
        if not fills:
            return
        if any(step is not previous for _, (step, _) in fills):
            raise RuntimeError("a pending token from a step other than the previous one")
        seqs = torch.tensor([i for i, _ in fills])
        last_token_rows = (batch.cu_q_lens[1:].long()[seqs] - 1).to(batch.input_ids.device, non_blocking=True)
        batch.input_ids[last_token_rows] = \
            previous.output.token_ids[on_device([row for _, (_, row) in fills], torch.int64, batch.input_ids.device)]

    def _release_at_length(self, launched: "LaunchedStep") -> None:
        """A request whose in-flight token is its last by length needs no further step: give its
        blocks back now, so the next schedule neither runs it nor counts its blocks."""
        for request, position in zip(launched.rows, launched.positions):
            if request.status == RequestStatus.RUNNING and self._at_length(request, position):
                self.scheduler.finish(request)

    def _at_length(self, request: Request, position: int) -> bool:
        return (position + 1 - request.num_prompt_tokens >= request.params.max_tokens
                or position + 1 >= self.max_model_len)

    def _process(self, launched: "LaunchedStep") -> list[RequestOutput]:
        """Read a launched step's tokens back (waiting for the device) and append them."""
        try:
            token_ids = launched.token_ids()
            choices = self._choices(launched, token_ids)
        except Exception as err:  # an asynchronous device error surfaces here
            return self._fail(launched.rows, err)
        outputs = []
        for i, (request, position, token) in enumerate(zip(launched.rows, launched.positions, token_ids)):
            if request.pending is not None and request.pending[0] is launched:
                request.pending = None
            if request.finish_reason is not None:  # aborted, or stopped while this step ran
                continue
            request.resolve_token(position, token)
            outputs.append(self._append(request, position, token, choices.get(i)))
        return outputs

    def _choices(self, launched: "LaunchedStep", token_ids: list[int]) -> dict[int, TokenChoice]:
        """Distribution records, only for requests that asked (logprobs / the demo): building a
        record per token for everyone costs Python objects and garbage-collector time every step."""
        recorded = [i for i, r in enumerate(launched.rows) if r.params.logprobs is not None]
        if not recorded:
            return {}
        out = launched.output
        rows = on_device(recorded, torch.int64, out.logprobs.device)
        logprobs = out.logprobs[rows].tolist()
        top_ids, top_probs = out.top_ids[rows].tolist(), out.top_probs[rows].tolist()
        choices = {}
        for i, lp, ids, probs in zip(recorded, logprobs, top_ids, top_probs):
            k = launched.rows[i].params.logprobs
            choices[i] = TokenChoice(token_ids[i], self._token_text(token_ids[i]), lp,
                                     [(t, self._token_text(t), p) for t, p in zip(ids[:k], probs[:k])])
        return choices

    def _token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _append(self, request: Request, position: int, token: int, choice: Optional[TokenChoice]) -> RequestOutput:
        """A sampled token arrived: detokenize it and decide whether the request is done."""
        now = time.perf_counter()
        if request.metrics.first_token is None:
            request.metrics.first_token = now
        params = request.params
        choices = [choice] if choice is not None else []
        request.choices += choices
        reason = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"  # the stop token itself is not shown as text
        elif request.detokenizer is not None:
            request.detokenizer.add(token)
            cut = _find_stop(request.detokenizer.text, params.stop, request.emitted_chars)
            if cut is not None:
                request.detokenizer.text = request.detokenizer.text[:cut]
                reason = "stop"
        if reason is None and self._at_length(request, position):
            reason = "length"
        if reason is not None:
            self.scheduler.finish(request)
            return self._retire(request, reason, new_tokens=[token], new_choices=choices)
        return self._delta(request, [token], choices, finished=False)

    def _delta(self, request: Request, new_tokens: list[int], new_choices: list[TokenChoice],
               finished: bool) -> RequestOutput:
        text = request.detokenizer.text if request.detokenizer is not None else ""
        # while a stop string could still be completing, hold back the text that might be its start
        end = len(text) if finished else len(text) - _partial_stop(text, request.params.stop)
        delta = text[request.emitted_chars:end]
        request.emitted_chars = max(request.emitted_chars, end)
        return RequestOutput(request.request_id, delta, new_tokens, new_choices, finished, request.finish_reason, request.error,
                             request.num_prompt_tokens, request.num_cached_tokens)

    def _retire(self, request: Request, reason: str, error: Optional[str] = None,
                new_tokens: Sequence[int] = (), new_choices: Sequence[TokenChoice] = ()) -> RequestOutput:
        request.drop_pending()  # tokens sampled after the last one are not part of the answer
        request.finish_reason = reason
        request.error = error
        request.metrics.finished = time.perf_counter()
        self.telemetry.on_finish(request)
        return self._delta(request, list(new_tokens), list(new_choices), finished=True)

    def _fail(self, requests: list[Request], err: Exception) -> list[RequestOutput]:
        message = f"engine step failed: {type(err).__name__}: {err}"
        outputs = []
        for request in requests:
            if request.finish_reason is None:
                self.scheduler.remove(request)
                outputs.append(self._retire(request, "error", message))
        self.telemetry.on_error(message)
        return outputs

    # ---- convenience -----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt] | Prompt, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[GenerationOutput]:
        """Run prompts to completion together (continuous batching) and return them in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params_list):
                ids.append(self.add_request(p, sp))
        except Exception:  # one bad prompt: queue none of them, so nothing is left behind
            for request_id in ids:
                self.abort(request_id)
                self.requests.pop(request_id, None)
            self._pending = [o for o in self._pending if o.request_id not in ids]
            raise
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.finished:
                    pending.discard(out.request_id)
        return [self.result(i) for i in ids]

    def stream(self, prompt: Prompt, params: Optional[SamplingParams] = None) -> Iterator[RequestOutput]:
        """Generate one prompt, yielding text as it comes (drives the engine itself)."""
        request_id = self.add_request(prompt, params)
        try:
            while True:
                for out in self.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.abort(request_id)  # the consumer stopped early: free its blocks
            self.requests.pop(request_id, None)  # and forget it: nobody will call result()

    def result(self, request_id: str) -> GenerationOutput:
        """The finished request (and forget it)."""
        r = self.requests.pop(request_id)
        return GenerationOutput(r.request_id, r.prompt_token_ids, r.output_token_ids,
                                r.detokenizer.text if r.detokenizer else "", r.finish_reason,
                                r.num_cached_tokens, r.choices, r.metrics, r.error)

    def clear_cache(self) -> int:
        """Drop every unlocked prefix from the radix tree; returns the blocks freed."""
        freed = self.scheduler.clear_cache()
        self.telemetry.touch()
        return freed

    def set_options(self, enable_prefix_cache: Optional[bool] = None, schedule_policy: Optional[str] = None) -> None:
        """Switch prefix caching or the scheduling policy while running (the demo's controls)."""
        if schedule_policy is not None:
            if schedule_policy not in ("lpm", "fcfs"):
                raise ValueError("schedule_policy must be 'lpm' or 'fcfs'")
            self.config.schedule_policy = schedule_policy
        if enable_prefix_cache is not None:
            self.config.enable_prefix_cache = bool(enable_prefix_cache)
            if not enable_prefix_cache:
                self.clear_cache()
        self.telemetry.touch()

    def snapshot(self) -> EngineSnapshot:
        return self.telemetry.snapshot()

    def check_integrity(self) -> None:
        """Raise AssertionError if any block, reference count or lock is inconsistent."""
        self.scheduler.check_integrity()


@dataclass
class LaunchedStep:
    """A step queued on the device, whose sampled tokens may not exist yet.

    ``rows[i]`` is the request that row ``i`` of the sampler's output belongs to, and
    ``positions[i]`` where its PENDING token sits in ``rows[i].all_token_ids``. The token ids start
    copying to the host as soon as sampling is queued; ``token_ids()`` waits for that copy only.
    """

    rows: list[Request]
    positions: list[int]
    output: Optional[SamplerOutput]
    host_token_ids: Optional[torch.Tensor] = None
    ready: Optional[torch.cuda.Event] = None

    def __post_init__(self) -> None:
        if self.output is None:
            return
        ids = self.output.token_ids
        if ids.device.type == "cuda":
            self.host_token_ids = ids.to("cpu", non_blocking=True)  # into pinned memory
            self.ready = torch.cuda.Event()
            self.ready.record()
        else:
            self.host_token_ids = ids

    def token_ids(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return [] if self.host_token_ids is None else self.host_token_ids.tolist()


class QueueFull(RuntimeError):
    """The waiting queue is at ``max_waiting``; the caller should retry later (HTTP 429)."""


def _check_text(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid UTF-8 text (position {err.start}): {err.reason}") from None


def _find_stop(text: str, stops: list[str], emitted: int) -> Optional[int]:
    """Index where the earliest stop string starts in text not yet final, or None."""
    if not stops:
        return None
    window_start = max(0, emitted - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, window_start) for s in stops) if i != -1]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


def _eos_ids(hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids

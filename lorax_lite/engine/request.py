"""The plain objects that cross the engine boundary: SamplingParams in, Request inside, RequestOutput out."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lorax_lite.engine.catalog import ResolvedAdapter


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_tokens reached (or max_seq_len)
    STOP = "stop"  # a stop string or a stop token id
    EOS = "eos"  # the model's end-of-sequence token
    ABORT = "abort"  # the client went away or asked to abort
    ERROR = "error"  # this request failed; `RequestOutput.error` says why
    TIMEOUT = "timeout"  # its deadline (the `timeout` it was made with) passed first


class OutputKind(str, enum.Enum):
    """Which outputs a request's stream carries (vLLM's RequestOutputKind)."""

    CUMULATIVE = "cumulative"  # one per step, each with everything so far (token_ids, logprobs, text)
    DELTA = "delta"  # one per step, each with only what is new since the previous output (what the server streams)
    FINAL_ONLY = "final_only"  # one, when the request finishes, with everything (what LLM.generate collects)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


GREEDY_TEMPERATURE = 1e-5  # a temperature below this is greedy
MIN_REPETITION_PENALTY = 0.01  # logits * 100 or / 100 cannot overflow what a model produces
MAX_REPETITION_PENALTY = 100.0


@dataclass
class SamplingParams:
    """How to pick tokens for one request. Invalid values raise ValueError naming the field.

    temperature 0 is greedy, and so is any temperature below 1e-5 (`GREEDY_TEMPERATURE`, vLLM's
    rule: dividing logits by less overflows float32). top_k 0 (or -1) and top_p 1.0 disable those
    filters; the top token always survives top_p, so a tiny top_p means "the top token only".
    repetition_penalty is in [0.01, 100]. `seed` makes the sampled output reproducible whatever else
    is in the batch. `stop` strings end generation and are left out of the text; `stop_token_ids`
    end it too (the token is kept in `token_ids`).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if not _is_real(self.repetition_penalty) or not MIN_REPETITION_PENALTY <= self.repetition_penalty <= (
            MAX_REPETITION_PENALTY
        ):
            raise ValueError(
                f"repetition_penalty must be a number in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] "
                f"(1 = off), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        self.top_k = max(self.top_k, 0)
        self.stop = _check_stop(self.stop)
        self.stop_token_ids = _check_stop_token_ids(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        """Whether tokens are picked by argmax: temperature below GREEDY_TEMPERATURE (0 included)."""
        return self.temperature < GREEDY_TEMPERATURE


def deadline_after(timeout: float | None, start: float | None = None) -> float | None:
    """The time.monotonic() `timeout` seconds after `start` (default: now); None for None. ValueError naming
    `timeout` unless it is a finite number > 0."""
    if timeout is None:
        return None
    if not _is_real(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0 (or None), got {timeout!r}")
    return (time.monotonic() if start is None else start) + timeout


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    if any(s == "" for s in stop):
        raise ValueError("stop strings must not be empty")
    return list(stop)


def _check_stop_token_ids(ids: list[int] | None) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {ids!r}")
    return list(ids)


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life, for headers, metrics and benchmarks."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """What a caller sees of a request after a step.

    `token_ids`, `logprobs` and `text` hold everything so far, except for a request made with
    OutputKind.DELTA, where they hold only what is new since its previous output.
    `num_generated_tokens` is always the total.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    finished: bool
    num_generated_tokens: int = 0
    adapter_id: str | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None
    exception: Exception | None = field(default=None, repr=False, compare=False)  # what failed it, e.g. an AdapterError
    logprobs: list[float] = field(default_factory=list, repr=False)  # of each token in token_ids (see Sampler)
    seed: int | None = None  # the seed sampling used (drawn when the request gave none); None when greedy
    num_cached_tokens: int = 0  # prompt tokens whose K/V the prefix cache held when it was first scheduled


class Request:
    """One sequence inside the engine: its tokens, progress, and sampling state.

    `num_computed_tokens` counts the tokens whose K/V are in the cache; a step schedules the
    tokens after them. A preempted request resets it to 0 and recomputes prompt + output later.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        prompt: str | None = None,
        adapter: ResolvedAdapter | None = None,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        timeout: float | None = None,
        cache_salt: str | None = None,
    ) -> None:
        """`timeout`: seconds from now (its arrival) after which the scheduler finishes it with
        FinishReason.TIMEOUT, waiting or running; None for no deadline. ValueError unless it is > 0 and finite.
        `cache_salt`: K/V it computes is found in the prefix cache only by requests with the same salt (and
        adapter version); a tenant's name, say. ValueError unless it is a non-empty string or None."""
        self.deadline = deadline_after(timeout)  # time.monotonic() past which it is finished; None: never
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise ValueError(f"cache_salt must be a non-empty string or None, got {cache_salt!r}")
        self.cache_salt = cache_salt
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.adapter = adapter  # None: the base model
        self.output_kind = output_kind
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float] = []  # log-probability of each output token as sampled
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self.exception: Exception | None = None
        self.lora_slot: int | None = None  # the LoRA slot it holds while running
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        self.generator: torch.Generator | None = None  # set by the engine for sampled requests
        self.num_preemptions = 0
        self.seed: int | None = sampling_params.seed  # the seed actually used (drawn when None)
        self.block_hashes: list[bytes] = []  # prefix-cache hashes of its full blocks so far (engine/prefix_cache.py)
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at its first admission

    @property
    def adapter_id(self) -> str | None:
        return self.adapter.adapter_id if self.adapter is not None else None

    @property
    def adapter_key(self) -> str | None:
        """What the adapter cache calls this request's adapter version (see the glossary)."""
        return self.adapter.adapter_key if self.adapter is not None else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def is_past_deadline(self, now: float) -> bool:
        """Whether its deadline has passed at `now` (time.monotonic())."""
        return self.deadline is not None and now >= self.deadline

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        n = self.num_prompt_tokens
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def finish(self, reason: FinishReason, error: str | Exception | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        if isinstance(error, Exception):
            self.exception, error = error, str(error)
        self.error = error
        self.metrics.finished_time = time.time()


__all__ = [
    "GREEDY_TEMPERATURE", "MAX_REPETITION_PENALTY", "MIN_REPETITION_PENALTY", "FinishReason", "OutputKind", "Request",
    "RequestMetrics", "RequestOutput", "RequestStatus", "SamplingParams", "deadline_after",
]

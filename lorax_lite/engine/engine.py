"""LLMEngine: requests in, one continuous-batching step at a time, RequestOutputs out."""

from __future__ import annotations

import itertools
import logging
import os
import random
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorax_lite.config import EngineConfig
from lorax_lite.engine.detokenizer import IncrementalDetokenizer
from lorax_lite.engine.kv_cache import BlockManager, KVCache
from lorax_lite.engine.request import Request, RequestOutput, SamplingParams
from lorax_lite.engine.runner import ModelRunner, ModelShape
from lorax_lite.engine.scheduler import Scheduler
from lorax_lite.lora.layers import LoRASlots
from lorax_lite.lora.catalog import AdapterCatalog
from lorax_lite.lora.manager import AdapterManager
from lorax_lite.lora.weights import LoRAWeights, load_lora_weights
from lorax_lite.registry.base import Registry
from lorax_lite.registry.store import AdapterStore
from lorax_lite.model_loader import load_model_and_tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class EngineStats:
    """Counters since start-up, written by the thread that steps the engine (read by /metrics)."""

    steps: int = 0  # forward passes
    batched_tokens: int = 0  # tokens run through the model, summed over steps
    batch_size_sum: int = 0  # sequences per step, summed over steps
    batch_size_buckets: list[int] = field(default_factory=lambda: [0] * len(BATCH_SIZE_BUCKETS))  # steps per bucket (<= bound)

    def observe_step(self, num_seqs: int, num_tokens: int) -> None:
        self.steps += 1
        self.batched_tokens += num_tokens
        self.batch_size_sum += num_seqs
        bucket = bisect_left(BATCH_SIZE_BUCKETS, num_seqs)
        if bucket < len(BATCH_SIZE_BUCKETS):
            self.batch_size_buckets[bucket] += 1


class LLMEngine:
    """The synchronous engine; `LLM` drives it in the caller's thread, `AsyncLLM` in its own."""

    def __init__(
        self,
        config: EngineConfig,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        registry: Registry | None = None,
        store: AdapterStore | None = None,
    ) -> None:
        self.config = config
        if model is None or tokenizer is None:
            model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype, device=config.device)
        self.tokenizer = tokenizer
        self.dtype = next(model.parameters()).dtype
        self.lora_slots, self.adapters = self._init_lora(model)
        self.catalog = None if self.adapters is None else AdapterCatalog(self.adapters, self.load_adapter_weights, registry, store)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        shape = ModelShape.of(model)
        num_blocks = self._num_kv_blocks(shape, self.dtype)
        self.max_model_len = self._max_model_len(shape, num_blocks)
        self.runner = ModelRunner(model, num_blocks, config.block_size, self.lora_slots)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids(model, tokenizer),
            adapters=self.adapters,
        )
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}

    def _init_lora(self, model: PreTrainedModel) -> tuple[LoRASlots | None, AdapterManager | None]:
        cfg = self.config
        if cfg.max_loras == 0:
            return None, None
        slots = LoRASlots.inject(model, cfg.max_loras, cfg.max_lora_rank)
        on_cuda = next(model.parameters()).device.type == "cuda"
        return slots, AdapterManager(slots, cfg.max_cpu_loras, self._load_registered, pin_memory=on_cuda)

    # ---- adapters ----------------------------------------------------------------------------

    def load_adapter_weights(self, path: str | os.PathLike) -> LoRAWeights:
        """Read and validate a PEFT adapter against this base model (raises a specific AdapterError)."""
        self._require_lora()
        return load_lora_weights(path, self.lora_slots.targets, self.config.max_lora_rank, dtype=self.dtype)

    def add_adapter(self, adapter_id: str, path: str | os.PathLike, weights: LoRAWeights | None = None) -> None:
        """Make `adapter_id` usable by requests; loaded from `path` on first use unless `weights` are given."""
        self.register_adapter(adapter_id, path)
        if weights is not None:
            self.adapters.put(adapter_id, weights)

    def register_adapter(self, adapter_id: str, path: str | os.PathLike) -> None:
        """Only record where the adapter is (safe from any thread; the cache is untouched)."""
        self._require_lora()
        self.catalog.add(adapter_id, path)

    def remove_adapter(self, adapter_id: str) -> None:
        """New requests cannot use it any more; running ones finish with it."""
        self.unregister_adapter(adapter_id)
        self.adapters.remove(adapter_id)

    def unregister_adapter(self, adapter_id: str) -> None:
        self._require_lora()
        self.catalog.discard(adapter_id)

    @property
    def adapter_ids(self) -> list[str]:
        """Adapters added by path (registry adapters: see the registry)."""
        return [] if self.catalog is None else self.catalog.added_ids

    def _require_lora(self) -> None:
        if self.adapters is None:
            raise ValueError("LoRA is turned off (max_loras=0); start the engine with max_loras >= 1 to serve adapters")

    def _resolve_adapter(self, adapter_id: str | None) -> str | None:
        if adapter_id is None:
            return None
        self._require_lora()
        return self.catalog.resolve(adapter_id)

    def _load_registered(self, key: str) -> LoRAWeights:
        """Runs on the adapter loader thread."""
        return self.catalog.load(key)

    # ---- requests ----------------------------------------------------------------------------

    def _num_kv_blocks(self, shape: ModelShape, dtype: torch.dtype) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = KVCache.bytes_per_block(shape.num_layers, cfg.block_size, shape.num_kv_heads, shape.head_dim, dtype)
        budget = int(cfg.kv_cache_memory_gb * 2**30) // per_block
        model_len = cfg.max_model_len or shape.max_position_embeddings or 4096
        useful = cfg.max_num_seqs * -(-model_len // cfg.block_size)  # more blocks than this can never be used
        return max(1, min(budget, useful))

    def _max_model_len(self, shape: ModelShape, num_blocks: int) -> int:
        capacity = num_blocks * self.config.block_size
        model_len = shape.max_position_embeddings
        wanted = self.config.max_model_len
        if wanted is None:
            return min(model_len or capacity, capacity)
        if model_len is not None and wanted > model_len:
            raise ValueError(f"max_model_len {wanted} exceeds the model's context length {model_len}")
        if wanted > capacity:
            raise ValueError(
                f"max_model_len {wanted} does not fit in the KV cache ({num_blocks} blocks of "
                f"{self.config.block_size} tokens); raise num_kv_blocks or kv_cache_memory_gb"
            )
        return wanted

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter_id: str | None = None,
    ) -> Request:
        """Validate and queue one request; bad input raises ValueError and changes nothing."""
        request = self.make_request(prompt, sampling_params, request_id, adapter_id)
        self.add(request)
        return request

    def add(self, request: Request) -> None:
        """Queue a request built by `make_request`."""
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        if request.adapter_id is not None:
            self.catalog.admit(request.adapter_id, request.adapter_key)
        self.scheduler.add(request)

    def make_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter_id: str | None = None,
        prompt_text: str | None = None,
    ) -> Request:
        """Build a validated Request without queueing it (AsyncLLM validates in the caller's thread).

        `prompt` is text (tokenized here) or token ids; `prompt_text` names token ids' text in outputs.
        """
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        adapter_key = self._resolve_adapter(adapter_id)
        text, token_ids = self._tokenize(prompt)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(request_id, token_ids, params, prompt=text or prompt_text, adapter_id=adapter_id)
        request.adapter_key = adapter_key
        self._init_sampling_state(request)
        return request

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            text, token_ids = prompt, self.tokenizer(prompt).input_ids
        elif isinstance(prompt, (list, tuple)):
            text, token_ids = None, list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        self._check_prompt_ids(token_ids)
        return text, token_ids

    def _check_prompt_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty (no tokens)")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len} "
                "(prompt + at least one generated token must fit); shorten the prompt"
            )

    def _init_sampling_state(self, request: Request) -> None:
        params = request.sampling_params
        if not params.is_greedy:
            request.seed = params.seed if params.seed is not None else random.getrandbits(63)
            request.generator = torch.Generator().manual_seed(request.seed)
        request.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params.stop)

    def abort_request(self, request_id: str) -> Request | None:
        request = self.scheduler.abort(request_id)
        self._forget(request_id)
        return request

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One continuous-batching step; returns outputs of requests that advanced."""
        batch = self.scheduler.schedule()
        failed, self.scheduler.failed = self.scheduler.failed, []
        if batch.is_empty:
            if self.scheduler.is_waiting_for_adapters:
                self.adapters.wait(timeout=0.05)  # adapters are on their way from disk: do not spin
            return self._collect(failed)
        self.stats.observe_step(len(batch.requests), batch.num_tokens)
        try:
            sampled = self.runner.run(batch, self.block_manager)
        except Exception as exc:  # a failed forward fails its batch, never the engine
            logger.exception("forward pass failed for %d requests", len(batch.requests))
            self.scheduler.fail(batch.requests, f"forward pass failed: {exc}")
            return self._collect(failed + batch.requests)
        updated = self.scheduler.postprocess(batch, sampled.token_ids, sampled.logprobs)
        return self._collect(failed + updated)

    def _collect(self, requests: list[Request]) -> list[RequestOutput]:
        for req in requests:
            if req.is_finished:
                self._forget(req.request_id)
        return [r.to_output() for r in requests]

    def _forget(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None and req.adapter_id is not None:
            self.catalog.finished(req.adapter_key)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids as transformers `generate` uses them: generation config, else model config, else tokenizer."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)

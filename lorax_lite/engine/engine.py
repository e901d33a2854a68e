"""LLMEngine: requests in, one continuous-batching step at a time, RequestOutputs out."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorax_lite.config import EngineConfig
from lorax_lite.engine.detokenizer import IncrementalDetokenizer
from lorax_lite.engine.kv_cache import BlockManager, KVCache
from lorax_lite.engine.request import Request, RequestOutput, SamplingParams
from lorax_lite.engine.runner import ModelRunner, ModelShape
from lorax_lite.engine.scheduler import Scheduler
from lorax_lite.model_loader import load_model_and_tokenizer

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]


class LLMEngine:
    """The synchronous engine; `LLM` drives it in the caller's thread, `AsyncLLM` in its own."""

    def __init__(
        self,
        config: EngineConfig,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        self.config = config
        if model is None or tokenizer is None:
            model, tokenizer = load_model_and_tokenizer(config.model, dtype=config.dtype, device=config.device)
        self.tokenizer = tokenizer
        self.vocab_size = model.get_input_embeddings().num_embeddings
        shape = ModelShape.of(model)
        num_blocks = self._num_kv_blocks(shape, next(model.parameters()).dtype)
        self.max_model_len = self._max_model_len(shape, num_blocks)
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids(model, tokenizer),
        )
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}

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
        text, token_ids = self._tokenize(prompt)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(request_id, token_ids, params, prompt=text or prompt_text, adapter_id=adapter_id)
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
        self._requests.pop(request_id, None)
        return self.scheduler.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One continuous-batching step; returns outputs of requests that advanced."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        try:
            sampled = self.runner.run(batch, self.block_manager)
        except Exception as exc:  # a failed forward fails its batch, never the engine
            logger.exception("forward pass failed for %d requests", len(batch.requests))
            self.scheduler.fail(batch.requests, f"forward pass failed: {exc}")
            return self._collect(batch.requests)
        updated = self.scheduler.postprocess(batch, sampled.token_ids)
        return self._collect(updated)

    def _collect(self, requests: list[Request]) -> list[RequestOutput]:
        for req in requests:
            if req.is_finished:
                self._requests.pop(req.request_id, None)
        return [r.to_output() for r in requests]


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

"""LLMEngine: requests in, one continuous-batching step at a time, RequestOutputs out."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import time
from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorax_lite.config import EngineConfig
from lorax_lite.engine.attention import select_attention_backend
from lorax_lite.engine.catalog import AdapterCatalog, ResolvedAdapter
from lorax_lite.engine.cuda_graphs import CudaGraphFactory, DecodeGraphs
from lorax_lite.engine.kv_cache import BlockManager, ModelShape, plan_kv_cache
from lorax_lite.engine.output import OutputProcessor
from lorax_lite.engine.request import FinishReason, OutputKind, Request, RequestOutput, SamplingParams
from lorax_lite.engine.runner import ModelRunner, StepOutput
from lorax_lite.engine.scheduler import ScheduledBatch, Scheduler
from lorax_lite.engine.stats import AdapterCacheSnapshot, EngineSnapshot, EngineStats, PrefixCacheSnapshot
from lorax_lite.invariants import debug_invariants
from lorax_lite.lora.errors import AdapterNotFoundError
from lorax_lite.lora.layers import LoRALayers
from lorax_lite.lora.loader import AdapterReader
from lorax_lite.lora.manager import AdapterManager
from lorax_lite.lora.weights import LoRAWeights
from lorax_lite.model_loader import load_model_and_tokenizer
from lorax_lite.packed import pack_linears, resolve_linear_backend
from lorax_lite.quantize import quantize_decoder
from lorax_lite.registry.base import Registry
from lorax_lite.registry.guard import NO_REGISTRY, RegistryHealth
from lorax_lite.registry.store import AdapterStore

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int]
LORA_OFF = "LoRA is turned off (max_loras=0); start the engine with max_loras >= 1 to serve adapters"


class LLMEngine:
    """The synchronous engine; `LLM` drives it in the caller's thread, `AsyncLLM` in its own.

    Thread safety: `read_adapter`, `add_adapter_path`, `remove_adapter_path`, `resolve_adapter`,
    `list_adapters` and `make_request` may run in any thread; everything else runs in the thread that
    steps the engine.
    """

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
        self.vocab_size = cast(nn.Embedding, model.get_input_embeddings()).num_embeddings
        self._init_lora(model, registry, store)
        self.quantization = quantize_decoder(model, config.quantize)  # after LoRA: it quantizes the base layers
        param = next(model.parameters())
        self.linear_backend = resolve_linear_backend(config.linear_backend, param.device, self.dtype, config.quantize)
        if self.linear_backend == "onednn":
            pack_linears(model)  # after LoRA too: the LoRALinears' base layers are packed
        plan = plan_kv_cache(config, ModelShape.of(model), self.dtype)
        self.max_seq_len = plan.max_seq_len  # the longest prompt + output served (see max_model_len)
        self.attention_backend = select_attention_backend(config.attention_backend, param.device, config.block_size)
        self.runner = ModelRunner(
            model, plan.num_blocks, config.block_size, self.lora_layers, attention=self.attention_backend
        )
        self.cuda_graph_sizes = self._capture_decode_graphs(param.device)
        self.block_manager = BlockManager(plan.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_seq_len=self.max_seq_len,
            eos_token_ids=eos_token_ids(model, tokenizer),
            adapter_manager=self.adapter_manager,
            clear_blocks=self.runner.clear_blocks,
        )
        self.output_processor = OutputProcessor(tokenizer)
        self.stats = EngineStats()
        self.check_when_idle = debug_invariants()
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}

    def backends(self) -> dict[str, object]:
        """How this engine computes, as resolved at start-up from the `auto` settings (shown in /info)."""
        return {
            "device": str(self.runner.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "linear": self.linear_backend,
            "attention": self.attention_backend.name,
            "lora": None if self.lora_layers is None else self.lora_layers.backend.name,
            "cuda_graph_batch_sizes": self.cuda_graph_sizes,  # [] when decode steps run eagerly
        }

    def _capture_decode_graphs(self, device: torch.device) -> list[int]:
        """On CUDA, unless enforce_eager: capture decode graphs (engine/cuda_graphs.py); their batch sizes, or []."""
        if device.type != "cuda" or self.config.enforce_eager:
            return []
        reason = DecodeGraphs.unsupported_reason(self.attention_backend, self.lora_layers)
        if reason is not None:
            logger.info("decode steps run eagerly: %s", reason)
            return []
        try:
            graphs = self.runner.enable_decode_graphs(CudaGraphFactory(), self.config.max_num_seqs, self.max_seq_len)
        except Exception as exc:  # a model whose forward cannot be captured is still served, eagerly
            logger.warning("decode steps run eagerly: capturing CUDA graphs failed (%s: %s); enforce_eager skips "
                           "the attempt", type(exc).__name__, exc)
            self.runner.graphs = None
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            return []
        return graphs.sizes

    def _init_lora(self, model: PreTrainedModel, registry: Registry | None, store: AdapterStore | None) -> None:
        self.lora_layers: LoRALayers | None = None
        self.adapter_reader: AdapterReader | None = None
        self.adapter_manager: AdapterManager | None = None
        self.catalog: AdapterCatalog | None = None
        cfg = self.config
        if cfg.max_loras == 0:
            return
        self.lora_layers = LoRALayers.inject(model, cfg.max_loras, cfg.max_lora_rank, backend=cfg.lora_backend)
        self.adapter_reader = AdapterReader(self.lora_layers.targets, cfg.max_lora_rank, self.dtype)
        on_cuda = next(model.parameters()).device.type == "cuda"
        self.adapter_manager = AdapterManager(
            self.lora_layers, cfg.max_cpu_loras, self.adapter_reader.read, pin_memory=on_cuda
        )
        self.catalog = AdapterCatalog(
            self.adapter_manager, registry, store, cfg.registry_timeout_s, cfg.registry_stale_s
        )

    # ---- adapters ----------------------------------------------------------------------------

    def read_adapter(self, path: str | os.PathLike) -> LoRAWeights:
        """Read and validate a PEFT adapter against this base model (raises a specific AdapterError)."""
        if self.adapter_reader is None:
            raise ValueError(LORA_OFF)
        return self.adapter_reader.read_dir(path)

    def add_adapter(self, adapter_id: str, path: str | os.PathLike, weights: LoRAWeights | None = None) -> None:
        """Make `adapter_id` name the adapter at `path`; read on first use unless its `weights` are given."""
        adapter = self.add_adapter_path(adapter_id, path)
        if weights is not None:
            self.cache_adapter(adapter.adapter_key, weights)

    def add_adapter_path(self, adapter_id: str, path: str | os.PathLike) -> ResolvedAdapter:
        """Any thread: from now on, new requests for `adapter_id` get the adapter at `path`."""
        return self._catalog().add_path(adapter_id, path)

    def cache_adapter(self, adapter_key: str, weights: LoRAWeights) -> None:
        """Put weights read elsewhere (validated by `read_adapter`) into host memory, if there is room."""
        self._catalog().manager.put(adapter_key, weights)

    def remove_adapter(self, adapter_id: str) -> None:
        """New requests cannot name it any more; running ones finish with it, waiting ones fail."""
        self.discard_adapter(self.remove_adapter_path(adapter_id))

    def remove_adapter_path(self, adapter_id: str) -> str:
        """Any thread: new requests for `adapter_id` are refused from now on; returns its adapter key."""
        return self._catalog().remove_path(adapter_id)

    def discard_adapter(self, adapter_key: str) -> None:
        """The cache forgets `adapter_key` (once its running requests finish); its waiting requests fail."""
        self._catalog().manager.remove(adapter_key)
        self.scheduler.fail_waiting(adapter_key, AdapterNotFoundError(f"adapter {adapter_key!r} was removed"))

    def resolve_adapter(self, adapter_id: str) -> ResolvedAdapter:
        """The version of `adapter_id` a new request gets (may read the registry); AdapterNotFoundError if unknown."""
        return self._catalog().resolve(adapter_id)

    def list_adapters(self) -> list[ResolvedAdapter]:
        """Every adapter a request can name (may read the registry); empty when LoRA is off."""
        return [] if self.catalog is None else self.catalog.list_adapters()

    def registry_health(self) -> RegistryHealth:
        """Any thread: the registry as the last lookup saw it (never calls it); "not configured" when LoRA is off."""
        return NO_REGISTRY if self.catalog is None else self.catalog.registry_health()

    def check_registry(self) -> RegistryHealth:
        """Any thread: ping the registry (at most `registry_timeout_s`), then its health."""
        return NO_REGISTRY if self.catalog is None else self.catalog.check_registry()

    @property
    def added_adapter_ids(self) -> list[str]:
        """Adapters added by path (registered ones: see the registry)."""
        return [] if self.catalog is None else self.catalog.added_ids

    def _catalog(self) -> AdapterCatalog:
        if self.catalog is None:
            raise ValueError(LORA_OFF)
        return self.catalog

    # ---- requests ----------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter_id: str | None = None,
        timeout: float | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        """Validate and queue one request; bad input raises ValueError and changes nothing."""
        adapter = self.resolve_adapter(adapter_id) if adapter_id is not None else None
        request = self.make_request(prompt, sampling_params, request_id, adapter, timeout=timeout,
                                    cache_salt=cache_salt)
        self.add(request)
        return request

    def make_request(
        self,
        prompt: Prompt,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: ResolvedAdapter | None = None,
        prompt_text: str | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        timeout: float | None = None,
        cache_salt: str | None = None,
    ) -> Request:
        """Build a validated Request without queueing it (AsyncLLM builds requests outside the engine thread).

        `prompt` is text (tokenized here) or token ids; `prompt_text` names token ids' text in outputs.
        `timeout`: seconds from now after which the request finishes with finish_reason "timeout" (at the
        next step, waiting or running, with what it generated so far); must be > 0 and finite; None: none.
        `cache_salt`: the request shares prefix-cached K/V only with requests of the same salt (e.g. its tenant)
        and adapter version; a non-empty string, or None.
        """
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if adapter is not None and not isinstance(adapter, ResolvedAdapter):
            raise ValueError(f"adapter must be a ResolvedAdapter (see resolve_adapter), got {type(adapter).__name__}")
        text, token_ids = self._tokenize(prompt)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = Request(request_id, token_ids, params, prompt=text or prompt_text, adapter=adapter,
                          output_kind=output_kind, timeout=timeout, cache_salt=cache_salt)
        if not params.is_greedy:
            request.seed = params.seed if params.seed is not None else random.getrandbits(63)
            # on the model's device: the sampler draws each row's noise there (no host round trip per step)
            request.generator = torch.Generator(device=self.runner.device).manual_seed(request.seed)
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
        if len(token_ids) >= self.max_seq_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {self.max_seq_len} "
                "(prompt + at least one generated token must fit); shorten the prompt"
            )

    def add(self, request: Request) -> None:
        """Queue a request built by `make_request`."""
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.adapter is not None:
            self._catalog().admit(request.adapter)
        self._requests[request.request_id] = request
        self.output_processor.add(request)
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request now (finish_reason "abort"), freeing its blocks; its last output, or None if unknown."""
        request = self.scheduler.abort(request_id)
        return None if request is None else self._finish_step([request])[0]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One continuous-batching step; returns the outputs of requests that advanced or finished."""
        batch = self.scheduler.schedule()
        failed = self.scheduler.take_finished()  # adapter load failed, or deadline passed
        if batch.is_empty:
            if self.scheduler.is_waiting_for_adapters:  # adapters are on their way from disk: do not spin
                self._catalog().manager.wait(timeout=self._idle_wait())
            return self._finish_step(failed)
        self.stats.observe_step(len(batch.requests), batch.num_tokens)
        result = self._run(batch)
        failed += self._fail(batch, result.errors)
        live = [r for r in batch.sampling_requests if not r.is_finished]
        updated = self.scheduler.postprocess(batch, *result.tokens_for(live))
        return self._finish_step(failed + updated)

    def _idle_wait(self, longest: float = 0.05) -> float:
        """How long an idle step may sleep: `longest`, or less when a deadline comes sooner."""
        deadline = self.scheduler.next_deadline
        return longest if deadline is None else min(longest, max(deadline - time.monotonic(), 0.0))

    def _run(self, batch: ScheduledBatch) -> StepOutput:
        try:
            return self.runner.run(batch, self.block_manager)
        except Exception as exc:  # a failed forward fails its batch, never the engine
            logger.exception("forward pass failed for %d requests", len(batch.requests))
            error = RuntimeError(f"forward pass failed: {exc}")
            return StepOutput(errors={r.request_id: error for r in batch.requests})

    def _fail(self, batch: ScheduledBatch, errors: dict[str, Exception]) -> list[Request]:
        """Finish the requests of `batch` that failed this step, each with its own error; the others go on."""
        failed = [r for r in batch.requests if r.request_id in errors]
        for req in failed:
            error = errors[req.request_id]
            logger.error("request %s failed: %s", req.request_id, error, exc_info=error)
            self.scheduler.finish_request(req, FinishReason.ERROR, error)
        return failed

    def _finish_step(self, requests: list[Request]) -> list[RequestOutput]:
        outputs = self.output_processor.process(requests, self.scheduler.finish_request)
        for req in requests:
            if req.is_finished and self._requests.pop(req.request_id, None) is not None and req.adapter is not None:
                self._catalog().finished(req.adapter)
        if self.check_when_idle and not self.scheduler.has_unfinished():
            self.check_invariants(idle=True)
        return outputs

    # ---- state ---------------------------------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        """A frozen copy of the engine's state and counters (call it in the thread that steps the engine)."""
        manager = self.adapter_manager
        adapter_cache = None if manager is None else AdapterCacheSnapshot(
            self.added_adapter_ids, manager.slot_keys, manager.host_keys, dataclasses.replace(manager.stats))
        return EngineSnapshot(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            waiting_adapters=adapter_ids(self.scheduler.waiting),
            running_adapters=adapter_ids(self.scheduler.running),
            num_kv_blocks_used=self.block_manager.num_used_blocks,
            num_kv_blocks=self.block_manager.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            stats=self.stats.copy(),
            adapter_cache=adapter_cache,
            prefix_cache=PrefixCacheSnapshot(self.block_manager.prefix_cache is not None,
                                             self.block_manager.num_cached_blocks,
                                             dataclasses.replace(self.scheduler.prefix_cache_stats)),
        )

    def check_invariants(self, idle: bool = False) -> None:
        """The allocators' invariants (InvariantError when broken); `idle`: nothing may be held either.
        Runs whenever the engine goes idle with LORAX_DEBUG_INVARIANTS=1 (as in the tests)."""
        self.block_manager.check_invariants(idle=idle)
        if self.adapter_manager is not None:
            self.adapter_manager.check_invariants(idle=idle)


def adapter_ids(requests: Iterable[Request]) -> tuple[str, ...]:
    """The distinct adapter ids `requests` named, sorted (base-model requests name none)."""
    return tuple(sorted({r.adapter_id for r in requests if r.adapter_id is not None}))


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """End-of-sequence ids as transformers `generate` uses them: generation config, else model config, else
    tokenizer."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config.get_text_config(), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)

"""ModelRunner: one scheduled batch -> one flattened forward pass of the HF model -> one token per sampling request.

A request never fails its batch. A row the sampler cannot sample fails its own request only (see
engine/sampler.py). A forward pass that raises is run again in halves, recursively, until the
requests whose forward fails even alone are found: they fail, and every other request gets the
token it would have got anyway (running a sequence's tokens again rewrites the same K/V rows with
the same values; no sequence reads another's rows). A failure that only a large batch hits (out of
memory, say) thus costs no request at all.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from lorax_lite.engine.attention import (
    ATTN_IMPLEMENTATION,
    AttentionBackend,
    AttentionMetadata,
    SdpaBackend,
    StepLayout,
    forward_context,
    register_attention,
)
from lorax_lite.engine.cuda_graphs import DecodeGraphs, GraphFactory
from lorax_lite.engine.kv_cache import BlockManager, KVCache, ModelShape
from lorax_lite.engine.request import Request
from lorax_lite.engine.sampler import Sampler, SamplerOutput
from lorax_lite.engine.scheduler import ScheduledBatch
from lorax_lite.engine.staging import StepUploader
from lorax_lite.lora.layers import LoRALayers
from lorax_lite.lora.ops import LoRAMapping, lora_context

logger = logging.getLogger(__name__)


class ForwardError(RuntimeError):
    """The forward pass raised for a request even when it ran alone (its cause is what was raised)."""


@dataclass
class StepInputs:
    """The flat batch of one step, as tensors on the model's device."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    logits_indices: torch.Tensor  # [S] index in T of the last token of each sampling sequence
    attention: AttentionMetadata
    lora: LoRAMapping | None  # None: no token of this step has an adapter


@dataclass
class StepOutput:
    """What one step produced, per request id: the token (and its logprob) of each sampling request that
    did not fail, and what failed each request that did."""

    sampled: dict[str, tuple[int, float]] = field(default_factory=dict)  # request id -> (token id, logprob)
    errors: dict[str, Exception] = field(default_factory=dict)  # request id -> why it failed this step

    @classmethod
    def of(cls, requests: list[Request], sampled: SamplerOutput) -> StepOutput:
        """The sampler's rows as results of `requests` (row i is requests[i])."""
        out = cls()
        for i, req in enumerate(requests):
            if i in sampled.errors:
                out.errors[req.request_id] = sampled.errors[i]
            else:
                out.sampled[req.request_id] = (sampled.token_ids[i], sampled.logprobs[i])
        return out

    def merged(self, other: StepOutput) -> StepOutput:
        return StepOutput({**self.sampled, **other.sampled}, {**self.errors, **other.errors})

    def tokens_for(self, requests: list[Request]) -> tuple[list[int], list[float]]:
        """The token ids and logprobs sampled for `requests`, in their order (none of them failed)."""
        pairs = [self.sampled[r.request_id] for r in requests]
        return [t for t, _ in pairs], [lp for _, lp in pairs]


class ModelRunner:
    """Runs the HF model (its attention swapped for the paged one) over flattened batches."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_kv_blocks: int,
        block_size: int,
        lora_layers: LoRALayers | None = None,
        attention: AttentionBackend | None = None,
    ) -> None:
        self.model = model
        self.lora_layers = lora_layers
        self.attention = attention or SdpaBackend()
        self.device = next(model.parameters()).device
        self.uploader = StepUploader(self.device)
        self.graphs: DecodeGraphs | None = None  # see enable_decode_graphs
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        self.shape = ModelShape.of(model)
        model.set_attn_implementation(register_attention())
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(
                f"{type(model).__name__} does not support custom attention (transformers' AttentionInterface)"
            )
        s = self.shape
        self.kv_cache = KVCache(
            s.num_layers, num_kv_blocks, block_size, s.num_kv_heads, s.head_dim, self.dtype, self.device
        )
        self.sampler = Sampler()

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, block_manager: BlockManager) -> StepOutput:
        """A token for each of `batch.sampling_requests`, or the error of each request that failed: its row could
        not be sampled, or its forward pass raised even alone (ForwardError)."""
        with self._on_device():
            try:
                return self._run_once(batch, block_manager)
            except Exception as exc:
                if len(batch.requests) == 1:
                    return self._failed_alone(batch, exc)
                logger.warning("forward pass of %d requests failed (%s: %s); running it again in halves to find "
                               "the requests it fails for", len(batch.requests), type(exc).__name__, exc)
                return self._bisect(batch, block_manager)

    def _on_device(self) -> contextlib.AbstractContextManager:
        """The model's GPU as the current CUDA device (Triton kernels and graphs launch on the current one, and
        the engine thread's is cuda:0 whatever the model's is); nothing on the CPU."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _bisect(self, batch: ScheduledBatch, block_manager: BlockManager) -> StepOutput:
        outputs = []
        for half in batch.split():
            try:
                outputs.append(self._run_once(half, block_manager))
            except Exception as exc:
                many = len(half.requests) > 1
                outputs.append(self._bisect(half, block_manager) if many else self._failed_alone(half, exc))
        return outputs[0].merged(outputs[1])

    @staticmethod
    def _failed_alone(batch: ScheduledBatch, exc: Exception) -> StepOutput:
        error = ForwardError(f"forward pass failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return StepOutput(errors={batch.requests[0].request_id: error})

    def clear_blocks(self, blocks: list[int]) -> None:
        """Zero the K/V rows of `blocks` in every layer."""
        if not blocks:
            return
        bs = self.block_size
        rows = (torch.tensor(blocks)[:, None] * bs + torch.arange(bs)).flatten().to(self.device)  # [len(blocks) * bs]
        for key, value in zip(self.kv_cache.key, self.kv_cache.value, strict=True):
            key.index_fill_(0, rows, 0)
            value.index_fill_(0, rows, 0)

    def enable_decode_graphs(self, factory: GraphFactory, max_batch: int, max_seq_len: int) -> DecodeGraphs:
        """Capture decode graphs (engine/cuda_graphs.py) for up to `max_batch` sequences of up to `max_seq_len`
        tokens; decode-only steps replay them from now on. Raises ValueError when the backends cannot be captured."""
        graphs = DecodeGraphs(
            self.model, self.kv_cache, self.attention, self.lora_layers, max_batch,
            -(-max_seq_len // self.block_size), self.block_size, self.device, factory,
        )
        with torch.inference_mode(), self._on_device():
            graphs.capture()
        self.graphs = graphs
        return graphs

    def _run_once(self, batch: ScheduledBatch, block_manager: BlockManager) -> StepOutput:
        ordered = self._group_by_lora_slot(batch)
        requests = ordered.sampling_requests
        logits = self._run_graph(ordered, block_manager)
        if logits is not None:
            return StepOutput.of(requests, self.sampler(logits, requests))
        inputs = self._prepare_inputs(ordered, block_manager)
        with forward_context(inputs.attention), lora_context(inputs.lora):
            out = self.model(
                input_ids=inputs.input_ids,
                position_ids=inputs.position_ids,
                use_cache=False,
                logits_to_keep=inputs.logits_indices,
            )
        return StepOutput.of(requests, self.sampler(out.logits[0], requests))

    def _run_graph(self, batch: ScheduledBatch, block_manager: BlockManager) -> torch.Tensor | None:
        """The logits [S, V] of a decode step replayed from a CUDA graph; None when the step must run eagerly."""
        graphs = self.graphs
        if graphs is None or not graphs.fits(batch.num_new_tokens):  # before the layout: an eager step builds its own
            return None
        if not all(batch.samples(i) for i in range(len(batch.requests))):  # a one-token chunk of a long prompt
            return None
        layout, token_ids, positions = self._layout(batch, block_manager)
        if layout.block_tables.shape[1] > graphs.max_blocks:
            return None
        slot_ranks = self.lora_layers.slot_ranks if self.lora_layers is not None else []
        return graphs.run(layout, token_ids, positions, [r.lora_slot for r in batch.requests], slot_ranks)

    @staticmethod
    def _group_by_lora_slot(batch: ScheduledBatch) -> ScheduledBatch:
        """The batch with adapter requests first, grouped by slot, and base-model requests last (see lora/ops.py)."""
        slots = [r.lora_slot for r in batch.requests]
        if all(s is None for s in slots):
            return batch
        order = sorted(range(len(slots)), key=lambda i: (slots[i] is None, slots[i] or 0))
        return ScheduledBatch([batch.requests[i] for i in order], [batch.num_new_tokens[i] for i in order])

    def _prepare_lora(self, batch: ScheduledBatch) -> LoRAMapping | None:
        if self.lora_layers is None or all(r.lora_slot is None for r in batch.requests):
            return None
        seq_slots = [r.lora_slot for r in batch.requests]
        needs_kernel_meta = self.lora_layers.backend.needs_kernel_meta
        return LoRAMapping.build(
            seq_slots, batch.num_new_tokens, self.lora_layers.slot_ranks, self.device, kernel_meta=needs_kernel_meta
        )

    def _prepare_inputs(self, batch: ScheduledBatch, block_manager: BlockManager) -> StepInputs:
        """The step's inputs: built on the host, then uploaded in one copy (see engine/staging.py)."""
        layout, token_ids, positions = self._layout(batch, block_manager)
        sampling = torch.tensor([batch.samples(i) for i in range(len(batch.requests))])
        logits_indices = (layout.starts + layout.num_new - 1)[sampling]
        host = {"input_ids": token_ids, "positions": positions, "logits_indices": logits_indices}
        uploaded, attention = self.uploader.upload(host, self.attention.host_tensors(layout))
        return StepInputs(
            input_ids=uploaded["input_ids"].unsqueeze(0),
            position_ids=uploaded["positions"].unsqueeze(0),
            logits_indices=uploaded["logits_indices"],
            attention=AttentionMetadata(self.kv_cache, self.attention, self.attention.metadata(layout, attention)),
            lora=self._prepare_lora(batch),
        )

    def _layout(self, batch: ScheduledBatch, block_manager: BlockManager) -> tuple[StepLayout, torch.Tensor,
                                                                                      torch.Tensor]:
        """Where the step's tokens go (host tensors), with their token ids [T] and positions [T]."""
        reqs, counts = batch.requests, batch.num_new_tokens
        context = torch.tensor([r.num_computed_tokens for r in reqs])  # [S] tokens already cached
        num_new = torch.tensor(counts)  # [S]
        starts = torch.cumsum(num_new, 0) - num_new  # [S] first index of each sequence in T
        token_ids = [t for r, n in zip(reqs, counts, strict=True)
                     for t in r.token_ids_slice(r.num_computed_tokens, r.num_computed_tokens + n)]
        seq_of_token = torch.repeat_interleave(torch.arange(len(reqs)), num_new)  # [T]
        positions = context[seq_of_token] + torch.arange(len(token_ids)) - starts[seq_of_token]  # [T]
        block_tables = self._prepare_block_tables(reqs, block_manager)  # [S, max_blocks]
        bs = self.block_size
        kv_rows = block_tables[seq_of_token, positions // bs] * bs + positions % bs  # [T]
        layout = StepLayout(context, num_new, starts, block_tables, kv_rows, bs)
        return layout, torch.tensor(token_ids), positions

    @staticmethod
    def _prepare_block_tables(reqs: list, block_manager: BlockManager) -> torch.Tensor:
        """[S, max_blocks]; a short table is padded with its own first block: attention masks the padding, but
        its rows still enter the matmul (0 x NaN is NaN), so they must be rows no other request wrote."""
        tables = [block_manager.block_table(r.request_id) for r in reqs]
        width = max(len(t) for t in tables)
        return torch.tensor([t + t[:1] * (width - len(t)) for t in tables], dtype=torch.long)

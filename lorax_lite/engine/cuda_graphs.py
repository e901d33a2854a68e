"""CUDA graphs for decode steps: captured once at start-up for bucketed batch sizes, replayed for decode-only steps.

A small model on a GPU is launch-bound: a decode step of SmolLM2-135M is ~30 layers x ~20 kernels, each a few
microseconds of work and as long again to launch from Python. A CUDA graph records the whole forward pass once and
replays it with one launch. What the graph reads must live at fixed addresses, so each step's inputs are copied
into static buffers first, in one host-to-device copy:

- token ids, positions, KV rows, sequence lengths and block tables (the Triton attention backend's decode
  metadata: engine/attention_triton.py), and
- the LoRA mapping as tensors: each row's slot (-1: base model) and each slot's rank, read by the Triton BGMV
  kernels (lora/ops.py), so one graph serves any mix of adapters.

A step of S sequences replays the graph of the smallest bucket B >= S; rows S..B are padding (KV row -1: nothing
written; length 0: nothing attended; slot -1: no delta) and their logits are ignored. Steps with a prefill, or
more sequences than the largest bucket, run eagerly.

`GraphFactory` makes the graphs: `CudaGraphFactory` on a GPU; `CheckedEagerFactory` runs the same capture and
replay logic without a GPU (it is what the CPU tests use) and refuses, during "capture", every operation that
would read a device value on the host (`.item()`, `.tolist()`, `nonzero`...), which a real capture cannot record.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorax_lite.engine.attention import AttentionBackend, AttentionMetadata, StepLayout, forward_context
from lorax_lite.engine.attention_triton import TritonMetadata
from lorax_lite.engine.kv_cache import KVCache
from lorax_lite.lora.layers import LoRALayers
from lorax_lite.lora.ops import LoRAMapping, lora_context

logger = logging.getLogger(__name__)

Forward = Callable[[], torch.Tensor]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs, and max_num_seqs itself."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return [*sizes, max_num_seqs]


class CapturedGraph(ABC):
    """One captured forward pass: `replay()` runs it again over the static buffers; `output` holds its result."""

    output: torch.Tensor

    @abstractmethod
    def replay(self) -> None: ...


class GraphFactory(ABC):
    @abstractmethod
    def capture(self, forward: Forward) -> CapturedGraph:
        """Record `forward` (which reads only static buffers) and return the graph."""


class _CudaGraph(CapturedGraph):
    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor) -> None:
        self.graph, self.output = graph, output

    def replay(self) -> None:
        self.graph.replay()


class CudaGraphFactory(GraphFactory):
    """torch.cuda.CUDAGraph, all graphs in one memory pool (captured largest first, so the smaller reuse it)."""

    def __init__(self) -> None:
        self.pool: Any = None

    def capture(self, forward: Forward) -> CapturedGraph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
            with refusing_host_syncs():  # a clear HostSyncError here rather than a failed capture
                forward()
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        if self.pool is None:
            self.pool = graph.pool()
        return _CudaGraph(graph, output)


class HostSyncError(RuntimeError):
    """A captured forward pass read a device value on the host: a CUDA graph cannot record that."""


@contextlib.contextmanager
def refusing_host_syncs() -> Iterator[None]:
    """Within: every operation that reads a device value on the host raises HostSyncError. The aten ops below
    are caught by a dispatch mode; `tolist()` and `numpy()`, which dispatch no aten op on the CPU, are patched."""

    def refuse(name: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise HostSyncError(f"Tensor.{name}() reads device values on the host; a CUDA graph cannot capture it")
        return refused

    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
    try:
        for name in originals:
            setattr(torch.Tensor, name, refuse(name))
        with _RefuseHostSyncs():
            yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


class _RefuseHostSyncs(TorchDispatchMode):
    # aten ops whose result depends on tensor values in a way a graph cannot replay
    REFUSED = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"})

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in self.REFUSED:
            raise HostSyncError(f"aten.{name} reads device values on the host; a CUDA graph cannot capture it")
        return func(*args, **(kwargs or {}))


class _EagerGraph(CapturedGraph):
    def __init__(self, forward: Forward, output: torch.Tensor, factory: CheckedEagerFactory) -> None:
        self.forward, self.output, self.factory = forward, output, factory

    def replay(self) -> None:
        self.factory.replays += 1
        self.output.copy_(self.forward())


class CheckedEagerFactory(GraphFactory):
    """A graph without a GPU: "replay" runs the forward pass again into the same output tensor. "Capture" runs it
    once with every host read of a device value refused (`refusing_host_syncs`), so the CPU tests catch much of
    what would break a real capture. Not all: on the CPU, a host-to-device copy inside the forward pass (a
    `torch.tensor(..., device=...)`, which a graph would record as a constant) is invisible."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, forward: Forward) -> CapturedGraph:
        with refusing_host_syncs():
            output = forward()
        self.captures += 1
        return _EagerGraph(forward, output, self)


@dataclass
class _StaticInputs:
    """Views of one int32 device buffer, written by one copy per step."""

    input_ids: torch.Tensor  # [M]
    positions: torch.Tensor  # [M]
    kv_rows: torch.Tensor  # [M]
    seq_lens: torch.Tensor  # [M]
    token_slots: torch.Tensor  # [M]
    slot_ranks: torch.Tensor  # [L]
    block_tables: torch.Tensor  # [M, NB]


class DecodeGraphs:
    """Decode graphs of one model at the batch sizes `graph_batch_sizes(max_batch)`; see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        attention: AttentionBackend,
        lora_layers: LoRALayers | None,
        max_batch: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        factory: GraphFactory,
    ) -> None:
        reason = self.unsupported_reason(attention, lora_layers)
        if reason is not None:
            raise ValueError(reason)
        self.model, self.kv_cache, self.attention, self.lora_layers = model, kv_cache, attention, lora_layers
        self.block_size, self.device, self.factory = block_size, device, factory
        self.sizes = graph_batch_sizes(max_batch)
        self.max_blocks = max_blocks_per_seq
        self._sections = self._layout(max_batch, lora_layers.max_loras if lora_layers else 0, max_blocks_per_seq)
        total = sum(numel for _, numel, _ in self._sections)
        self._device_buffer = torch.zeros(total, dtype=torch.int32, device=device)
        self._host_buffer = torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.static = _StaticInputs(**self._views(self._device_buffer))
        self._host = _StaticInputs(**self._views(self._host_buffer))
        self._reset_host(0, max_batch)
        self._device_buffer.copy_(self._host_buffer)
        self._copied: torch.cuda.Event | None = None  # the last upload from the host buffer (CUDA only)
        self.graphs: dict[int, CapturedGraph] = {}

    @staticmethod
    def unsupported_reason(attention: AttentionBackend, lora_layers: LoRALayers | None) -> str | None:
        """None when these backends can be captured; else why not, as a sentence."""
        if not attention.graph_capturable:
            return f"attention backend {attention.name!r} cannot be captured in a CUDA graph"
        if lora_layers is not None and not lora_layers.backend.needs_kernel_meta:
            return "CUDA graphs with LoRA need lora_backend triton (its decode kernel reads tensors only)"
        return None

    @staticmethod
    def _layout(rows: int, slots: int, blocks: int) -> list[tuple[str, int, tuple[int, ...]]]:
        one = (rows,)
        return [("input_ids", rows, one), ("positions", rows, one), ("kv_rows", rows, one), ("seq_lens", rows, one),
                ("token_slots", rows, one), ("slot_ranks", max(slots, 1), (max(slots, 1),)),
                ("block_tables", rows * blocks, (rows, blocks))]

    def _views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, numel, shape in self._sections:
            views[name] = buffer[offset : offset + numel].view(shape)
            offset += numel
        return views

    def _reset_host(self, start: int, end: int) -> None:
        """Padding in rows [start, end) of the host buffer: nothing written, nothing attended, no adapter. (A row's
        block-table entries past its length are never read, so they need no reset.)"""
        h = self._host
        for t in (h.input_ids, h.positions, h.seq_lens):
            t[start:end] = 0
        h.kv_rows[start:end] = -1
        h.token_slots[start:end] = -1

    # ---- capture ------------------------------------------------------------------------------------------------

    def capture(self) -> None:
        """Capture every bucket, largest first (they share one memory pool)."""
        for size in sorted(self.sizes, reverse=True):
            self.graphs[size] = self.factory.capture(self._forward_of(size))
        logger.info("captured decode graphs for batch sizes %s", ", ".join(map(str, self.sizes)))

    def _forward_of(self, size: int) -> Forward:
        s = self.static
        meta = TritonMetadata(
            kv_rows=s.kv_rows[:size],
            block_tables=s.block_tables[:size],
            seq_lens=s.seq_lens[:size],
            query_start_loc=None,
            block_size=self.block_size,
            max_query_len=1,
        )
        attention = AttentionMetadata(self.kv_cache, self.attention, meta)
        mapping = None if self.lora_layers is None else LoRAMapping.for_graph(s.token_slots[:size], s.slot_ranks)
        input_ids, positions = s.input_ids[:size].unsqueeze(0), s.positions[:size].unsqueeze(0)

        def forward() -> torch.Tensor:
            with forward_context(attention), lora_context(mapping):
                out = self.model(input_ids=input_ids, position_ids=positions, use_cache=False)
            return out.logits[0]  # [size, V]

        return forward

    # ---- replay -------------------------------------------------------------------------------------------------

    def fits(self, num_new_tokens: list[int]) -> bool:
        """Whether a step of sequences computing these token counts may replay a graph: decode-only (one token
        each), at most the largest bucket. (Its block tables must also be at most `max_blocks` wide.)"""
        return bool(self.graphs) and len(num_new_tokens) <= self.sizes[-1] and all(n == 1 for n in num_new_tokens)

    def run(
        self,
        layout: StepLayout,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_slots: list[int | None],
        slot_ranks: list[int],
    ) -> torch.Tensor:
        """The logits [S, V] of a decode step that `fits` (and whose block tables do): its inputs copied into the
        static buffers, then a replay."""
        num_seqs = len(seq_slots)
        size = self.sizes[bisect.bisect_left(self.sizes, num_seqs)]
        h = self._host
        if self._copied is not None:  # the previous step's upload must have left the host buffer before it changes
            self._copied.synchronize()
        self._reset_host(num_seqs, size)
        h.input_ids[:num_seqs] = token_ids
        h.positions[:num_seqs] = positions
        h.kv_rows[:num_seqs] = layout.kv_rows
        h.seq_lens[:num_seqs] = layout.context_lens + 1
        h.block_tables[:num_seqs, : layout.block_tables.shape[1]] = layout.block_tables
        h.token_slots[:num_seqs] = torch.tensor([-1 if s is None else s for s in seq_slots], dtype=torch.int32)
        if slot_ranks:
            h.slot_ranks[: len(slot_ranks)] = torch.tensor(slot_ranks, dtype=torch.int32)
        # the step's one host-to-device copy: everything but the block tables' rows past this bucket (last section)
        used = self._device_buffer.numel() - self.static.block_tables.numel() + size * self.max_blocks
        self._device_buffer[:used].copy_(self._host_buffer[:used], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        graph = self.graphs[size]
        graph.replay()
        return graph.output[:num_seqs]

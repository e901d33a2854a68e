"""The batched LoRA delta for a mixed batch: every token gets its own adapter's `x @ A.T @ B`.

The runner orders the flat batch so that tokens with an adapter come first, grouped by slot in
slot order, and tokens for the base model come last. It describes that order once per step in a
`LoRAMapping`; every `LoRALinear` then adds the delta for the whole batch with a backend:

- `GroupedMatmulBackend`: two grouped GEMMs (`torch.nn.functional.grouped_mm`, an SGMV-style
  segmented matmul) over the slots in use: no gather of weights, no Python loop over requests
  or adapters. Used wherever torch supports it for the device and dtype.
- `SegmentBackend`: one pair of matmuls per adapter present in the step (at most `max_loras`),
  for torch builds or devices without grouped_mm.

Both switch to two plain `bmm` calls over a padded [slots, rows] grid when the step's groups are
even (decode steps: one token per request), which costs less per call than a grouped GEMM.

- `TritonLoRABackend`: Punica-style Triton kernels (lorax_lite/kernels/lora.py), the default on CUDA: SGMV over
  the step's segments, or BGMV over every row in decode steps, which a CUDA graph can capture. It reads the
  step's `LoRAKernelMeta`, device tensors the runner builds with the mapping when the backend `needs_kernel_meta`.

`select_backend` picks one ("auto") or takes the one asked for by name (`LORA_BACKENDS`).
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lorax_lite.config import LORA_BACKENDS
from lorax_lite.kernels import check_triton, triton_unusable_reason


@dataclass
class LoRAKernelMeta:
    """A step's token->slot mapping as int32 device tensors, for the Triton kernels; copied to the device at once.

    BGMV (decode) reads only `token_slots` and `slot_ranks`; SGMV reads the segments, `slot_ranks` and
    `max_segment_len`. A CUDA graph that captures BGMV keeps static tensors of these shapes and copies each step's
    values into them.
    """

    token_slots: torch.Tensor  # [T] slot of every row of the step's x; -1: base model (and padding rows)
    slot_ranks: torch.Tensor  # [max_loras] rank of each slot's adapter (0: empty)
    seg_slots: torch.Tensor  # [G] slot of each segment: the tokens of one slot (the mapping's `segments`)
    seg_starts: torch.Tensor  # [G] first token of each segment
    seg_ends: torch.Tensor  # [G] end (exclusive) of each segment
    max_segment_len: int  # host value: the longest segment's token count (sizes SGMV's grid)

    @classmethod
    def build(cls, token_slots: torch.Tensor, slot_ranks: list[int], segments: list[tuple[int, int, int]],
              device: torch.device) -> LoRAKernelMeta:
        """From `token_slots` ([T] int32 on the host), one rank per slot and the (slot, start, end) segments.

        Everything is packed into one host int32 tensor (pinned for CUDA), copied once, and viewed. With no
        segments and every token slot -1 it is a decode step without adapters (e.g. a CUDA graph's static tensors).
        """
        seg_table = torch.tensor(segments, dtype=torch.int32).reshape(-1, 3).T.flatten()  # slots, starts, ends
        parts = [token_slots, torch.tensor(slot_ranks, dtype=torch.int32), seg_table]
        sizes = [len(token_slots), len(slot_ranks), *[len(segments)] * 3]
        host = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=device.type == "cuda")
        torch.cat(parts, out=host)
        token, ranks, seg_slots, seg_starts, seg_ends = host.to(device, non_blocking=True).split(sizes)
        max_segment_len = max((end - start for _, start, end in segments), default=0)
        return cls(token, ranks, seg_slots, seg_starts, seg_ends, max_segment_len)


@dataclass
class LoRAMapping:
    """Where each slot's tokens are in a step's flat batch; built once per step by the runner.

    Only slots [first_slot, first_slot + num_slots) are touched: the lowest to the highest slot
    with tokens. When
    the groups are even enough (padding at most doubles the rows, as in decode steps), the step
    also gets a padded layout: token i goes to row `pad_dest[i]` of a [num_slots, pad_len] grid,
    so each layer runs two plain batched matmuls (`bmm`) instead of a grouped GEMM.
    """

    num_lora_tokens: int  # tokens [0, n) have an adapter; the rest are base-model tokens
    first_slot: int
    num_slots: int
    group_ends: torch.Tensor  # [num_slots] int32, end (exclusive) of each slot's tokens; on the model's device
    segments: list[tuple[int, int, int]]  # (slot, start, end) of every slot with tokens this step
    max_rank: int  # the largest rank among the step's slots: buffers are sliced to it
    pad_len: int | None = None  # rows per slot in the padded layout; None: no padded layout this step
    pad_dest: torch.Tensor | None = None  # [n] row of each token in the grid; None: row i (no padding)
    decode: bool = False  # every sequence has exactly one token this step
    kernel: LoRAKernelMeta | None = None  # device tensors for TritonLoRABackend; None unless asked for

    @classmethod
    def build(
        cls, seq_slots: list[int | None], seq_tokens: list[int], slot_ranks: list[int], device: torch.device,
        kernel_meta: bool = False, num_tokens: int | None = None,
    ) -> LoRAMapping:
        """From each sequence's slot (None: base model) and token count, in flat-batch order.

        The sequences must already be ordered as described above (adapter ones by slot, then None).
        `slot_ranks` has one rank per slot (max_loras of them). `kernel_meta`: also build `kernel`, for a backend
        that `needs_kernel_meta`; its `token_slots` covers `num_tokens` rows (default: the sequences' tokens), the
        rows past the sequences' tokens (padding, as in a CUDA graph's batch) get -1.
        """
        ordered = [s for s in seq_slots if s is not None]
        if not ordered or ordered != sorted(ordered) or seq_slots[: len(ordered)] != ordered:
            raise ValueError("at least one sequence needs an adapter (else publish no mapping); sequences with an "
                             "adapter must come first, in slot order, then base-model ones")
        first = ordered[0]
        counts = [0] * (ordered[-1] + 1 - first)
        for slot, n in zip(ordered, seq_tokens, strict=False):  # adapter sequences are a prefix of all
            counts[slot - first] += n
        ends, segments, start = [], [], 0
        for i, n in enumerate(counts):
            if n:
                segments.append((first + i, start, start + n))
            start += n
            ends.append(start)
        max_rank = max(slot_ranks[s] for s, _, _ in segments)
        # the kernels read only `kernel`: then the torch backends' tensors stay on the host (one upload per step)
        ends_tensor = torch.tensor(ends, dtype=torch.int32, device="cpu" if kernel_meta else device)
        mapping = cls(start, first, len(counts), ends_tensor, segments, max_rank, decode=set(seq_tokens) == {1})
        if kernel_meta:
            token_slots = _token_slots(seq_slots, seq_tokens, num_tokens)
            mapping.kernel = LoRAKernelMeta.build(token_slots, slot_ranks, segments, device)
        else:
            mapping._plan_padding(counts, device)
        return mapping

    @classmethod
    def for_graph(cls, token_slots: torch.Tensor, slot_ranks: torch.Tensor) -> LoRAMapping:
        """A decode mapping over static device tensors (int32): each row's slot (-1: none) and each slot's rank. A
        CUDA graph captures TritonLoRABackend's decode kernels with it; each step writes new values into the same
        tensors (engine/cuda_graphs.py)."""
        empty = token_slots.new_empty(0)
        kernel = LoRAKernelMeta(token_slots, slot_ranks, empty, empty, empty, max_segment_len=0)
        rows = len(token_slots)
        return cls(rows, 0, len(slot_ranks), empty, [], 0, decode=True, kernel=kernel)

    def _plan_padding(self, counts: list[int], device: torch.device) -> None:
        pad_len = max(counts)
        if self.num_slots * pad_len > 2 * self.num_lora_tokens:
            return  # too uneven (a long prefill beside short ones): the grouped path wastes nothing
        self.pad_len = pad_len
        if all(c == pad_len for c in counts):
            return  # every slot in range has pad_len tokens: the grid is the batch itself
        dest = [
            (slot - self.first_slot) * pad_len + k for slot, start, end in self.segments for k in range(end - start)
        ]
        self.pad_dest = torch.tensor(dest, device=device)


def _token_slots(seq_slots: list[int | None], seq_tokens: list[int], num_tokens: int | None) -> torch.Tensor:
    """[num_tokens] int32 host tensor: each token's slot, -1 for base-model tokens and padding rows."""
    slots = torch.tensor([-1 if s is None else s for s in seq_slots], dtype=torch.int32)
    token_slots = torch.repeat_interleave(slots, torch.tensor(seq_tokens, dtype=torch.long))
    total = len(token_slots) if num_tokens is None else num_tokens
    if total < len(token_slots):
        raise ValueError(f"num_tokens {num_tokens} is less than the sequences' {len(token_slots)} tokens")
    return torch.cat([token_slots, torch.full((total - len(token_slots),), -1, dtype=torch.int32)])


class LoRABackend(ABC):
    """Adds each token's LoRA delta to a linear layer's output."""

    name: str  # its name in config.LORA_BACKENDS
    needs_kernel_meta: bool = False  # whether add_delta reads mapping.kernel (LoRAMapping.build(kernel_meta=True))

    @abstractmethod
    def add_delta(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  mapping: LoRAMapping) -> None:
        """y[:n] += x[:n] @ A[slot].T @ B[slot] for each token's slot (n = mapping.num_lora_tokens).

        x: [T, in], y: [T, out], lora_a: [S, R, in], lora_b: [S, R, out] (scaling folded in).
        """


def add_padded_delta(
    y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, m: LoRAMapping, rows: int
) -> None:
    """The delta on the padded [num_slots, rows] grid (rows = m.pad_len): two bmm calls, padding rows are zeros."""
    n, k, r = m.num_lora_tokens, m.num_slots, m.max_rank
    slots = slice(m.first_slot, m.first_slot + k)
    if m.pad_dest is None:  # the grid is the batch itself: accumulate into y in place (no [n, out] temporary)
        shrunk = torch.bmm(x[:n].view(k, rows, -1), lora_a[slots, :r].transpose(1, 2))  # [k, rows, r]
        y[:n].view(k, rows, -1).baddbmm_(shrunk, lora_b[slots, :r])
        return
    grid = x.new_zeros(k * rows, x.shape[1]).index_copy_(0, m.pad_dest, x[:n]).view(k, rows, -1)
    out = torch.bmm(torch.bmm(grid, lora_a[slots, :r].transpose(1, 2)), lora_b[slots, :r])  # [k, rows, out]
    y[:n] += out.view(k * rows, -1).index_select(0, m.pad_dest)


class GroupedMatmulBackend(LoRABackend):
    """Padded bmm for even groups, else two grouped GEMMs (`grouped_mm`) over the slots in use."""

    name = "grouped"

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  mapping: LoRAMapping) -> None:
        if mapping.pad_len is not None:
            add_padded_delta(y, x, lora_a, lora_b, mapping, mapping.pad_len)
            return
        n, r = mapping.num_lora_tokens, mapping.max_rank
        slots = slice(mapping.first_slot, mapping.first_slot + mapping.num_slots)
        a = lora_a[slots, :r].transpose(1, 2)  # [k, in, r]
        shrunk = F.grouped_mm(x[:n], a, offs=mapping.group_ends)  # [n, r]
        y[:n] += F.grouped_mm(shrunk, lora_b[slots, :r], offs=mapping.group_ends)  # [n, out]


class SegmentBackend(LoRABackend):
    """Padded bmm for even groups, else one matmul pair per slot with tokens (at most max_loras)."""

    name = "segment"

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  mapping: LoRAMapping) -> None:
        if mapping.pad_len is not None:
            add_padded_delta(y, x, lora_a, lora_b, mapping, mapping.pad_len)
            return
        r = mapping.max_rank
        for slot, start, end in mapping.segments:
            y[start:end].addmm_(x[start:end] @ lora_a[slot, :r].T, lora_b[slot, :r])


class TritonLoRABackend(LoRABackend):
    """The Triton kernels: BGMV over every row of x in decode steps, SGMV over the segments otherwise.

    A decode step reads only `mapping.kernel`'s token_slots and slot_ranks and x's shape, so a CUDA graph can
    capture it with static mapping tensors; rows with slot -1 are left unchanged. (The contract's n is then every
    row whose slot is not -1.)
    """

    name = "triton"
    needs_kernel_meta = True

    def __init__(self) -> None:
        from lorax_lite.kernels import lora  # triton is optional: imported only when this backend is chosen

        self.kernels = lora

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  mapping: LoRAMapping) -> None:
        meta = mapping.kernel
        if meta is None:
            raise RuntimeError("TritonLoRABackend needs the kernel metadata: LoRAMapping.build(..., kernel_meta=True)")
        shrunk = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)  # [T, R]
        k = self.kernels
        if mapping.decode:
            k.bgmv_shrink(x, lora_a, meta.token_slots, meta.slot_ranks, shrunk)
            k.bgmv_expand(shrunk, lora_b, meta.token_slots, meta.slot_ranks, y)
            return
        segments = (meta.seg_slots, meta.seg_starts, meta.seg_ends, meta.slot_ranks)
        k.sgmv_shrink(x, lora_a, *segments, shrunk, max_seg_len=meta.max_segment_len)
        k.sgmv_expand(shrunk, lora_b, *segments, y, max_seg_len=meta.max_segment_len)


def select_backend(device: torch.device, dtype: torch.dtype, name: str = "auto") -> LoRABackend:
    """The backend called `name` (one of LORA_BACKENDS), or ValueError saying why it cannot run here.

    "auto": the Triton kernels on CUDA when Triton is usable, else grouped GEMMs when this torch supports them for
    `device` and `dtype`, else segments.
    """
    if name not in LORA_BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {', '.join(LORA_BACKENDS)}")
    if name == "segment":
        return SegmentBackend()
    if name == "triton":
        check_triton(device, "lora_backend triton")
        return TritonLoRABackend()
    if name == "auto" and device.type == "cuda" and triton_unusable_reason(device) is None:
        return TritonLoRABackend()
    reason = _grouped_unusable_reason(device, dtype)
    if reason is None:
        return GroupedMatmulBackend()
    if name == "grouped":
        raise ValueError(f"lora_backend grouped cannot run here: {reason}")
    return SegmentBackend()


def _grouped_unusable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when grouped_mm gives the right delta for `device` and `dtype` (a probe); else why not."""
    if not hasattr(F, "grouped_mm"):
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    probe = LoRAMapping.build([0, 1], [2, 1], [16, 16], device)
    probe.pad_len = probe.pad_dest = None  # probe the grouped path
    x = torch.ones(3, 16, dtype=dtype, device=device)
    a = torch.ones(2, 16, 16, dtype=dtype, device=device)
    try:
        y = torch.zeros(3, 16, dtype=dtype, device=device)
        GroupedMatmulBackend().add_delta(y, x, a, a, probe)
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        return f"grouped_mm fails for {dtype} on {device.type}: {type(exc).__name__}: {exc}"
    if not bool((y == 256).all()):
        return f"grouped_mm gives wrong results for {dtype} on {device.type}"
    return None


_MAPPING: contextvars.ContextVar[LoRAMapping | None] = contextvars.ContextVar("lorax_lora_mapping", default=None)


@contextlib.contextmanager
def lora_context(mapping: LoRAMapping | None) -> Iterator[None]:
    """Publish a step's LoRA mapping to every LoRALinear for the duration of one forward pass."""
    token = _MAPPING.set(mapping)
    try:
        yield
    finally:
        _MAPPING.reset(token)


def current_mapping() -> LoRAMapping | None:
    return _MAPPING.get()

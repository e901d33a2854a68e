"""The batched LoRA delta for a mixed batch: every token gets its own adapter's `x @ A.T @ B`.

The runner orders the flat batch so that tokens with an adapter come first, grouped by slot in
slot order, and tokens for the base model come last. It describes that order once per step in a
`LoRAMapping`; every `LoRALinear` then adds the delta for the whole batch with a backend:

- `GroupedMatmulBackend`: two grouped GEMMs (`torch.nn.functional.grouped_mm`, an SGMV-style
  segmented matmul) over all slots at once: no gather of weights, no Python loop over requests
  or adapters. Used wherever torch supports it for the device and dtype.
- `SegmentBackend`: one pair of matmuls per adapter present in the step (at most `max_loras`),
  for torch builds or devices without grouped_mm.

A CUDA kernel (SGMV/BGMV, Punica-style) is one more `LoRABackend`.
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LoRAMapping:
    """Where each slot's tokens are in a step's flat batch; built once per step by the runner."""

    num_lora_tokens: int  # tokens [0, n) have an adapter; the rest are base-model tokens
    group_ends: torch.Tensor  # [max_loras] int32, end (exclusive) of each slot's tokens; on the model's device
    segments: list[tuple[int, int, int]]  # (slot, start, end) of every slot with tokens this step
    max_rank: int  # the largest rank among the step's slots: buffers are sliced to it

    @classmethod
    def build(cls, seq_slots: list[int | None], seq_tokens: list[int], slot_ranks: list[int], device: torch.device) -> "LoRAMapping":
        """From each sequence's slot (None: base model) and token count, in flat-batch order.

        The sequences must already be ordered as described above (adapter ones by slot, then None).
        """
        counts = [0] * len(slot_ranks)
        ordered = [s for s in seq_slots if s is not None]
        if ordered != sorted(ordered) or seq_slots[: len(ordered)] != ordered:
            raise ValueError("sequences with an adapter must come first, in slot order, then base-model ones")
        for slot, n in zip(ordered, seq_tokens):
            counts[slot] += n
        ends, segments, start = [], [], 0
        for slot, n in enumerate(counts):
            if n:
                segments.append((slot, start, start + n))
            start += n
            ends.append(start)
        max_rank = max((slot_ranks[s] for s, _, _ in segments), default=0)
        return cls(start, torch.tensor(ends, dtype=torch.int32, device=device), segments, max_rank)


class LoRABackend(ABC):
    """Adds each token's LoRA delta to a linear layer's output."""

    @abstractmethod
    def add_delta(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mapping: LoRAMapping) -> None:
        """y[:n] += x[:n] @ A[slot].T @ B[slot] for each token's slot (n = mapping.num_lora_tokens).

        x: [T, in], y: [T, out], lora_a: [S, R, in], lora_b: [S, R, out] (scaling folded in).
        """


class GroupedMatmulBackend(LoRABackend):
    def add_delta(self, y, x, lora_a, lora_b, mapping):
        n, r = mapping.num_lora_tokens, mapping.max_rank
        a = lora_a[:, :r].transpose(1, 2)  # [S, in, r]
        shrunk = F.grouped_mm(x[:n], a, offs=mapping.group_ends)  # [n, r]
        y[:n] += F.grouped_mm(shrunk, lora_b[:, :r], offs=mapping.group_ends)  # [n, out]


class SegmentBackend(LoRABackend):
    def add_delta(self, y, x, lora_a, lora_b, mapping):
        r = mapping.max_rank
        for slot, start, end in mapping.segments:
            y[start:end] += (x[start:end] @ lora_a[slot, :r].T) @ lora_b[slot, :r]


def select_backend(device: torch.device, dtype: torch.dtype) -> LoRABackend:
    """The grouped-GEMM backend when this torch supports it for `device` and `dtype`, else segments."""
    if not hasattr(F, "grouped_mm"):
        return SegmentBackend()
    probe = LoRAMapping.build([0, 1], [2, 1], [16, 16], device)
    x = torch.ones(3, 16, dtype=dtype, device=device)
    a = torch.ones(2, 16, 16, dtype=dtype, device=device)
    try:
        y = torch.zeros(3, 16, dtype=dtype, device=device)
        GroupedMatmulBackend().add_delta(y, x, a, a, probe)
    except (RuntimeError, NotImplementedError, TypeError):
        return SegmentBackend()
    return GroupedMatmulBackend() if bool((y == 256).all()) else SegmentBackend()


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

"""Paged attention for a flattened batch, registered with transformers' AttentionInterface, behind one small
backend interface chosen at start-up.

The runner describes each step once (`StepLayout`: which tokens are new for which sequence, each sequence's
block table). The engine's `AttentionBackend` turns that into the metadata its layers need, in two phases so that
every host tensor of a step crosses to the device in one copy (`host_tensors`, then `metadata` over the uploaded
tensors; see engine/staging.py). During the forward pass every attention layer of the HF model calls
`paged_attention_forward`, which (1) writes the K/V of the scheduled tokens into their KV rows and (2) attends each
sequence's queries to that sequence's cached keys, through the backend.

Backends:
- `SdpaBackend` (the reference, and the CPU default): sequences are grouped once per step (decodes, prefill chunks)
  into padded batches whose KV blocks are gathered into one copy, then torch's scaled_dot_product_attention; a
  layer runs at most two SDPA calls whatever the number of requests: no per-request Python inside the model.
- `TritonBackend` (engine/attention_triton.py; the CUDA default when triton is installed): a decode kernel and a
  prefill kernel that read the paged cache in place (lorax_lite/kernels/paged_attention.py). Its decode metadata
  depends on tensor values only, so decode steps can be captured in CUDA graphs (engine/cuda_graphs.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lorax_lite.engine.kv_cache import KVCache
from lorax_lite.kernels import check_triton, triton_unusable_reason

ATTN_IMPLEMENTATION = "lorax_paged"
HostTensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepLayout:
    """Where a step's tokens are, on the host: S sequences, T new tokens in all, flattened in sequence order."""

    context_lens: torch.Tensor  # [S] int64, tokens of each sequence already in the KV cache
    num_new: torch.Tensor  # [S] int64, tokens of each sequence computed this step (>= 1)
    starts: torch.Tensor  # [S] int64, index in T of each sequence's first new token
    block_tables: torch.Tensor  # [S, NB] int64, each sequence's blocks (padded with its own first block)
    kv_rows: torch.Tensor  # [T] int64, the KV-cache row of each new token
    block_size: int

    @property
    def is_decode(self) -> bool:
        """Every sequence computes exactly one token (no prefill in the step)."""
        return bool((self.num_new == 1).all())


class AttentionBackend(ABC):
    """How a step's attention is computed. One instance per engine, chosen at start-up by `select_attention_backend`."""

    name: ClassVar[str]
    graph_capturable: ClassVar[bool] = False  # decode metadata is tensor values only (CUDA graphs may replay it)

    @abstractmethod
    def host_tensors(self, layout: StepLayout) -> HostTensors:
        """The step's metadata as host tensors (int64), to be uploaded together with the step's other inputs."""

    @abstractmethod
    def metadata(self, layout: StepLayout, tensors: HostTensors) -> Any:
        """The metadata the layers read, from `host_tensors`' tensors now on the model's device."""

    @abstractmethod
    def forward(
        self,
        meta: Any,
        q: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Store `key`/`value` ([T, Hkv, D]) in their rows of the caches, then attend: q [T, Hq, D] -> [T, Hq, D]."""


@dataclass
class AttentionMetadata:
    """What every attention layer needs for one step; built once by the runner."""

    kv_cache: KVCache
    backend: AttentionBackend
    data: Any  # the backend's own metadata


_CONTEXT: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar("lorax_attention", default=None)


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    """Publish the step's metadata to the attention layers for the duration of one forward."""
    token = _CONTEXT.set(metadata)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """HF attention signature. query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] -> [1, T, Hq, D]."""
    meta = _CONTEXT.get()
    if meta is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention called outside the engine's forward_context")
    layer = cast(int, module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = meta.backend.forward(
        meta.data,
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        meta.kv_cache.key[layer],
        meta.kv_cache.value[layer],
        scale,
        sliding_window,
    )
    return out.unsqueeze(0), None


# ---- the reference backend: gather + SDPA ---------------------------------------------------------------------


@dataclass
class AttentionGroup:
    """Sequences padded into one attention batch of B sequences, Q queries and L keys each."""

    q_index: torch.Tensor | None  # [B, Q] index of each query in the flat batch (padding: 0); None = all, in order
    block_tables: torch.Tensor  # [B, NB] cache blocks of each sequence (padded with its own first block, masked out)
    q_pos: torch.Tensor  # [B, Q] position of each query in its sequence
    valid: torch.Tensor | None  # [n_valid] index in the padded [B * Q] queries of each real one; None = all
    dest: torch.Tensor | None  # [n_valid] index in the flat batch of each real query; None = all, in order
    block_size: int
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, Q, L] bool, True where a query may attend a key (causal, optionally windowed)."""
        if sliding_window not in self._masks:
            k_pos = torch.arange(self.block_tables.shape[1] * self.block_size, device=self.q_pos.device)
            dist = self.q_pos[:, :, None] - k_pos[None, None, :]  # [B, Q, L]
            allowed = dist >= 0
            if sliding_window is not None:
                allowed &= dist < sliding_window
            self._masks[sliding_window] = allowed[:, None]
        return self._masks[sliding_window]


@dataclass
class SdpaMetadata:
    kv_rows: torch.Tensor  # [T]
    groups: list[AttentionGroup]


class SdpaBackend(AttentionBackend):
    """Gathers each group's KV blocks into a padded copy, then one SDPA call per group (at most two per layer)."""

    name = "sdpa"

    def host_tensors(self, layout: StepLayout) -> HostTensors:
        tensors = {"kv_rows": layout.kv_rows}
        for g, idx in enumerate(self._groups(layout)):
            tensors |= {f"{g}.{name}": t for name, t in self._group_tensors(layout, idx).items()}
        return tensors

    def metadata(self, layout: StepLayout, tensors: HostTensors) -> SdpaMetadata:
        groups = [
            AttentionGroup(
                q_index=tensors.get(f"{g}.q_index"),
                block_tables=tensors[f"{g}.block_tables"],
                q_pos=tensors[f"{g}.q_pos"],
                valid=tensors.get(f"{g}.valid"),
                dest=tensors.get(f"{g}.dest"),
                block_size=layout.block_size,
            )
            for g in itertools.takewhile(lambda g: f"{g}.block_tables" in tensors, itertools.count())
        ]
        return SdpaMetadata(tensors["kv_rows"], groups)

    @staticmethod
    def _groups(layout: StepLayout) -> list[torch.Tensor]:
        """Indices of the decode sequences, then of the prefill ones; empty groups left out."""
        n = layout.num_new
        return [idx for idx in (torch.nonzero(n == 1).flatten(), torch.nonzero(n > 1).flatten()) if len(idx)]

    @staticmethod
    def _group_tensors(layout: StepLayout, idx: torch.Tensor) -> HostTensors:
        """Pad the sequences `idx` into one attention batch [B, Q queries, L keys]."""
        n, ctx = layout.num_new[idx], layout.context_lens[idx]
        q_len, kv_len = int(n.max()), int((ctx + n).max())
        j = torch.arange(q_len)
        valid = j[None, :] < n[:, None]  # [B, Q]
        tensors = {
            "block_tables": layout.block_tables[idx][:, : -(-kv_len // layout.block_size)],  # [B, NB]
            "q_pos": ctx[:, None] + j[None, :],
        }
        if len(idx) == len(layout.starts) and bool(valid.all()) and q_len == 1:  # decodes only: queries in order
            return tensors
        q_index = torch.where(valid, layout.starts[idx][:, None] + j[None, :], 0)
        return tensors | {
            "q_index": q_index,
            "valid": valid.flatten().nonzero().flatten(),  # [n_valid] rows of the padded queries that are real
            "dest": q_index[valid],
        }

    def forward(
        self,
        meta: SdpaMetadata,
        q: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        k_cache.index_copy_(0, meta.kv_rows, key)
        v_cache.index_copy_(0, meta.kv_rows, value)
        if len(meta.groups) == 1 and meta.groups[0].dest is None:  # e.g. all decodes: no scatter needed
            return _attend_group(q, k_cache, v_cache, meta.groups[0], scaling, sliding_window)
        out = torch.empty_like(q)
        for group in meta.groups:
            attended = _attend_group(q, k_cache, v_cache, group, scaling, sliding_window)
            if group.dest is None:  # the group holds every query, in order
                out.copy_(attended)
            else:
                out.index_copy_(0, group.dest, attended)
        return out


def _attend_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    group: AttentionGroup,
    scaling: float,
    sliding_window: int | None,
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs, num_kv_heads = group.block_tables.shape[0], k_cache.shape[1]
    if group.q_index is None:
        qb = q.unsqueeze(1).transpose(1, 2)  # [B, Hq, 1, D]
    else:  # index_select: whole rows, far cheaper on CPU than advanced indexing
        qb = q.index_select(0, group.q_index.reshape(-1)).view(*group.q_index.shape, num_heads, head_dim)
        qb = qb.transpose(1, 2)
    # k_cache: [num_blocks * bs, Hkv, D] viewed as rows of whole blocks, gathered a block at a time -> [B, Hkv, L, D]
    # (index_select copies whole rows: ~5x faster on CPU than advanced indexing with the 2-D table)
    kb = _gather_blocks(k_cache, group).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    vb = _gather_blocks(v_cache, group).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    ob = F.scaled_dot_product_attention(
        qb, kb, vb, attn_mask=group.mask(sliding_window), scale=scaling, enable_gqa=num_kv_heads != num_heads
    )
    ob = ob.transpose(1, 2).reshape(-1, num_heads, head_dim)  # [B * Q, Hq, D]
    return ob.index_select(0, group.valid) if group.valid is not None else ob


def _gather_blocks(cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """The cache blocks of `group`'s block tables, in order: [B * NB, block_size * Hkv * D]."""
    rows = cache.view(-1, group.block_size * cache.shape[1] * cache.shape[2])
    return rows.index_select(0, group.block_tables.reshape(-1))


# ---- choosing and registering ----------------------------------------------------------------------------------


def select_attention_backend(name: str, device: torch.device, block_size: int = 16) -> AttentionBackend:
    """`name` (config.ATTENTION_BACKENDS) for `device`: auto = triton on CUDA when Triton is usable (and the block
    size a power of two, as its kernels need), else sdpa. Raises ValueError when triton is asked for and cannot run
    (see lorax_lite.kernels)."""
    power_of_two = block_size > 0 and block_size & (block_size - 1) == 0
    if name == "auto":
        usable = device.type == "cuda" and triton_unusable_reason(device) is None and power_of_two
        name = "triton" if usable else "sdpa"
    if name == "sdpa":
        return SdpaBackend()
    if name == "triton":
        check_triton(device, "attention_backend triton")
        if not power_of_two:
            raise ValueError(f"attention_backend triton needs a block_size that is a power of two, got {block_size}")
        from lorax_lite.engine.attention_triton import TritonBackend  # imports triton: only when chosen

        return TritonBackend()
    raise ValueError(f"attention_backend must be one of auto, sdpa, triton, got {name!r}")


def _no_mask(*args: object, **kwargs: object) -> None:
    """Our attention masks each sequence itself from the step's metadata; HF builds no mask."""
    return None


def register_attention() -> str:
    """Register the paged attention (and its mask entry) with transformers; returns its name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION

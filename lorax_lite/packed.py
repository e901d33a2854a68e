"""Full-precision linear layers with their weights prepacked for the CPU's matrix units (oneDNN, through torch).

`F.linear` on CPU calls MKL's sgemm on the weight as stored ([out, in], row-major) every time, re-blocking it on
each call; at decode-sized batches that is most of a step. oneDNN can reorder a weight once into the blocked
layout its AVX-512/AVX2 kernels read (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's freezing
uses for fp32 linears), after which `_linear_pointwise` multiplies without re-packing. Measured on this project's
2-core AVX-512 machine for SmolLM2-135M's projections: 1.6x MKL at 32 rows, 1.3x at 256 (docs/benchmarks.md).
vLLM's CPU backend prepacks its linears with oneDNN the same way.

The packed copy replaces the original weight (no extra memory); the LM head, tied to the input embeddings, gets a
packed copy of its own. Results equal `F.linear`'s up to fp32 rounding (a different summation order), and, unlike
MKL's, a row's result does not depend on the other rows of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from lorax_lite.config import LINEAR_BACKENDS
from lorax_lite.lora.layers import find_decoder_layers
from lorax_lite.quantize import own_remaining_weights

PACK_ROWS_HINT = 64  # the batch size oneDNN tunes the packed layout for (any row count works)


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W held in oneDNN's blocked layout (CPU, fp32)."""

    kind = "onednn prepacked"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # an opaque MKLDNN tensor: an attribute, not a buffer (state_dict and .to() do not handle that layout)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), PACK_ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        padded = padded_rows(rows)
        if padded != rows:
            flat = F.pad(flat, (0, 0, 0, padded - rows))
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y[:rows].view(*x.shape[:-1], self.out_features)

    @property
    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * 4 + (0 if self.bias is None else self.bias.numel() * 4)


def padded_rows(rows: int) -> int:
    """The row count a multiplication runs with. oneDNN caches one compiled kernel (~0.7 MB) per input shape and
    weight shape: fed every row count a step can have (1 to max_num_batched_tokens), its cache grew a server by
    300 MB. Rounding up to a few buckets bounds it (~20 shapes per weight shape) for a little padding: exact up to
    8 rows (decode at small batches), then multiples of 16 up to 64, of 64 up to 512, of 256 beyond."""
    for limit, step in ((8, 1), (64, 16), (512, 64)):
        if rows <= limit:
            return -(-rows // step) * step
    return -(-rows // 256) * 256

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def resolve_linear_backend(backend: str, device: torch.device, dtype: torch.dtype, quantize: str) -> str:
    """"torch" or "onednn". "auto" picks oneDNN for fp32 on a CPU whose torch has it, unless quantized; asking for
    "onednn" where it cannot run is a ValueError."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {backend!r}")
    usable = device.type == "cpu" and dtype == torch.float32 and quantize == "none" and onednn_available()
    if backend == "onednn" and not usable:
        raise ValueError("linear_backend onednn needs a CPU, dtype float32, quantize none and a torch built with "
                         "oneDNN (mkldnn); use linear_backend torch")
    return "onednn" if backend == "onednn" or (backend == "auto" and usable) else "torch"


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linears(model: PreTrainedModel, head: bool = True) -> int:
    """Replace every nn.Linear inside the decoder layers (a LoRALinear's base layer included) and, unless `head` is
    False, the LM head by a PackedLinear, in place; returns the number of layers packed."""
    decoder = find_decoder_layers(model)
    targets = [(name, module) for name, module in decoder.named_modules() if type(module) is nn.Linear]
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(decoder.get_submodule(parent_name) if parent_name else decoder, leaf, PackedLinear(linear))
    output = model.get_output_embeddings()
    if head and type(output) is nn.Linear:
        model.set_output_embeddings(PackedLinear(output))
    own_remaining_weights(model)
    return len(targets) + int(head and type(output) is nn.Linear)


__all__ = ["LINEAR_BACKENDS", "PackedLinear", "onednn_available", "pack_linears", "resolve_linear_backend"]

"""A quantized base model: the decoder's linear layers hold 8-bit weights, the adapters stay in full precision.

`quantize_decoder(model, mode)` replaces every `nn.Linear` inside the decoder layers (the q/k/v/o and
gate/up/down projections; inside a LoRALinear it replaces the wrapped base layer) with a module that holds
its weight in 8 bits with one scale per output channel (symmetric), computed by PyTorch's own kernels:

- `int8` on CPU: `Int8DynamicLinear`, dynamic activation int8 × int8 weight: each call quantizes the
  activations per token, multiplies in int8 with exact int32 accumulation through `aten::_int_mm` (oneDNN) and
  rescales to fp32 (torchao's int8 dynamic recipe, on PyTorch's own op; `quantized::linear_dynamic` of
  `torch.ao`'s dynamic quantization is a little faster but scales activations per tensor, so one request's large
  activations would coarsen the quantization of every other request in the step).
- `int8` on CUDA: `Int8WeightOnlyLinear`, int8 weights dequantized inside the matmul (`aten::_weight_int8pack_mm`)
  with bf16/fp16 activations.
- `fp8` (CUDA, compute capability 8.9+): `Fp8Linear`, e4m3 weights and activations with row-wise scales
  through `aten::_scaled_mm`.

The LM head is quantized the same way (a quarter of an int8 decode step's time otherwise; measured: perplexity
+0.15%, docs/quantization.md); when it is tied to the input embeddings it gets an 8-bit copy of its own, and the
embeddings (a lookup, no matmul) stay in the model's dtype, as do the norms. A LoRALinear computes its delta from
the layer's input activations, which are never quantized, and adds it to the quantized base output, so an
adapter trained on the full-precision base works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from lorax_lite.config import QUANTIZE_MODES
from lorax_lite.lora.layers import find_decoder_layers

INT8_MAX = 127.0
FP8_MAX = 448.0  # float8_e4m3fn


class QuantizedLinear(nn.Module):
    """A linear layer with a quantized weight [out, in] and one fp32 scale per output channel."""

    kind = "quantized"

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the quantized weight, its scales and the bias."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def _per_channel_scales(weight: torch.Tensor, max_value: float) -> torch.Tensor:
    """One symmetric scale per output channel (row), in fp32; an all-zero row gets a tiny scale, not a zero."""
    return (weight.detach().float().abs().amax(dim=1) / max_value).clamp(min=1e-12)


def _int8_weight(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [out, in], fp32 scale per output channel) of a linear layer, symmetric."""
    scales = _per_channel_scales(linear.weight, INT8_MAX)
    weight = torch.round(linear.weight.detach().float() / scales[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return weight.to(torch.int8), scales


def _bias_bytes(bias: torch.Tensor | None) -> int:
    return 0 if bias is None else bias.numel() * bias.element_size()


def _linear_bytes(linear: nn.Linear) -> int:
    """Bytes of an unquantized linear layer's weight and bias."""
    return linear.weight.numel() * linear.weight.element_size() + _bias_bytes(linear.bias)


class Int8DynamicLinear(QuantizedLinear):
    """CPU: int8 weights (per output channel) times int8 activations quantized per token on each call, multiplied
    in int8 with exact int32 accumulation (`aten::_int_mm`, oneDNN on x86) and rescaled to fp32.

    Per-token (not per-tensor) activation scales keep a token's quantization independent of the other tokens in
    the step: with one scale per step, a batch-mate with large activations would coarsen every request's. Layers
    reading the same input (q, k and v; gate and up) quantize it once (`InputQuantizer`)."""

    kind = "int8 dynamic (per-token int8 activations x per-channel int8 weights)"
    qweight_t: torch.Tensor  # [in, out] int8: the weight transposed, as _int_mm reads it
    scales: torch.Tensor  # [out] fp32

    def __init__(self, linear: nn.Linear, inputs: InputQuantizer | None = None) -> None:
        super().__init__(linear)
        weight, scales = _int8_weight(linear)
        self.register_buffer("qweight_t", weight.t().contiguous())
        self.register_buffer("scales", scales)
        self.inputs = inputs or InputQuantizer()

    @property
    def weight_bytes(self) -> int:
        return self.qweight_t.numel() + self.scales.numel() * 4 + _bias_bytes(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scales = self.inputs.quantize(x)
        y = torch._int_mm(xq, self.qweight_t).float().mul_(x_scales).mul_(self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y.add_(self.bias)


class InputQuantizer:
    """Quantizes activations per token (symmetric int8, one fp32 scale per row), remembering the last input:
    the q/k/v (and gate/up) projections of a layer are called one after another on the same tensor, which is
    then quantized once. Shared by the layers of one model; the engine runs one forward pass at a time."""

    def __init__(self) -> None:
        self._last: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last, version = self._last, _version(x)
        if last is not None and last[0] is x and last[1] == version:  # the same tensor, not changed in place
            return last[2], last[3]
        rows = x.reshape(-1, x.shape[-1])
        scales = rows.abs().amax(dim=1, keepdim=True).div_(INT8_MAX).clamp_(min=1e-12)
        xq = torch.round(rows / scales).to(torch.int8)
        self._last = (x, version, xq, scales)
        return xq, scales

    def clear(self) -> None:
        self._last = None


def _version(x: torch.Tensor) -> int:
    """The tensor's in-place version counter; -1 for an inference tensor (none is kept: the engine's forward passes
    create new tensors and change none of a layer's inputs in place)."""
    return -1 if x.is_inference() else x._version


class Int8WeightOnlyLinear(QuantizedLinear):
    """int8 weights, dequantized inside the matmul; activations stay in the compute dtype (CUDA's int8 mode)."""

    kind = "int8 weight-only"
    qweight: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out], the compute dtype

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        weight, scales = _int8_weight(linear)
        self.register_buffer("qweight", weight)
        self.register_buffer("scales", scales.to(self.compute_dtype))

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size() + _bias_bytes(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.qweight, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Fp8Linear(QuantizedLinear):
    """e4m3 weights with a scale per output channel; activations scaled per row to e4m3 on each call."""

    kind = "fp8 (e4m3 activations x e4m3 weights)"
    qweight: torch.Tensor  # [out, in] float8_e4m3fn
    scales: torch.Tensor  # [1, out] fp32

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        scales = _per_channel_scales(linear.weight, FP8_MAX)
        weight = (linear.weight.detach().float() / scales[:, None]).clamp(-FP8_MAX, FP8_MAX)
        self.register_buffer("qweight", weight.to(torch.float8_e4m3fn))
        self.register_buffer("scales", scales[None, :].contiguous())  # [1, out] fp32, as _scaled_mm takes it

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 4 + _bias_bytes(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_scales = (rows.detach().float().abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        x8 = (rows.float() / x_scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.qweight.t(), scale_a=x_scales, scale_b=self.scales, out_dtype=self.compute_dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_decoder` did: the mode, the kernel, how many layers, and their weight bytes before/after."""

    mode: str
    kind: str
    num_layers: int
    bytes_before: int  # of the decoder's linear layers
    bytes_after: int
    head_quantized: bool = False  # the LM head too (an 8-bit copy when tied to the embeddings)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def to_dict(self) -> dict:
        return {"mode": self.mode, "kind": self.kind, "num_layers": self.num_layers,
                "linear_weight_bytes": self.bytes_after, "linear_weight_bytes_unquantized": self.bytes_before,
                "lm_head": self.mode if self.head_quantized else "unquantized"}


def check_supported(mode: str, device: torch.device, dtype: torch.dtype) -> type[QuantizedLinear] | None:
    """The layer class for `mode` on `device` with activations in `dtype` (None for "none"); ValueError naming
    what to change for a combination this torch build or device cannot run."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    if mode == "none":
        return None
    if mode == "fp8":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("quantize=fp8 needs a CUDA GPU with compute capability 8.9 or newer (Ada, Hopper); "
                             "use quantize=int8")
        return Fp8Linear
    if device.type == "cuda":
        return Int8WeightOnlyLinear
    if device.type != "cpu":
        raise ValueError(f"quantize=int8 runs on CPU or CUDA, not {device.type}")
    if dtype != torch.float32:
        raise ValueError(f"quantize=int8 on CPU computes in float32 (int8 x int8 with fp32 activations); got dtype "
                         f"{str(dtype).removeprefix('torch.')}: use dtype float32 (or auto)")
    if not _has_cpu_int_mm():
        raise ValueError("quantize=int8 needs PyTorch's int8 CPU matmul (aten::_int_mm), which this torch build "
                         "lacks; use quantize=none")
    return Int8DynamicLinear


def _has_cpu_int_mm() -> bool:
    try:
        torch._int_mm(torch.ones(2, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def quantize_decoder(model: PreTrainedModel, mode: str, head: bool = True) -> QuantizationReport | None:
    """Replace every nn.Linear inside the decoder layers (a LoRALinear's base layer included), and the LM head
    unless `head` is False, by its quantized version, in place; None for mode "none". The fp32 weights are freed
    (a head tied to the input embeddings gets an 8-bit copy of its own; the embeddings stay as they are)."""
    param = next(model.parameters())
    layer_class = check_supported(mode, param.device, param.dtype)
    if layer_class is None:
        return None
    decoder = find_decoder_layers(model)
    targets = [(name, module) for name, module in decoder.named_modules() if type(module) is nn.Linear]
    if not targets:
        raise ValueError(f"{type(model).__name__}: no linear layers in its decoder layers to quantize")
    inputs = InputQuantizer()  # one per model: the layers share the quantized input of q/k/v and gate/up

    def quantized(linear: nn.Linear) -> QuantizedLinear:
        return Int8DynamicLinear(linear, inputs) if layer_class is Int8DynamicLinear else layer_class(linear)

    before = after = 0
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        layer = quantized(linear)
        before += _linear_bytes(linear)
        after += layer.weight_bytes
        setattr(decoder.get_submodule(parent_name) if parent_name else decoder, leaf, layer)
    output = model.get_output_embeddings()
    head_quantized = head and type(output) is nn.Linear
    if head_quantized:
        model.set_output_embeddings(quantized(output))
    own_remaining_weights(model)
    return QuantizationReport(mode, layer_class.kind, len(targets), before, after, head_quantized)


def own_remaining_weights(model: nn.Module) -> None:
    """Copy the parameters left in full precision (embeddings, norms) out of the checkpoint's memory map:
    transformers maps the safetensors file, and while any tensor still points into it the whole mapping, fp32
    decoder weights included, stays resident beside their int8 copies (measured: 1307 MiB resident instead of
    1006 on the default model)."""
    for param in model.parameters():
        param.data = param.data.clone()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights (and biases) of the decoder's linear layers, quantized or not."""
    total = 0
    for module in find_decoder_layers(model).modules():  # type: ignore[arg-type]
        size = getattr(module, "weight_bytes", None)  # QuantizedLinear, packed.PackedLinear
        if isinstance(size, int):
            total += size
        elif type(module) is nn.Linear:
            total += _linear_bytes(module)
    return total


__all__ = ["Fp8Linear", "Int8DynamicLinear", "Int8WeightOnlyLinear", "QuantizationReport", "QuantizedLinear",
           "check_supported", "linear_weight_bytes", "own_remaining_weights", "quantize_decoder"]

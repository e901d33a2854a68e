"""LoRALinear: a base linear layer plus pre-allocated per-slot LoRA buffers; LoRALayers: all of them in one model.

`LoRALayers.inject(model, ...)` wraps, once at start-up, every `nn.Linear` inside the decoder
layers (for Llama-family models: q/k/v/o and gate/up/down projections). Which modules those are
comes from the model itself, not a per-architecture list. After that the module tree never
changes: putting an adapter into a slot is a tensor copy into the buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from lorax_lite.lora.ops import LoRABackend, current_mapping, select_backend
from lorax_lite.lora.weights import LoRAWeights


class LoRALinear(nn.Module):
    """`base(x)` plus, for each token with an adapter, `x @ A[slot].T @ B[slot]`."""

    lora_a: torch.Tensor  # [max_loras, max_lora_rank, in]
    lora_b: torch.Tensor  # [max_loras, max_lora_rank, out]: B transposed

    def __init__(self, base_layer: nn.Linear, max_loras: int, max_lora_rank: int, backend: LoRABackend) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.backend = backend
        w = base_layer.weight
        # Buffers, not parameters: they are never trained and must not appear in the model's state dict keys
        # of the base layer. lora_b is stored as [S, R, out] (B transposed) so the expand GEMM reads it as is.
        self.register_buffer(
            "lora_a", torch.zeros(max_loras, max_lora_rank, self.in_features, dtype=w.dtype, device=w.device),
            persistent=False,
        )
        self.register_buffer(
            "lora_b", torch.zeros(max_loras, max_lora_rank, self.out_features, dtype=w.dtype, device=w.device),
            persistent=False,
        )

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads the wrapped layer's weight (dtype, device)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # F.linear, not base(x), for a plain layer: this runs for every linear of every step. A quantized base
        # (lorax_lite/quantize.py) computes its own output; the delta below always uses the unquantized x.
        y = F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x)
        mapping = current_mapping()
        if mapping is None:
            return y
        # x: [..., T, in] flattened by the runner to one sequence: [1, T, in]
        self.backend.add_delta(
            y.view(-1, self.out_features), x.reshape(-1, self.in_features), self.lora_a, self.lora_b, mapping
        )
        return y

    def set_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Copy (lora_a [r, in], lora_b [out, r]) into `slot`, zero-padding the rank; None clears the slot."""
        if weights is None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            return
        a, b = weights
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        self.lora_b[slot, :r].copy_(b.T, non_blocking=True)
        if r < self.lora_a.shape[1]:
            self.lora_a[slot, r:].zero_()
            self.lora_b[slot, r:].zero_()


def find_decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList with one entry per hidden layer."""
    num_layers = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"{type(model).__name__}: no list of {num_layers} decoder layers found; LoRA cannot be served")


def decoder_linears(model: PreTrainedModel) -> list[tuple[str, nn.Linear]]:
    """(full module name, layer) of every nn.Linear inside the decoder layers: what adapters may target."""
    decoder = find_decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    linears = [(f"{prefix}.{name}", m) for name, m in decoder.named_modules() if type(m) is nn.Linear]
    if not linears:
        raise ValueError(f"{type(model).__name__}: no linear layers in its decoder layers; LoRA cannot be served")
    return linears


def lora_targets(model_dir: str) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) that adapters for the model at `model_dir` may target.

    Built from the model's config on the meta device: no weights are read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in decoder_linears(model)}


class LoRALayers:
    """Every LoRALinear of one model, addressed by base-module name; copies an adapter into (or clears) one
    slot across all of them, and knows each slot's rank."""

    def __init__(self, layers: dict[str, LoRALinear], max_loras: int, max_lora_rank: int) -> None:
        self.layers = layers
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.slot_ranks = [0] * max_loras
        self._filled: list[set[str]] = [set() for _ in range(max_loras)]  # modules with non-zero weights per slot

    @classmethod
    def inject(cls, model: PreTrainedModel, max_loras: int, max_lora_rank: int, backend: str = "auto") -> LoRALayers:
        """Wrap every nn.Linear inside the decoder layers in a LoRALinear (once, at start-up).

        `backend`: one of lorax_lite.lora.ops.LORA_BACKENDS (ValueError when it cannot run on the model's device).
        """
        param = next(model.parameters())
        lora_backend = select_backend(param.device, param.dtype, backend)
        layers: dict[str, LoRALinear] = {}
        for name, module in decoder_linears(model):
            parent_name, _, leaf = name.rpartition(".")
            wrapped = LoRALinear(module, max_loras, max_lora_rank, lora_backend)
            setattr(model.get_submodule(parent_name), leaf, wrapped)
            layers[name] = wrapped
        return cls(layers, max_loras, max_lora_rank)

    @property
    def targets(self) -> dict[str, tuple[int, int]]:
        """Base-module name -> (in_features, out_features) of every module an adapter may target."""
        return {name: (layer.in_features, layer.out_features) for name, layer in self.layers.items()}

    @property
    def supported_modules(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.layers})

    @property
    def backend(self) -> LoRABackend:
        return next(iter(self.layers.values())).backend

    def load(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into `slot` (modules it does not target are zeroed if the slot held any)."""
        for name in self._filled[slot] - weights.modules.keys():
            self.layers[name].set_slot(slot, None)
        for name, pair in weights.modules.items():
            self.layers[name].set_slot(slot, pair)
        self._filled[slot] = set(weights.modules)
        self.slot_ranks[slot] = weights.rank

    def clear(self, slot: int) -> None:
        for name in self._filled[slot]:
            self.layers[name].set_slot(slot, None)
        self._filled[slot] = set()
        self.slot_ranks[slot] = 0

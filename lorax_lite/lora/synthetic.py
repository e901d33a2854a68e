"""Random PEFT LoRA adapters for tests and benchmarks, written by PEFT itself (`save_pretrained`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_random_adapter(
    model: PreTrainedModel,
    out: str | os.PathLike,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = LLAMA_PROJECTIONS,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.5,
    **lora_config: object,
) -> Path:
    """Save a PEFT adapter for `model` whose A and B are seeded random (PEFT initialises B to zero).

    Each factor is drawn from N(0, std^2 / fan_in), so the adapter clearly changes greedy outputs
    without overflowing. `model` is left as it was (PEFT's layers are unloaded). Extra keyword
    arguments go to `peft.LoraConfig`.
    """
    from peft import LoraConfig, get_peft_model  # only tests, benchmarks and training need PEFT

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        **{"bias": "none", **lora_config},
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std / param.shape[1] ** 0.5)
    peft_model.save_pretrained(out)
    peft_model.unload()
    return Path(out)

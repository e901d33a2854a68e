"""Random PEFT LoRA adapters for tests and benchmarks, written by PEFT itself (`save_pretrained`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    return make_random_adapters(model, [out], [seed], rank, alpha, target_modules, use_rslora, std, **lora_config)[0]


def make_random_adapters(
    model: PreTrainedModel,
    outs: Sequence[str | os.PathLike],
    seeds: Sequence[int],
    rank: int = 8,
    alpha: float = 16,
    target_modules: Sequence[str] = LLAMA_PROJECTIONS,
    use_rslora: bool = False,
    std: float = 0.5,
    **lora_config: object,
) -> list[Path]:
    """`make_random_adapter` for many seeds, wrapping `model` with PEFT once (benchmarks make hundreds).

    outs[i] gets the adapter of seeds[i], identical to `make_random_adapter(..., seed=seeds[i])`.
    """
    from peft import LoraConfig, get_peft_model  # only tests, benchmarks and training need PEFT

    if len(outs) != len(seeds):
        raise ValueError(f"{len(outs)} output directories for {len(seeds)} seeds")
    options: dict[str, Any] = {"bias": "none", **lora_config}
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float alpha is honoured
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        **options,
    )
    peft_model = get_peft_model(model, config)
    factors = [
        p for name, p in peft_model.named_parameters() if ("lora_A" in name or "lora_B" in name) and p.dim() == 2
    ]
    try:
        for out, seed in zip(outs, seeds, strict=True):
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for param in factors:
                    param.copy_(torch.randn(param.shape, generator=gen) * std / param.shape[1] ** 0.5)
            peft_model.save_pretrained(os.fspath(out))
    finally:
        peft_model.unload()
    return [Path(out) for out in outs]

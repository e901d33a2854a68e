"""Build real PEFT LoRA adapter directories (PEFT's own `save_pretrained`) with seeded random weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from lorax_lite.lora.synthetic import LLAMA_PROJECTIONS, make_random_adapter

ALL_PROJECTIONS = LLAMA_PROJECTIONS


@dataclass
class AdapterSpec:
    """How to build one random adapter; `extra` goes into LoraConfig as is."""

    rank: int = 8
    alpha: float = 16
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    use_rslora: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)


def make_peft_adapter(model: PreTrainedModel, out: Path, spec: AdapterSpec, std: float = 0.5) -> Path:
    """Save a PEFT adapter for `model` per `spec` (random A and B); the model is left as it was."""
    return make_random_adapter(
        model, out, spec.rank, spec.alpha, spec.target_modules, spec.use_rslora, spec.seed, std, **spec.extra
    )


def make_versions(model_dir: Path, out: Path, count: int) -> dict[str, Path]:
    """`count` different rank-4 adapters for the model at `model_dir`, "v1", "v2", ... (seeds 1, 2, ...),
    as successive versions of one unit's adapter."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {f"v{i}": make_peft_adapter(model, out / f"v{i}", AdapterSpec(rank=4, alpha=8, seed=i))
            for i in range(1, count + 1)}


def rewrite_config(adapter_dir: Path, **changes: object) -> None:
    """Edit an adapter's adapter_config.json in place (for refusal tests)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def register_adapters(model_dir: Path, root: Path, adapter_ids: tuple[str, ...], first_seed: int = 1) -> list[str]:
    """Register a random rank-4 adapter per id (seeds first_seed, first_seed + 1, ...; owner = id, with a system
    prompt) in a SQLite registry and a store under `root`; the `serve` options that serve them."""
    from lorax_lite.registry import admin
    from lorax_lite.registry.sqlite import SQLiteRegistry
    from lorax_lite.registry.store import AdapterStore

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    registry, store = SQLiteRegistry(root / "registry.db"), AdapterStore(root / "store")
    for seed, adapter_id in enumerate(adapter_ids, start=first_seed):
        source = make_peft_adapter(model, root / "sources" / adapter_id, AdapterSpec(rank=4, alpha=8, seed=seed))
        admin.register(registry, store, adapter_id, source, model_dir, owner=adapter_id,
                       system_prompt=f"You are the {adapter_id} assistant.")
    registry.close()
    registry_url = f"sqlite:///{root / 'registry.db'}"
    return ["--model", str(model_dir), "--registry", registry_url, "--store", str(root / "store")]

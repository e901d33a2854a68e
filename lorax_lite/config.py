"""Configuration dataclasses. Each checks itself and says what to change when a value is wrong."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

DEFAULT_MODEL_DIR = "models/SmolLM2-135M-Instruct"

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cpu", "cuda")


def default_model() -> str:
    """The model used when none is given: `$LORAX_MODEL`, else the directory `fetch-model` writes."""
    return os.environ.get("LORAX_MODEL", DEFAULT_MODEL_DIR)


@dataclass
class EngineConfig:
    """Everything the engine needs to know; names follow vLLM's where they exist.

    `max_loras` adapters fit in device slots at once (0 turns LoRA off: no slot buffers, no
    overhead), each of rank up to `max_lora_rank`; `max_cpu_loras` more are cached in host memory.
    `num_kv_blocks` fixes the size of the paged KV cache; when it is None the cache gets as many
    blocks as fit in `kv_cache_memory_gb`. `max_model_len` None means the model's context length,
    capped so that one sequence of that length fits in the KV cache.
    """

    model: str = ""
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float = 1.0
    max_model_len: int | None = None
    max_loras: int = 8
    max_lora_rank: int = 16
    max_cpu_loras: int = 64

    def __post_init__(self) -> None:
        if not self.model:
            self.model = default_model()
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.device not in _DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(_DEVICES)} or 'cuda:N', got {self.device!r}")
        _check_positive(self, "max_num_seqs", "max_num_batched_tokens", "block_size")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 (or None to size it from kv_cache_memory_gb), got {self.num_kv_blocks}")
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        _check_positive(self, "max_lora_rank", "max_cpu_loras")
        if not isinstance(self.max_loras, int) or isinstance(self.max_loras, bool) or self.max_loras < 0:
            raise ValueError(f"max_loras must be an integer >= 0 (0 turns LoRA off), got {self.max_loras!r}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): every adapter in a slot is also cached in host memory")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (or None for the model's context length), got {self.max_model_len}")

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: object) -> "EngineConfig":
        """Build from keyword arguments, naming any argument that is not an engine setting."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(model=model or "", **kwargs)  # type: ignore[arg-type]


def _check_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

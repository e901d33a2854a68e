"""lorax-lite: one resident base model, many LoRA adapters, continuous batching and a paged KV cache.

`LLM`, `AsyncLLM`, `SamplingParams`, ... load on first use, so light entry points (the admin CLI) do not
import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "lorax_lite.llm",
    "AsyncLLM": "lorax_lite.engine.async_llm",
    "SamplingParams": "lorax_lite.engine.request",
    "RequestOutput": "lorax_lite.engine.request",
    "FinishReason": "lorax_lite.engine.request",
    "OutputKind": "lorax_lite.engine.request",
}

if TYPE_CHECKING:
    from lorax_lite.engine.async_llm import AsyncLLM
    from lorax_lite.engine.request import FinishReason, OutputKind, RequestOutput, SamplingParams
    from lorax_lite.llm import LLM


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorax_lite' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "FinishReason", "OutputKind"]
__version__ = "0.1.0"

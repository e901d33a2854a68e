"""lorax-lite: one resident base model, many LoRA adapters, continuous batching and a paged KV cache."""

from lorax_lite.engine.async_llm import AsyncLLM
from lorax_lite.engine.request import FinishReason, RequestOutput, SamplingParams
from lorax_lite.llm import LLM

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "FinishReason"]
__version__ = "0.1.0"

"""Configuration dataclasses: the engine's (EngineConfig) and the server's (ServerLimits). Each checks itself
and says what to change when a value is wrong. No torch import here, so the command line starts fast.

Each field's help text is in its metadata (`field(..., metadata={"help": ...})`): `lorax-lite serve`
builds its options from the fields (name, default, type and help), so they are written once, here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields

DEFAULT_MODEL_DIR = "models/SmolLM2-135M-Instruct"

DTYPES = ("auto", "float32", "bfloat16", "float16")  # all but "auto" are torch's names
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
QUANTIZE_MODES = ("none", "int8", "fp8")
LINEAR_BACKENDS = ("auto", "torch", "onednn")
ATTENTION_BACKENDS = ("auto", "sdpa", "triton")
LORA_BACKENDS = ("auto", "grouped", "segment", "triton")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def default_model() -> str:
    """The model used when none is given: `$LORAX_MODEL`, else the directory `fetch-model` writes."""
    return os.environ.get("LORAX_MODEL", DEFAULT_MODEL_DIR)


def check_dtype(dtype: str) -> None:
    """Raise ValueError unless `dtype` is one of DTYPES."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def check_device(device: str) -> None:
    """Raise ValueError unless `device` is auto, cpu, cuda or cuda:N (whether it exists is for the loader to say)."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to know; names follow vLLM's where they exist.

    `max_loras` adapters fit in device slots at once (0 turns LoRA off: no slot buffers, no
    overhead), each of rank up to `max_lora_rank`; `max_cpu_loras` more are cached in host memory.
    `num_kv_blocks` fixes the size of the paged KV cache; when it is None the cache gets as many
    blocks as fit in `kv_cache_memory_gb`. `max_model_len` None means the model's context length,
    capped so that one sequence of that length fits in the KV cache. `enable_prefix_caching` keeps full
    KV blocks after their request finishes, found again by a later request with the same prefix.
    """

    model: str = field(default_factory=default_model, metadata={
        "help": "Model directory, .gguf file or hub id (default: $LORAX_MODEL, else the fetched model)."})
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N."})
    quantize: str = field(default="none", metadata={
        "help": "Base model decoder weights: none; int8 (CPU: int8 activations x int8 weights; CUDA: int8 "
                "weights); fp8 (CUDA, compute capability 8.9+). Adapters stay in full precision."})
    linear_backend: str = field(default="auto", metadata={
        "help": "Base model linear layers: auto (onednn for float32 on CPU, else torch); onednn (weights prepacked "
                "once for oneDNN's CPU kernels); torch (F.linear)."})
    attention_backend: str = field(default="auto", metadata={
        "help": "Paged attention: auto (triton on CUDA when triton is installed, else sdpa); sdpa (each sequence's "
                "KV blocks gathered, then torch's scaled_dot_product_attention: the reference); triton (kernels that "
                "read the paged KV cache in place)."})
    lora_backend: str = field(default="auto", metadata={
        "help": "Batched LoRA deltas: auto (triton on CUDA when triton is installed, else grouped where torch "
                "supports it, else segment); grouped (torch grouped GEMMs); segment (a matmul pair per adapter in "
                "the step); triton (SGMV/BGMV kernels)."})
    enforce_eager: bool = field(default=False, metadata={
        "help": "Never replay CUDA graphs. On CUDA with the triton backends, decode-only steps otherwise replay "
                "graphs captured at start-up for bucketed batch sizes."})
    max_num_seqs: int = field(default=64, metadata={"help": "Most sequences in one step."})
    max_num_batched_tokens: int = field(default=512, metadata={"help": "Most tokens in one step."})
    block_size: int = field(default=16, metadata={"help": "Tokens per KV-cache block."})
    num_kv_blocks: int | None = field(default=None, metadata={
        "help": "Size of the paged KV cache in blocks (default: as many as fit in its memory)."})
    kv_cache_memory_gb: float = field(default=1.0, metadata={"help": "Memory for the paged KV cache."})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "Reuse the KV blocks of a prompt prefix computed before under the same adapter version (and "
                "cache salt), instead of computing them again."})
    max_model_len: int | None = field(default=None, metadata={
        "help": "Longest prompt + output (default: the model's)."})
    max_loras: int = field(default=8, metadata={"help": "Adapters in device slots at once."})
    max_lora_rank: int = field(default=16, metadata={"help": "Largest adapter rank accepted."})
    max_cpu_loras: int = field(default=64, metadata={"help": "Adapters cached in host memory."})
    registry_timeout_s: float = field(default=1.0, metadata={
        "help": "Longest wait for one adapter registry call; past it the registry counts as unreachable."})
    registry_stale_s: float = field(default=300.0, metadata={
        "help": "While the registry is unreachable, serve adapter versions it confirmed at most this many "
                "seconds ago (0: none; other adapters get 'unavailable')."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a model directory, .gguf file or hub id (leave it out for the default)")
        check_dtype(self.dtype)
        check_device(self.device)
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {self.linear_backend!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        if self.lora_backend not in LORA_BACKENDS:
            raise ValueError(f"lora_backend must be one of {', '.join(LORA_BACKENDS)}, got {self.lora_backend!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be true or false, got {self.enforce_eager!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}")
        _check_positive(self, "max_num_seqs", "max_num_batched_tokens", "block_size")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 (or unset to size it from kv_cache_memory_gb), "
                             f"got {self.num_kv_blocks}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be true or false, got {self.enable_prefix_caching!r}")
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        _check_positive(self, "max_lora_rank", "max_cpu_loras")
        if not isinstance(self.max_loras, int) or isinstance(self.max_loras, bool) or self.max_loras < 0:
            raise ValueError(f"max_loras must be an integer >= 0 (0 turns LoRA off), got {self.max_loras!r}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): "
                             "every adapter in a slot is also cached in host memory")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (or unset for the model's context length), "
                             f"got {self.max_model_len}")
        if not self.registry_timeout_s > 0:
            raise ValueError(f"registry_timeout_s must be > 0 seconds, got {self.registry_timeout_s}")
        if not self.registry_stale_s >= 0:
            raise ValueError(f"registry_stale_s must be >= 0 seconds (0: no fallback during outages), "
                             f"got {self.registry_stale_s}")

    @classmethod
    def from_kwargs(cls, model: str | None = None, **kwargs: object) -> EngineConfig:
        """Build from keyword arguments, naming any that is not an engine setting; no `model` means the default one."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(model=model or default_model(), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ServerLimits:
    """What one request may cost and how long the server waits for clients: refusals that protect every other
    request (429 past `max_queued_requests`, 413 past `max_body_bytes`, 400/422 past the prompt and token limits,
    408 for a body that does not arrive in time) and the shutdown deadline."""

    max_queued_requests: int = field(default=256, metadata={
        "help": "Requests waiting for the engine before new ones get a 429."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body; larger ones get a 413."})
    max_prompt_chars: int = field(default=100_000, metadata={
        "help": "Longest prompt in characters (all chat messages together), checked before tokenizing."})
    max_prompt_tokens: int = field(default=4096, metadata={"help": "Longest prompt in tokens."})
    default_max_tokens: int = field(default=512, metadata={
        "help": "Tokens a chat completion may generate when the request sets no max_tokens."})
    max_tokens_limit: int = field(default=2048, metadata={
        "help": "Most tokens one request may ask to generate (max_tokens, max_new_tokens)."})
    max_request_seconds: float = field(default=600.0, metadata={
        "help": "Longest a request may run; a request's own timeout may only be shorter (finish reason timeout)."})
    header_timeout: float = field(default=10.0, metadata={
        "help": "Seconds a connection may take to send a request's headers before it is closed."})
    body_timeout: float = field(default=30.0, metadata={
        "help": "Seconds a client may take to send a request's body before it gets a 408."})
    max_connections: int = field(default=1024, metadata={
        "help": "Open connections at once; further ones get a 503 and are closed."})
    shutdown_timeout: float = field(default=30.0, metadata={
        "help": "On SIGTERM: seconds in-flight requests get to finish before they are stopped and the server exits."})

    def __post_init__(self) -> None:
        if self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        _check_positive(self, "max_prompt_chars", "max_prompt_tokens", "default_max_tokens", "max_tokens_limit",
                        "max_connections")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens_limit "
                             f"({self.max_tokens_limit})")
        for name in ("max_request_seconds", "header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        if not isinstance(self.shutdown_timeout, (int, float)) or not 0 <= self.shutdown_timeout < float("inf"):
            raise ValueError(f"shutdown_timeout must be a number of seconds >= 0, got {self.shutdown_timeout!r}")


def _check_positive(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

"""Adapter errors: each refusal has its own type (the server maps them to HTTP statuses)."""

from __future__ import annotations


class AdapterError(ValueError):
    """Base of every adapter refusal; the message says what is wrong and what to do."""


class AdapterNotFoundError(AdapterError):
    """The adapter path does not exist or is not a directory (or the adapter id is unknown)."""


class AdapterConfigError(AdapterError):
    """adapter_config.json is missing, unreadable, or has a missing or ill-typed field."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a PEFT feature lorax-lite cannot serve; `feature` names it."""

    def __init__(self, message: str, feature: str) -> None:
        super().__init__(message)
        self.feature = feature


class PickledWeightsError(AdapterError):
    """The weights are pickled (adapter_model.bin, ...); they are refused without being opened."""


class AdapterRankError(AdapterError):
    """A rank is above max_lora_rank."""


class TargetModuleError(AdapterError):
    """The adapter targets a module that the base model lacks or lorax-lite cannot serve."""


class AdapterShapeError(AdapterError):
    """The tensors do not form LoRA pairs of the right names, shapes and dtypes for the base model."""


class CorruptWeightsError(AdapterError):
    """adapter_model.safetensors is missing, truncated or malformed."""


class AdapterTooLargeError(AdapterError):
    """A file of the adapter is over its size limit (checked before it is read)."""

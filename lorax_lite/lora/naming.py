"""Names: what an adapter id may be, and the files of a PEFT adapter directory. No torch import here,
so the admin CLI starts fast."""

from __future__ import annotations

import re

from lorax_lite.lora.errors import AdapterError

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the whole id must match (fullmatch)


class InvalidAdapterIdError(AdapterError):
    """An adapter id that does not match ADAPTER_ID_PATTERN."""


def check_adapter_id(adapter_id: object) -> str:
    """Return the id if it is well-formed (checked before any filesystem or registry access)."""
    if not isinstance(adapter_id, str) or not ADAPTER_ID_PATTERN.fullmatch(adapter_id):
        raise InvalidAdapterIdError(
            f"invalid adapter id {_brief(adapter_id)}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return adapter_id


def _brief(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: an error message never echoes a huge id."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

"""The version of an adapter: sha256 over its canonical config and its weights file.

A registered version names exactly one content, so the store can be content-addressed and the
engine can verify, when it reads a version, that the files are still what was registered.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from lorax_lite.lora.naming import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

HASH_DOMAIN = b"lorax-lite adapter v1\0"
_CHUNK = 1 << 20


def canonical_config(src_dir: str | os.PathLike) -> bytes:
    """The adapter's config as canonical JSON bytes (sorted keys, no spaces); ValueError if not a JSON object."""
    config = json.loads((Path(src_dir) / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{ADAPTER_CONFIG_NAME} in {src_dir} is not a JSON object")
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode("utf-8")


def compute_version(src_dir: str | os.PathLike) -> str:
    """sha256 hex over the canonical config and the weights file of the adapter at `src_dir`.

    After HASH_DOMAIN, each part is hashed as (name length, name, data length, data), lengths as
    8-byte big-endian integers, config first: no two different adapters hash the same input. The
    config's formatting (key order, whitespace) does not change the version. Raises OSError when a
    file is unreadable and ValueError when the config is not a JSON object.
    """
    digest = hashlib.sha256(HASH_DOMAIN)
    config = canonical_config(src_dir)
    hash_part(digest, ADAPTER_CONFIG_NAME, len(config), [config])
    with open(Path(src_dir) / ADAPTER_WEIGHTS_NAME, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        read = hash_part(digest, ADAPTER_WEIGHTS_NAME, size, iter(lambda: file.read(_CHUNK), b""))
    if read != size:
        raise OSError(f"{ADAPTER_WEIGHTS_NAME} in {src_dir} changed size while it was read")
    return digest.hexdigest()


def hash_part(digest: hashlib._Hash, name: str, size: int, chunks: Iterable[bytes]) -> int:
    """Feed one named part of `size` bytes to `digest`; returns the bytes actually read from `chunks`."""
    encoded = name.encode("utf-8")
    digest.update(len(encoded).to_bytes(8, "big") + encoded + size.to_bytes(8, "big"))
    read = 0
    for chunk in chunks:
        digest.update(chunk)
        read += len(chunk)
    return read

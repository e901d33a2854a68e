"""Registering adapters: validate, copy into the store, then record in the registry (the CLI's and the
server's pipeline).

Order matters for crashes: the store is written before the registry, so a process killed in
between leaves at most an unreferenced version directory, never a current version without files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lorax_lite.lora.naming import ADAPTER_WEIGHTS_NAME, check_adapter_id
from lorax_lite.registry.base import AdapterRecord, Registry
from lorax_lite.registry.store import AdapterStore, compute_version

DEFAULT_MAX_LORA_RANK = 64  # registration accepts up to this; each engine checks its own max_lora_rank at load


class BaseModelError(ValueError):
    """The base model used to check adapter shapes cannot be read (bad --model / LORAX_MODEL)."""


@dataclass
class ValidatedAdapter:
    """An adapter directory that passed validation against a base model; not yet in the store or registry."""

    adapter_id: str
    src_dir: Path
    base_model: str
    version: str
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int  # of its weights file


def validate(adapter_id: str, src_dir: str | os.PathLike, model_dir: str | os.PathLike,
             max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> ValidatedAdapter:
    """Check the id, then the adapter against the base model's shapes; nothing is written.

    Raises InvalidAdapterIdError, the specific AdapterError of the first problem found, or
    BaseModelError when `model_dir` cannot be read.
    """
    check_adapter_id(adapter_id)
    from lorax_lite.lora.weights import load_lora_weights  # imports torch: only when validating

    weights = load_lora_weights(src_dir, _targets(model_dir), max_lora_rank)
    src = Path(src_dir)
    return ValidatedAdapter(
        adapter_id=adapter_id,
        src_dir=src,
        base_model=os.fspath(model_dir),
        version=compute_version(src),
        rank=weights.rank,
        alpha=weights.alpha,
        target_modules=weights.target_modules,
        size_bytes=(src / ADAPTER_WEIGHTS_NAME).stat().st_size,
    )


def commit(registry: Registry, store: AdapterStore, adapter: ValidatedAdapter, owner: str | None = None,
           description: str | None = None, system_prompt: str | None = None,
           pin: bool = False) -> tuple[AdapterRecord, bool]:
    """Copy a validated adapter into the store, then make it the id's current version.

    Returns (the current record, whether a new version became current). Identical content is a
    no-op (except `pin`, and repairing its files in the store if they were damaged). A new version
    takes owner, description and system_prompt from the current one unless they are given.
    """
    current = registry.get(adapter.adapter_id)
    path = store.add(adapter.adapter_id, adapter.src_dir, adapter.version)  # a no-op when present and intact
    if current is not None and current.version == adapter.version:
        created, record = False, current
    else:
        given = {"owner": owner, "description": description, "system_prompt": system_prompt}
        text = {name: value if value is not None else getattr(current, name, "") for name, value in given.items()}
        record = _record(adapter, path, pin, **text)
        created = registry.add_version(record)
        # an older version made current again keeps its first record; the pin flag is the id's
        record = registry.get_version(adapter.adapter_id, adapter.version) or record
    if pin and not record.pinned:
        registry.set_pinned(adapter.adapter_id, True)
        record.pinned = True
    return record, created


def register(registry: Registry, store: AdapterStore, adapter_id: str, src_dir: str | os.PathLike,
             model_dir: str | os.PathLike, owner: str | None = None, description: str | None = None,
             system_prompt: str | None = None, pin: bool = False,
             max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> tuple[AdapterRecord, bool]:
    """Validate the adapter at `src_dir` for the base model at `model_dir`, store it and make it current.

    Nothing is written when validation fails. Returns (record, created) as `commit` does.
    """
    adapter = validate(adapter_id, src_dir, model_dir, max_lora_rank)
    return commit(registry, store, adapter, owner, description, system_prompt, pin)


def verify(registry: Registry, store: AdapterStore, adapter_id: str | None = None) -> list[tuple[str, str, bool]]:
    """(adapter_id, version, files hash to version) for every registered version of one id, or of all ids."""
    ids = [check_adapter_id(adapter_id)] if adapter_id is not None else [r.adapter_id for r in registry.list_current()]
    return [(i, r.version, store.verify(i, r.version)) for i in ids for r in registry.versions(i)]


def _targets(model_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    from lorax_lite.lora.layers import lora_targets  # imports transformers: only when validating

    try:
        return lora_targets(os.fspath(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"base model at {model_dir}: cannot read its config ({_first_line(exc)}); "
                             "pass --model DIR (or set LORAX_MODEL) to the model the adapters are for") from exc


def _record(adapter: ValidatedAdapter, path: Path, pin: bool, owner: str, description: str,
            system_prompt: str) -> AdapterRecord:
    return AdapterRecord(
        adapter_id=adapter.adapter_id, version=adapter.version, base_model=adapter.base_model, rank=adapter.rank,
        alpha=adapter.alpha, target_modules=adapter.target_modules, size_bytes=adapter.size_bytes,
        store_path=os.fspath(path), created_at=time.time(), owner=owner, description=description,
        system_prompt=system_prompt, pinned=pin,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""AdapterStore: the content-addressed directory of adapter files, `<root>/<adapter_id>/<version>/`.

A version is `compute_version` of the adapter: sha256 over its canonical config and its weights
file. A version directory holds exactly two files, `adapter_config.json` (canonical JSON) and
`adapter_model.safetensors`, and never changes once written. It is built in a temporary directory
next to it (files and directory fsynced) and renamed into place, so a version directory either
is complete or does not exist; a killed process leaves at most a `.tmp-*` directory, which
readers ignore and the next `add` for that id removes.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from lorax_lite.lora.checksum import canonical_config, compute_version
from lorax_lite.lora.errors import CorruptWeightsError
from lorax_lite.lora.naming import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, check_adapter_id

DEFAULT_STORE = "data/store"
VERSION_PATTERN = re.compile(r"[0-9a-f]{64}")
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_STALE_AFTER_S = 3600.0  # a temp dir this old is stale even if its owner cannot be checked
_CHUNK = 1 << 20


def default_store_root() -> str:
    """`$LORAX_STORE`, else `data/store`."""
    return os.environ.get("LORAX_STORE", DEFAULT_STORE)


class AdapterStore:
    """Immutable, content-addressed adapter versions on disk under `root` (default `$LORAX_STORE`, else data/store)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root if root is not None else default_store_root()).absolute()

    def path(self, adapter_id: str, version: str) -> Path:
        """Directory of one version (whether or not it exists)."""
        return self._id_dir(adapter_id) / _check_version(version)

    def versions(self, adapter_id: str) -> list[str]:
        """Versions present in the store for the id (complete ones only), sorted."""
        id_dir = self._id_dir(adapter_id)
        if not id_dir.is_dir():
            return []
        return sorted(p.name for p in id_dir.iterdir() if VERSION_PATTERN.fullmatch(p.name))

    def verify(self, adapter_id: str, version: str) -> bool:
        """True if the version's files are there and hash to `version`."""
        path = self.path(adapter_id, version)  # a bad id or version raises, it is not a mismatch
        try:
            return compute_version(path) == version
        except (OSError, ValueError):  # missing, unreadable or not JSON: not the content registered
            return False

    def add(self, adapter_id: str, src_dir: str | os.PathLike, version: str) -> Path:
        """Copy the adapter at `src_dir` (already validated; `version` = its compute_version) into the store.

        A no-op when the version is there and verifies. A version directory that fails to verify
        (tampered, damaged disk) is replaced by a fresh copy of the same content. Raises
        CorruptWeightsError if the source does not hash to `version` (it changed after validation).
        """
        final = self.path(adapter_id, version)
        if final.is_dir() and self.verify(adapter_id, version):
            return final
        id_dir = final.parent
        _make_dirs(id_dir)
        _clean_stale(id_dir)
        temp = Path(tempfile.mkdtemp(prefix=_owned(_TEMP_PREFIX), dir=id_dir))
        try:
            self._fill(temp, Path(src_dir), version)
            _install(temp, final, lambda: self.verify(adapter_id, version))
        finally:
            shutil.rmtree(temp, ignore_errors=True)  # gone already when installed
        return final

    def remove(self, adapter_id: str) -> bool:
        """Delete every version of the id; False if the store had none."""
        id_dir = self._id_dir(adapter_id)
        if not id_dir.is_dir():
            return False
        _clean_stale(self.root)
        # Renamed away first: readers see the whole id or nothing, never a half-deleted version.
        trash = Path(tempfile.mkdtemp(prefix=_owned(_TRASH_PREFIX), dir=self.root))
        os.rename(id_dir, trash / adapter_id)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _id_dir(self, adapter_id: str) -> Path:
        return self.root / check_adapter_id(adapter_id)

    @staticmethod
    def _fill(temp: Path, src_dir: Path, version: str) -> None:
        _write_file(temp / ADAPTER_CONFIG_NAME, [canonical_config(src_dir)])
        with open(src_dir / ADAPTER_WEIGHTS_NAME, "rb") as src:
            _write_file(temp / ADAPTER_WEIGHTS_NAME, iter(lambda: src.read(_CHUNK), b""))
        _fsync_dir(temp)
        copied = compute_version(temp)
        if copied != version:
            raise CorruptWeightsError(f"adapter at {src_dir}: its files changed while being registered "
                                      f"(expected version {version[:12]}, copied {copied[:12]}); register it again")


def _check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise ValueError(f"invalid adapter version {version!r}: expected 64 lowercase hex digits (a sha256)")
    return version


def _install(temp: Path, final: Path, verifies: Callable[[], bool]) -> None:
    """Rename the finished `temp` to `final`; a bad existing `final` is moved aside first."""
    if final.is_dir() and not verifies():
        aside = Path(tempfile.mkdtemp(prefix=_owned(_TRASH_PREFIX), dir=final.parent))
        os.rename(final, aside / final.name)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(temp, final)
    except OSError:
        if not (final.is_dir() and verifies()):  # else: another process installed the same content first
            raise
    _fsync_dir(final.parent)


def _write_file(path: Path, chunks: Iterable[bytes]) -> None:
    with open(path, "xb") as file:
        for chunk in chunks:
            file.write(chunk)
        file.flush()
        os.fsync(file.fileno())


def _make_dirs(path: Path) -> None:
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for created in missing:  # make each new directory entry durable in its parent
        _fsync_dir(created.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _owned(prefix: str) -> str:
    """A temp dir name prefix naming its owner: `<prefix><host>-<pid>-` (mkdtemp appends a part without '-')."""
    return f"{prefix}{socket.gethostname()}-{os.getpid()}-"


def _clean_stale(directory: Path) -> None:
    """Remove temp and trash dirs left by killed processes (never one whose owner still runs)."""
    for entry in directory.iterdir():
        if entry.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)) and _is_stale(entry):
            shutil.rmtree(entry, ignore_errors=True)


def _is_stale(temp: Path) -> bool:
    owner = temp.name.split("-", 1)[1]  # after ".tmp-" or ".trash-"
    host, _, pid = owner.rpartition("-")[0].rpartition("-")
    try:
        if host == socket.gethostname() and pid.isdigit() and not _is_running(int(pid)):
            return True
        return time.time() - temp.stat().st_mtime > _STALE_AFTER_S  # another host's, or a reused pid
    except OSError:
        return False


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

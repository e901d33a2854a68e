"""The version of an adapter (lora/checksum.py): sha256 over its canonical config and its weights file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from lora_helpers import make_versions, rewrite_config

from lorax_lite.lora.checksum import HASH_DOMAIN, canonical_config, compute_version, hash_part

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def sources(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_versions(tiny_llama_dir, tmp_path_factory.mktemp("checksum-sources"), 2)


def part(name: str, data: bytes) -> bytes:
    """One part as the docstring of compute_version specifies it: lengths as 8-byte big-endian integers."""
    encoded = name.encode()
    return len(encoded).to_bytes(8, "big") + encoded + len(data).to_bytes(8, "big") + data


def test_version_is_the_sha256_of_the_documented_encoding(sources: dict[str, Path]) -> None:
    src = sources["v1"]
    config = json.dumps(json.loads((src / CONFIG).read_text()), sort_keys=True, separators=(",", ":")).encode()
    expected = hashlib.sha256(HASH_DOMAIN + part(CONFIG, config) + part(WEIGHTS, (src / WEIGHTS).read_bytes()))
    assert canonical_config(src) == config
    assert compute_version(src) == expected.hexdigest()
    assert compute_version(sources["v2"]) != compute_version(src)


def test_version_is_of_content_not_of_config_formatting(sources: dict[str, Path], tmp_path: Path) -> None:
    v1 = compute_version(sources["v1"])
    copy = Path(shutil.copytree(sources["v1"], tmp_path / "copy"))
    config = json.loads((copy / CONFIG).read_text())
    (copy / CONFIG).write_text(json.dumps(dict(reversed(list(config.items()))), indent=4))
    assert compute_version(copy) == v1  # same config, other key order and whitespace
    rewrite_config(copy, lora_alpha=9)
    assert compute_version(copy) != v1


def test_version_hashes_each_part_with_its_length() -> None:
    # The bytes go in as (len name, name, len data, data): moving bytes from one part to the next changes the hash.
    def digest(parts: list[tuple[str, bytes]]) -> str:
        h = hashlib.sha256()
        for name, data in parts:
            hash_part(h, name, len(data), [data])
        return h.hexdigest()

    assert digest([("a", b"xy"), ("b", b"z")]) != digest([("a", b"x"), ("b", b"yz")])


def test_a_config_that_is_not_a_json_object_is_refused(sources: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(sources["v1"], tmp_path / "copy"))
    (copy / CONFIG).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        compute_version(copy)

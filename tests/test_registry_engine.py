"""The engine resolves adapter ids through a registry while it serves: register, remove, new versions, checksums."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lora_helpers import make_versions
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorax_lite import LLM, SamplingParams
from lorax_lite.lora.errors import AdapterNotFoundError, CorruptWeightsError
from lorax_lite.registry import admin
from lorax_lite.registry.factory import open_registry
from lorax_lite.registry.store import AdapterStore

PROMPT = [5, 17, 42, 99, 100, 7]
GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def sources(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two different adapters (v1, v2 of one business unit's adapter) and PEFT's greedy tokens for each."""
    return make_versions(tiny_llama_dir, tmp_path_factory.mktemp("registry-sources"), 2)


@pytest.fixture(scope="module")
def expected(tiny_llama_dir: Path, sources: dict[str, Path]) -> dict[str | None, list[int]]:
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.tensor([PROMPT])
    refs: dict[str | None, list[int]] = {}
    for name in (None, *sources):
        model = base if name is None else PeftModel.from_pretrained(base, sources[name])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_tokens,
                             do_sample=False)
        refs[name] = out[0, len(PROMPT):].tolist()
        if name is not None:
            model.unload()
    assert refs["v1"] != refs["v2"] != refs[None]
    return refs


@pytest.fixture
def setup(tiny_llama_dir: Path, tmp_path: Path, registry_url: str):
    """An LLM serving from a fresh registry (SQLite file or Redis prefix: both backends) and store."""
    registry = open_registry(registry_url)
    store = AdapterStore(tmp_path / "store")
    llm = LLM(str(tiny_llama_dir), registry=registry, dtype="float32", device="cpu", max_loras=2)
    yield llm, registry, store, tiny_llama_dir
    registry.close()


def register(setup, adapter_id: str, src: Path, **kw):
    _, registry, store, model_dir = setup
    return admin.register(registry, store, adapter_id, src, model_dir, **kw)


def generate(llm: LLM, adapter_id: str | None) -> list[int]:
    out = llm.generate([PROMPT], GREEDY, adapter_ids=adapter_id)[0]
    assert out.finish_reason in ("length", "eos"), out.error
    return out.token_ids


def run_to_end(llm: LLM, requests) -> None:
    while any(not r.is_finished for r in requests):
        llm.engine.step()


def test_an_adapter_registered_while_serving_is_usable_by_the_next_request(setup, sources, expected):
    llm = setup[0]
    with pytest.raises(AdapterNotFoundError, match="not in the registry"):
        generate(llm, "pricing")
    assert generate(llm, None) == expected[None]
    register(setup, "pricing", sources["v1"], owner="pricing")
    assert generate(llm, "pricing") == expected["v1"]


def test_a_removed_adapter_is_unknown_to_new_requests_while_running_ones_finish(setup, sources, expected):
    llm, registry = setup[0], setup[1]
    register(setup, "pricing", sources["v1"])
    running = llm.engine.add_request(PROMPT, GREEDY, adapter_id="pricing")
    llm.engine.step()
    llm.engine.step()
    assert registry.remove("pricing")
    with pytest.raises(AdapterNotFoundError):
        llm.engine.add_request(PROMPT, GREEDY, adapter_id="pricing")
    run_to_end(llm, [running])
    assert running.output_token_ids == expected["v1"]


def test_a_new_version_serves_new_requests_while_running_ones_keep_theirs(setup, sources, expected):
    llm = setup[0]
    first, _ = register(setup, "pricing", sources["v1"])
    old = llm.engine.add_request(PROMPT, GREEDY, adapter_id="pricing")
    llm.engine.step()
    second, created = register(setup, "pricing", sources["v2"])
    assert created and second.version != first.version
    new = llm.engine.add_request(PROMPT, GREEDY, adapter_id="pricing")
    run_to_end(llm, [old, new])
    assert old.output_token_ids == expected["v1"]
    assert new.output_token_ids == expected["v2"]
    manager = llm.engine.adapter_manager
    manager.check_invariants()
    cached = manager.host_keys
    assert f"pricing@{second.version}" in cached
    assert not any(first.version in key for key in cached)  # the old version left the cache once unused


def test_identical_re_registration_is_a_no_op_for_the_engine(setup, sources, expected):
    llm = setup[0]
    first, _ = register(setup, "pricing", sources["v1"])
    assert generate(llm, "pricing") == expected["v1"]
    again, created = register(setup, "pricing", sources["v1"])
    assert not created and again.version == first.version
    assert generate(llm, "pricing") == expected["v1"]
    assert llm.engine.adapter_manager.stats.misses == 1  # loaded from disk once


def test_a_checksum_mismatch_refuses_that_adapter_only(setup, sources, expected):
    llm = setup[0]
    bad, _ = register(setup, "pricing", sources["v1"])
    register(setup, "supply", sources["v2"])
    weights = Path(bad.store_path) / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip a bit in the last tensor's data: a valid file, the wrong content
    weights.write_bytes(bytes(data))
    outs = llm.generate([PROMPT] * 3, GREEDY, adapter_ids=["pricing", "supply", None])
    assert outs[0].finish_reason == "error" and isinstance(outs[0].exception, CorruptWeightsError)
    assert "checksum mismatch" in outs[0].error
    assert outs[1].token_ids == expected["v2"] and outs[2].token_ids == expected[None]


def test_the_registry_pin_flag_is_followed(setup, sources):
    llm, registry = setup[0], setup[1]
    record, _ = register(setup, "pricing", sources["v1"], pin=True)
    llm = LLM(str(setup[3]), registry=registry, dtype="float32", device="cpu", max_loras=1, max_cpu_loras=4)
    generate(llm, "pricing")
    key = f"pricing@{record.version}"
    assert llm.engine.adapter_manager.is_pinned(key)
    registry.set_pinned("pricing", False)
    generate(llm, "pricing")
    assert not llm.engine.adapter_manager.is_pinned(key)


def test_added_adapters_work_beside_a_registry(setup, sources, expected):
    llm = setup[0]
    llm.add_adapter("local", sources["v2"])
    register(setup, "pricing", sources["v1"])
    outs = llm.generate([PROMPT] * 2, GREEDY, adapter_ids=["local", "pricing"])
    assert [o.token_ids for o in outs] == [expected["v2"], expected["v1"]]


def test_a_request_resolved_before_a_newer_version_was_served_still_gets_its_version(setup, sources, expected):
    """AsyncLLM resolves in a worker thread and admits in the engine thread: the two can interleave."""
    llm = setup[0]
    register(setup, "pricing", sources["v1"])
    assert generate(llm, "pricing") == expected["v1"]  # v1 is the version the engine serves
    v1 = llm.engine.resolve_adapter("pricing")
    early = llm.engine.make_request(PROMPT, GREEDY, adapter=v1)  # resolved to v1, not yet admitted
    register(setup, "pricing", sources["v2"])
    assert generate(llm, "pricing") == expected["v2"]  # v2 admitted and finished first
    llm.engine.add(early)
    run_to_end(llm, [early])
    assert early.output_token_ids == expected["v1"]


def test_with_a_store_directory_versions_are_read_from_it_not_from_the_recorded_path(setup, sources, expected,
                                                                                    tmp_path):
    """Replicas mount the store where they like (`serve --store`); a record cannot point the server elsewhere."""
    _, registry, store, model_dir = setup
    record, _ = register(setup, "pricing", sources["v1"])
    moved = tmp_path / "mounted-elsewhere"
    shutil.copytree(store.root, moved)
    shutil.rmtree(store.root)
    llm = LLM(str(model_dir), registry=registry, store=moved, dtype="float32", device="cpu", max_loras=2)
    assert llm.generate(PROMPT, GREEDY, adapter_ids="pricing")[0].token_ids == expected["v1"]
    without_store = LLM(str(model_dir), registry=registry, dtype="float32", device="cpu", max_loras=2)
    out = without_store.generate(PROMPT, GREEDY, adapter_ids="pricing")[0]
    assert out.finish_reason == "error" and isinstance(out.exception, CorruptWeightsError)  # the recorded path is gone

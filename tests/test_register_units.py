"""`lorax-lite adapters register-units` (what `make serve` runs): every unit under a directory, with its lorax.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lora_helpers import AdapterSpec, make_peft_adapter
from lorax_lite.cli import app
from lorax_lite.cli.adapters import _unit_card
from lorax_lite.registry.sqlite import SQLiteRegistry

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
CARD = {"owner": "pricing", "description": "Prices and discounts.", "system_prompt": "You are the pricing assistant."}


@pytest.fixture(scope="module")
def source(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return make_peft_adapter(model, tmp_path_factory.mktemp("units-src") / "adapter", AdapterSpec(rank=4, alpha=8, seed=5))


@pytest.fixture
def units(tmp_path: Path, source: Path) -> Path:
    """pricing (adapter + lorax.json), supply_chain (adapter, no card), untrained (data only: skipped)."""
    root = tmp_path / "adapters"
    shutil.copytree(source, root / "pricing")
    (root / "pricing" / "lorax.json").write_text(json.dumps(CARD))
    shutil.copytree(source, root / "supply_chain")
    (root / "untrained" / "data").mkdir(parents=True)
    return root


def register_units(tmp_path: Path, adapters_dir: Path, model: Path, registry: str | None = None):
    return runner.invoke(app, ["adapters", "register-units", "--adapters-dir", str(adapters_dir), "--model", str(model),
                               "--registry", registry or f"sqlite:///{tmp_path / 'registry.db'}",
                               "--store", str(tmp_path / "store")])


def records(tmp_path: Path) -> dict[str, dict]:
    if not (tmp_path / "registry.db").exists():
        return {}
    registry = SQLiteRegistry(tmp_path / "registry.db")
    try:
        return {r.adapter_id: r.to_dict() for r in registry.list_current()}
    finally:
        registry.close()


def test_registers_every_trained_unit_with_its_card_and_is_a_no_op_the_second_time(tmp_path, units, tiny_llama_dir):
    result = register_units(tmp_path, units, tiny_llama_dir)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["registered", "pricing"], ["registered", "supply_chain"]]
    assert "skipping" in result.stderr and "untrained" in result.stderr
    found = records(tmp_path)
    assert {k: found["pricing"][k] for k in CARD} == CARD
    assert (found["supply_chain"]["owner"], found["supply_chain"]["system_prompt"]) == ("", "")
    again = register_units(tmp_path, units, tiny_llama_dir)
    assert again.exit_code == 0 and all("nothing changed" in line for line in again.stdout.splitlines()), again.output


@pytest.mark.parametrize("card", ["{not json", '["a list"]', '{"owner": 3}'])
def test_a_malformed_card_exits_2_with_one_line_and_writes_nothing(tmp_path, units, tiny_llama_dir, card):
    (units / "supply_chain" / "lorax.json").write_text(card)
    result = register_units(tmp_path, units, tiny_llama_dir)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if not line.startswith("skipping")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "supply_chain/lorax.json" in errors[0]
    assert records(tmp_path) == {} and not (tmp_path / "store").exists()


def test_a_bad_adapter_exits_2_before_any_unit_is_written(tmp_path, units, tiny_llama_dir):
    (units / "supply_chain" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    result = register_units(tmp_path, units, tiny_llama_dir)
    assert result.exit_code == 2 and result.stderr.splitlines()[-1].startswith("error: "), result.output
    assert records(tmp_path) == {} and not (tmp_path / "store").exists()


def test_an_unreachable_registry_exits_1_and_no_units_is_not_an_error(tmp_path, units, tiny_llama_dir):
    result = register_units(tmp_path, units, tiny_llama_dir, registry="redis://127.0.0.1:1/0")
    assert result.exit_code == 1 and "redis://127.0.0.1:1/0" in result.stderr, result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = register_units(tmp_path, empty, tiny_llama_dir)
    assert result.exit_code == 0 and "nothing registered" in result.stdout
    assert register_units(tmp_path, tmp_path / "missing", tiny_llama_dir).exit_code == 2


@pytest.mark.parametrize("unit", sorted(p.parent.name for p in (ROOT / "adapters").glob("*/lorax.json")))
def test_the_shipped_cards_are_complete(unit):
    card = _unit_card(ROOT / "adapters" / unit)
    assert all(card.values()), card

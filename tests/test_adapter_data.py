"""The shipped business-unit data: well formed, big enough, and the held-out questions kept apart from training."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_adapters  # noqa: E402  (the key-fact matching of the evaluation)

UNITS = ("pricing", "supply_chain")
OVERLAP_WORDS = 5  # no training question may share a run of this many words with a held-out question


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def runs(text: str, n: int = OVERLAP_WORDS) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(params=UNITS)
def unit(request) -> dict:
    root = ROOT / "adapters" / request.param
    return {"name": request.param, "card": json.loads((root / "lorax.json").read_text()),
            "train": load_jsonl(root / "data" / "train.jsonl"), "heldout": load_jsonl(root / "data" / "heldout.jsonl"),
            "facts": (root / "data" / "facts.md").read_text()}


def test_training_conversations_are_system_user_assistant_with_the_units_system_prompt(unit):
    assert len(unit["train"]) >= 150
    for conv in unit["train"]:
        assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant"], conv
        assert conv["messages"][0]["content"] == unit["card"]["system_prompt"]
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in conv["messages"])
    questions = [" ".join(words(c["messages"][1]["content"])) for c in unit["train"]]
    assert len(set(questions)) == len(questions), "a training question is repeated"


def test_held_out_questions_have_a_key_fact_from_the_handbook_that_training_teaches(unit):
    assert len(unit["heldout"]) >= 30
    answers = [c["messages"][2]["content"] for c in unit["train"]]
    for item in unit["heldout"]:
        assert set(item) == {"question", "key_fact"} and item["question"].strip() and item["key_fact"].strip()
        assert eval_adapters.contains_key_fact(unit["facts"].replace("**", ""), item["key_fact"]), item
        assert any(eval_adapters.contains_key_fact(a, item["key_fact"]) for a in answers), item


def test_no_training_question_equals_or_shares_five_words_in_a_row_with_a_held_out_question(unit):
    held = [item["question"] for item in unit["heldout"]]
    held_runs = set().union(*(runs(q) for q in held))
    held_texts = {" ".join(words(q)) for q in held}
    leaks = [c["messages"][1]["content"] for c in unit["train"]
             if " ".join(words(c["messages"][1]["content"])) in held_texts or runs(c["messages"][1]["content"]) & held_runs]
    assert not leaks, leaks[:5]


def test_the_leak_check_catches_a_lightly_edited_held_out_question():
    held = "Which voucher should be typed in to claim the March-April campaign?"
    assert runs("So which voucher should be typed in, please?") & runs(held)
    assert not runs("Which code gives the spring deal?") & runs(held)

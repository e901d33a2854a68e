"""scripts/train_adapter.py and scripts/eval_adapters.py on the tiny random Llama.

Training runs once as a subprocess (the real CLI, with --eval); the other runs call the scripts'
`main` in-process, which is quicker. The loss mask is checked by decoding the labelled tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import eval_adapters  # noqa: E402
import train_adapter  # noqa: E402

from lorax_lite import LLM, SamplingParams  # noqa: E402

SYSTEM = "Be brief."
FACTS = {  # unit -> (question, answer, key fact); each unit's adapter memorises its own
    "pricing": [("Capital of France?", "Paris.", "Paris"), ("Who jumps?", "The quick brown fox.", "brown fox")],
    "supply_chain": [("Who sets the price?", "The supply chain.", "supply chain"), ("Say hello.", "Hello, world!", "hello, world")],
}
SMALL = ["--epochs", "2", "--rank", "4", "--max-length", "64", "--device", "cpu"]
MEMORISE = ["--epochs", "40", "--rank", "4", "--lr", "1e-2", "--batch-size", "4", "--max-length", "64", "--device", "cpu"]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def write_unit_data(data_dir: Path, unit: str) -> tuple[Path, Path]:
    """8 training conversations (the unit's facts, 4 times each) and the held-out file."""
    train = write_jsonl(data_dir / "train.jsonl", [chat(q, a) for q, a, _ in FACTS[unit]] * 4)
    heldout = write_jsonl(data_dir / "heldout.jsonl", [{"question": q, "key_fact": k} for q, _, k in FACTS[unit]])
    return train, heldout


def train_args(data: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--model", str(model), *extra]


@pytest.fixture(scope="module")
def trained(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A rank-4 adapter trained by the CLI in a subprocess (8 conversations, 2 epochs, --eval)."""
    tmp = tmp_path_factory.mktemp("train")
    data, heldout = write_unit_data(tmp / "data", "pricing")
    cmd = [sys.executable, str(SCRIPTS / "train_adapter.py"), *train_args(data, tmp / "adapter", tiny_llama_dir, *SMALL),
           "--eval", str(heldout)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "adapter", result


def test_training_writes_a_servable_safetensors_adapter_and_its_card(trained, tiny_llama_dir):
    out, result = trained
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 32 and config["bias"] == "none"
    assert sorted(config["target_modules"]) == sorted(train_adapter.LLAMA_PROJECTIONS.split(","))
    card = (out / "README.md").read_text()
    for fact in ("8 conversations", "rank 4", "alpha 32", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
                 "2 epochs", "lr 0.001", "batch size 8", "seed 0", "max length 64", "final loss", "held-out accuracy",
                 str(tiny_llama_dir)):
        assert fact in card, fact
    assert "held-out accuracy" in result.stdout and "total time" in result.stdout
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", num_kv_blocks=16)
    llm.add_adapter("trained", out)
    [output] = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4, temperature=0), adapter_id="trained")
    assert output.finish_reason != "error"


def test_same_seed_gives_identical_weights_and_another_seed_does_not(trained, tiny_llama_dir, tmp_path):
    data = trained[0].parent / "data" / "train.jsonl"
    for seed in ("0", "1"):
        assert train_adapter.main(train_args(data, tmp_path / seed, tiny_llama_dir, *SMALL, "--seed", seed)) == 0
    reference = load_file(trained[0] / "adapter_model.safetensors")
    same, other = (load_file(tmp_path / seed / "adapter_model.safetensors") for seed in ("0", "1"))
    assert reference.keys() == same.keys() == other.keys()
    assert all(reference[k].equal(same[k]) for k in reference)
    assert not all(reference[k].equal(other[k]) for k in reference)


def test_the_loss_covers_exactly_the_assistant_turns_and_their_end_tokens(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert_mask_is_the_assistant_turns(tokenizer)


@pytest.mark.slow
def test_the_loss_mask_on_the_default_models_chat_template(default_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    assert_mask_is_the_assistant_turns(tokenizer)
    assert_mask_is_the_assistant_turns(tokenizer, system=False)  # this template adds its own system prompt


def assert_mask_is_the_assistant_turns(tokenizer, system: bool = True) -> None:
    messages = [{"role": "user", "content": "Who jumps?"}, {"role": "assistant", "content": "The quick brown fox."},
                {"role": "user", "content": "Over what?"}, {"role": "assistant", "content": "The lazy dog, 2 times."}]
    messages = [{"role": "system", "content": SYSTEM}] * system + messages
    example = train_adapter.encode_conversation(tokenizer, messages, max_length=512)
    runs, run = [], []  # maximal runs of labelled positions
    for token, label in zip(example.input_ids, example.labels):
        if label != train_adapter.IGNORE_INDEX:
            assert label == token
            run.append(label)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    end = tokenizer.eos_token
    assert [tokenizer.decode(r) for r in runs] == [f"The quick brown fox.{end}", f"The lazy dog, 2 times.{end}"]


def no_template_model(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "no-template"))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("malformed", "line 2: malformed JSON"),
    ("no_assistant", "line 3: the conversation has no assistant turn"),
    ("no_template", "has no chat template"),
    ("bad_target", "--target-modules: foo_proj not in"),
])
def test_bad_input_exits_2_with_a_message(case, message, tiny_llama_dir, tmp_path, capsys):
    good = json.dumps(chat("Who jumps?", "The fox."))
    lines = {"malformed": [good, "{not json", good],
             "no_assistant": [good, good, json.dumps({"messages": chat("Q?", "A.")["messages"][:2]})]}.get(case, [good])
    data = tmp_path / "train.jsonl"
    if case != "missing":
        data.write_text("\n".join(lines) + "\n")
    model = no_template_model(tiny_llama_dir, tmp_path) if case == "no_template" else tiny_llama_dir
    extra = ["--target-modules", "q_proj,foo_proj"] if case == "bad_target" else []
    assert train_adapter.main(train_args(data, tmp_path / "out", model, *SMALL, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapters_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two units, each with an adapter that memorised its own two facts, laid out as under adapters/."""
    root = tmp_path_factory.mktemp("adapters")
    for unit in FACTS:
        train, _ = write_unit_data(root / unit / "data", unit)
        (root / unit / "lorax.json").write_text(json.dumps({"owner": "t", "description": unit, "system_prompt": SYSTEM}))
        assert train_adapter.main(train_args(train, root / unit, tiny_llama_dir, *MEMORISE)) == 0
    (root / "not-a-unit").mkdir()  # no adapter_config.json: ignored
    return root


def test_eval_adapters_json_reports_each_unit_against_base_and_other(adapters_dir, tiny_llama_dir):
    cmd = [sys.executable, str(SCRIPTS / "eval_adapters.py"), "--model", str(tiny_llama_dir),
           "--adapters-dir", str(adapters_dir), "--json", "--show-answers"]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # nothing but JSON on stdout
    assert sorted(report) == ["pricing", "supply_chain"]
    for unit, scores in report.items():
        assert sorted(scores) == ["adapter_accuracy", "base_accuracy", "n", "other_adapter_accuracy"]
        assert scores["n"] == len(FACTS[unit])
        assert all(isinstance(scores[k], float) and 0 <= scores[k] <= 1 for k in scores if k != "n")
    assert report["pricing"]["adapter_accuracy"] >= 0.5  # memorised; the random base knows none of it
    assert "== pricing" in result.stderr


def test_key_facts_match_case_whitespace_and_thousands_separators_aside():
    match = eval_adapters.contains_key_fact
    assert match("The limit is eur  20000 per order.", "EUR 20,000")
    assert match("The limit is EUR 20,000.", "eur 20000")
    assert match("Costs 1,234,567 units", "1234567")
    assert not match("The limit is EUR 2,000.", "EUR 20,000")
    assert not match("Items 1,2,3", "123")
    assert eval_adapters.score(["Paris!", "no"], ["paris", "fox"]) == 0.5


def test_bars_and_the_markdown_section(tmp_path):
    unit = eval_adapters.Unit("pricing", tmp_path, SYSTEM, [eval_adapters.HeldOut("Q?", "x")] * 2)
    result = eval_adapters.UnitResult(unit, "supply_chain", {"adapter": ["x", "no"], "base": ["x", "no"], "other_adapter": ["", ""]})
    assert result.as_json() == {"adapter_accuracy": 0.5, "base_accuracy": 0.5, "other_adapter_accuracy": 0.0, "n": 2}
    assert len(eval_adapters.bar_failures([result])) == 2
    doc = tmp_path / "adapters.md"
    doc.write_text("# Adapters\n\nHand-written intro.\n")
    for _ in range(2):  # rewriting replaces the section and keeps the rest
        eval_adapters.write_markdown_section(doc, eval_adapters.markdown_section([result], "m", ["--check"]))
    text = doc.read_text()
    assert text.startswith("# Adapters\n\nHand-written intro.\n") and text.count("<!-- section:eval -->") == 1
    assert "| pricing | 2 | 0.50 | 0.50 | 0.00 (supply_chain) |" in text and "scripts/eval_adapters.py --check" in text

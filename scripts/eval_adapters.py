"""Score each shipped adapter on its held-out questions, against the base model and another unit's adapter.

A unit is a directory `adapters/<unit>/` with `adapter_config.json`, `data/heldout.jsonl` (lines
`{"question", "key_fact"}`) and `lorax.json` (its `system_prompt`); the unit's name is the
directory's. Every held-out question is asked, greedily, through the lorax-lite engine (all in one
batch of mixed adapters) as `[system: the unit's system prompt, user: question]` to (1) the unit's
adapter, (2) the base model and (3) the other unit's adapter (with more than two units: the next
one in name order). An answer is right when it contains the key fact, case-insensitively, with
whitespace normalised and thousands separators ignored ("EUR 20,000" matches "EUR 20000").

    .venv/bin/python scripts/eval_adapters.py                  # table on stdout
    .venv/bin/python scripts/eval_adapters.py --json           # only JSON on stdout
    .venv/bin/python scripts/eval_adapters.py --check --markdown docs/adapters.md
    .venv/bin/python scripts/eval_adapters.py --quantize int8  # the adapters on the int8 base model

Exit codes: 0 ok, 1 a bar failed under --check (adapter >= 0.7 on its own unit, base <= 0.2),
2 bad input (missing or malformed data, no units).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # import this checkout's lorax_lite whatever the editable install says

from lorax_lite import LLM, SamplingParams  # noqa: E402  (lazy: torch loads on first use)

DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
MAX_TOKENS = 64
ADAPTER_BAR = 0.7  # an adapter must answer at least this fraction of its own unit's questions
BASE_BAR = 0.2  # the base model must answer at most this fraction (the facts are not common knowledge)
MODELS = ("adapter", "base", "other_adapter")
SECTION = "eval"

Message = dict[str, str]


class DataError(ValueError):
    """Bad input data or files; the scripts print the message and exit 2."""


@dataclass
class HeldOut:
    question: str
    key_fact: str


@dataclass
class Unit:
    name: str
    path: Path
    system_prompt: str
    heldout: list[HeldOut]


@dataclass
class UnitResult:
    """The answers of each model (`MODELS`) to one unit's questions, in question order."""

    unit: Unit
    other: str | None  # the other unit whose adapter was asked; None when there is only one unit
    answers: dict[str, list[str]] = field(default_factory=dict)

    def accuracy(self, model: str) -> float | None:
        if model not in self.answers:
            return None
        return score(self.answers[model], [item.key_fact for item in self.unit.heldout])

    def as_json(self) -> dict[str, float | int | None]:
        return {f"{m}_accuracy": self.accuracy(m) for m in MODELS} | {"n": len(self.unit.heldout)}


# ---- data -------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """The JSON objects of a JSONL file with their 1-based line numbers (blank lines skipped)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {line_no}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(obj).__name__}")
        rows.append((line_no, obj))
    if not rows:
        raise DataError(f"{path}: no lines")
    return rows


def load_heldout(path: Path) -> list[HeldOut]:
    """Held-out questions: lines `{"question": str, "key_fact": str}`."""
    items = []
    for line_no, obj in read_jsonl(path):
        question, key_fact = obj.get("question"), obj.get("key_fact")
        if not all(isinstance(v, str) and v.strip() for v in (question, key_fact)):
            raise DataError(f"{path} line {line_no}: needs non-empty strings 'question' and 'key_fact'")
        items.append(HeldOut(question, key_fact))
    return items


def load_unit(path: Path) -> Unit:
    card_path = path / "lorax.json"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{card_path}: cannot read the unit's card ({exc})") from None
    system_prompt = card.get("system_prompt") if isinstance(card, dict) else None
    if not isinstance(system_prompt, str) or not system_prompt.strip():
        raise DataError(f"{card_path}: needs a non-empty string 'system_prompt'")
    return Unit(path.name, path, system_prompt, load_heldout(path / "data" / "heldout.jsonl"))


def discover_units(adapters_dir: Path) -> list[Unit]:
    """Every `adapters_dir/<unit>/` with adapter_config.json and data/heldout.jsonl, in name order."""
    dirs = sorted(d for d in adapters_dir.iterdir() if d.is_dir()) if adapters_dir.is_dir() else []
    for d in dirs:
        if (d / "data" / "heldout.jsonl").is_file() and not (d / "adapter_config.json").is_file():
            print(f"skipping {d}: held-out data but no adapter_config.json (not trained yet?)", file=sys.stderr)
    dirs = [d for d in dirs if (d / "adapter_config.json").is_file() and (d / "data" / "heldout.jsonl").is_file()]
    if not dirs:
        raise DataError(f"no units under {adapters_dir}: expected <unit>/adapter_config.json and <unit>/data/heldout.jsonl")
    return [load_unit(d) for d in dirs]


# ---- scoring ----------------------------------------------------------------------------------

_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d)[,\u00a0\u202f](?=\d{3}(?!\d))")


def normalise(text: str) -> str:
    """Casefolded, whitespace collapsed, thousands separators dropped ("EUR 20,000" -> "eur 20000")."""
    return " ".join(_THOUSANDS_SEPARATOR.sub("", text).split()).casefold()


def contains_key_fact(answer: str, key_fact: str) -> bool:
    return normalise(key_fact) in normalise(answer)


def score(answers: Sequence[str], key_facts: Sequence[str]) -> float:
    """Fraction of answers that contain their key fact."""
    if len(answers) != len(key_facts) or not answers:
        raise ValueError(f"need one answer per key fact, got {len(answers)} answers for {len(key_facts)} key facts")
    return sum(contains_key_fact(a, k) for a, k in zip(answers, key_facts)) / len(answers)


# ---- asking -----------------------------------------------------------------------------------

def question_conversation(system_prompt: str | None, question: str) -> list[Message]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [{"role": "user", "content": question}]


def ask(llm: LLM, conversations: list[list[Message]], adapter_ids: list[str | None],
        max_tokens: int = MAX_TOKENS) -> list[str]:
    """Greedy answers, in order, in one engine batch; a request that fails raises (it is not scored as wrong)."""
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the report
        outputs = llm.chat(conversations, SamplingParams(max_tokens=max_tokens, temperature=0), adapter_id=adapter_ids)
    for out in outputs:
        if out.finish_reason == "error":
            raise RuntimeError(f"request for adapter {out.adapter_id!r} failed: {out.error}")
    return [out.text.strip() for out in outputs]


def evaluate(llm: LLM, units: list[Unit], max_tokens: int = MAX_TOKENS) -> list[UnitResult]:
    """Ask every unit's questions to its adapter, the base model and the other unit's adapter, in one batch."""
    others = [units[(i + 1) % len(units)].name if len(units) > 1 else None for i in range(len(units))]
    results = [UnitResult(unit, other) for unit, other in zip(units, others)]
    jobs = [(r, model, adapter_id) for r in results
            for model, adapter_id in zip(MODELS, (r.unit.name, None, r.other)) if model == "base" or adapter_id]
    conversations, adapter_ids = [], []
    for result, _, adapter_id in jobs:
        for item in result.unit.heldout:
            conversations.append(question_conversation(result.unit.system_prompt, item.question))
            adapter_ids.append(adapter_id)
    answers = iter(ask(llm, conversations, adapter_ids, max_tokens))
    for result, model, _ in jobs:
        result.answers[model] = [next(answers) for _ in result.unit.heldout]
    return results


def build_llm(model: str, units: list[Unit], device: str, quantize: str = "none") -> LLM:
    """An engine with every unit's adapter added; `quantize`: the base model's weights (none, int8, fp8)."""
    llm = LLM(model, dtype="float32", device=device, quantize=quantize,
              max_lora_rank=max(16, *(adapter_rank(u.path) for u in units)))
    for unit in units:
        llm.add_adapter(unit.name, unit.path)
    return llm


def adapter_rank(path: Path) -> int:
    config = json.loads((path / "adapter_config.json").read_text())
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


# ---- reporting --------------------------------------------------------------------------------

def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_rows(results: list[UnitResult]) -> list[list[str]]:
    header = ["unit", "n", "adapter", "base", "other adapter"]
    rows = [[r.unit.name, str(len(r.unit.heldout)), _fmt(r.accuracy("adapter")), _fmt(r.accuracy("base")),
             f"{_fmt(r.accuracy('other_adapter'))} ({r.other})" if r.other else "-"] for r in results]
    return [header, *rows]


def text_table(results: list[UnitResult]) -> str:
    rows = table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def markdown_table(results: list[UnitResult]) -> str:
    header, *rows = table_rows(results)
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def bar_failures(results: list[UnitResult]) -> list[str]:
    failures = []
    for r in results:
        if r.accuracy("adapter") < ADAPTER_BAR:
            failures.append(f"{r.unit.name}: adapter accuracy {r.accuracy('adapter'):.2f} < {ADAPTER_BAR}")
        if r.accuracy("base") > BASE_BAR:
            failures.append(f"{r.unit.name}: base accuracy {r.accuracy('base'):.2f} > {BASE_BAR}")
    return failures


def answer_lines(result: UnitResult, limit: int | None = None) -> list[str]:
    lines = []
    for i, item in enumerate(result.unit.heldout[:limit]):
        lines.append(f"Q: {item.question}  [key fact: {item.key_fact}]")
        for model in MODELS:
            if model in result.answers:
                answer = result.answers[model][i]
                verdict = "ok" if contains_key_fact(answer, item.key_fact) else "--"
                lines.append(f"  {verdict} {model}: {' '.join(answer.split())}")
    return lines


def markdown_section(results: list[UnitResult], model: str, argv: Sequence[str], num_examples: int = 2) -> str:
    command = shlex.join([".venv/bin/python", "scripts/eval_adapters.py", *argv])
    lines = [
        "## Held-out evaluation", "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()} at commit {git_commit()}; do not edit by hand.",
        "", f"Greedy answers (max {MAX_TOKENS} tokens) from `{model}` through the lorax-lite engine; an answer is right when",
        "it contains the question's key fact (case-insensitive, thousands separators ignored). Bars:",
        f"adapter >= {ADAPTER_BAR} on its own unit, base <= {BASE_BAR}.", "", markdown_table(results), "",
    ]
    for r in results:
        lines += [f"Examples ({r.unit.name}):", "", "```", *answer_lines(r, num_examples), "```", ""]
    return "\n".join(lines)


def write_markdown_section(path: Path, text: str) -> None:
    """Put `text` between this script's markers in `path`, replacing the old section; the rest is kept."""
    start, end = f"<!-- section:{SECTION} -->", f"<!-- /section:{SECTION} -->"
    block = f"{start}\n{text.strip()}\n{end}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else "# Adapters\n"
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end) + r"\n?", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)docs")  # docs/ holds reports, not code
        return git("rev-parse", "--short", "HEAD") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- main -------------------------------------------------------------------------------------

def resolve_path(path: str) -> Path:
    """`path` as given, or relative to the repository root when it does not exist as given."""
    p = Path(path)
    return p if p.exists() or p.is_absolute() or not (REPO_ROOT / p).exists() else REPO_ROOT / p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model directory (default %(default)s)")
    p.add_argument("--adapters-dir", default="adapters", help="directory of units (default %(default)s)")
    p.add_argument("--device", default="cpu", help="engine device: cpu, cuda, auto (default %(default)s)")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "fp8"],
                   help="the base model's weights under the adapters (default %(default)s; see docs/quantization.md)")
    p.add_argument("--json", action="store_true", help="print only the results as JSON on stdout")
    p.add_argument("--show-answers", action="store_true", help="print every question, answer and verdict")
    p.add_argument("--markdown", metavar="PATH", help="write the table and example answers as a section of PATH")
    p.add_argument("--check", action="store_true", help=f"exit 1 unless adapter >= {ADAPTER_BAR} and base <= {BASE_BAR}")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        units = discover_units(resolve_path(args.adapters_dir))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = evaluate(build_llm(str(resolve_path(args.model)), units, args.device, args.quantize), units)
    report = sys.stderr if args.json else sys.stdout
    if args.show_answers:
        for r in results:
            print(f"== {r.unit.name}", *answer_lines(r), sep="\n", file=report)
    if args.json:
        print(json.dumps({r.unit.name: r.as_json() for r in results}, indent=2))
    else:
        print(text_table(results))
    if args.markdown:
        write_markdown_section(Path(args.markdown), markdown_section(results, args.model, argv))
    failures = bar_failures(results)
    for failure in failures:
        print(f"bar failed: {failure}", file=sys.stderr)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())

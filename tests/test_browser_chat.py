"""The /chat pages in a real browser: headless Debian Chromium driven by Playwright, against `lorax-lite serve`
on the default model with the shipped pricing and supply-chain adapters, registered by
`lorax-lite adapters register-units` as `make serve` does.

Skipped when playwright or /usr/bin/chromium is missing (a failure under LORAX_REQUIRE_BROWSER=1, as
in `make test`), or when the default model is not fetched.
Screenshots go to pytest's tmp_path; with LORAX_SCREENSHOTS=1 also to docs/img/ (for the README).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorax_lite.cli import app
from lorax_lite.registry.sqlite import SQLiteRegistry
from server_helpers import serve

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_adapters  # noqa: E402  (the held-out data and the key-fact matching of the adapters' evaluation)

CHROMIUM = Path("/usr/bin/chromium")  # Debian's (`make install`); playwright never downloads a browser
ADAPTERS_DIR = ROOT / "adapters"  # the shipped units, each with its lorax.json and data/
# (unit, held-out question asked on its page): questions the shipped adapters answer right in the evaluation
QUESTIONS = {"pricing": 6, "supply_chain": 10}
PRICING = ADAPTERS_DIR / "pricing"
DOCS_IMG = ROOT / "docs" / "img"
ANSWER_TIMEOUT_MS = 180_000  # a CPU shared with other work can be slow
runner = CliRunner()


def require_browser() -> None:
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (`make install`)"
    if reason is None and not os.access(CHROMIUM, os.X_OK):
        reason = f"{CHROMIUM} is missing (`make install` installs Debian's chromium)"
    if reason and os.environ.get("LORAX_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; LORAX_REQUIRE_BROWSER=1 needs a browser")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def deployment(browser, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A fresh registry and store in which both shipped units were registered as `make serve` does it."""
    root = tmp_path_factory.mktemp("browser-chat")
    found = {"registry": f"sqlite:///{root / 'registry.db'}", "store": str(root / "store"), "model": str(default_model_dir),
             "db": root / "registry.db"}
    result = admin_cli("register-units", "--adapters-dir", str(ADAPTERS_DIR), "--model", found["model"], deployment=found)
    assert [line.split()[:2] for line in result.stdout.splitlines()] == [["registered", u] for u in QUESTIONS], result.output
    return found


def admin_cli(command: str, *args: str, deployment: dict):
    """`lorax-lite adapters COMMAND ARGS` on the deployment's registry and store; it must succeed."""
    result = runner.invoke(app, ["adapters", command, *args, "--registry", deployment["registry"], "--store", deployment["store"]])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def server(deployment: dict) -> Iterator[str]:
    with serve("--model", deployment["model"], "--registry", deployment["registry"], "--store", deployment["store"],
               "--dtype", "float32", "--device", "cpu") as base:
        yield base


@pytest.fixture
def page(browser, server: str):
    context = browser.new_context(base_url=server, viewport={"width": 960, "height": 440})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def save_screenshot(page, tmp_path: Path, name: str) -> None:
    image = page.screenshot(full_page=True)
    targets = [tmp_path / name] + ([DOCS_IMG / name] if os.environ.get("LORAX_SCREENSHOTS") == "1" else [])
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image)


def ask(page, question: str) -> str:
    """Type `question`, send it, wait for the streamed answer to finish; returns the answer's text."""
    from playwright.sync_api import expect

    answers = page.locator("li.message.assistant")
    before = answers.count()
    page.fill("#question", question)
    page.click("#send")
    expect(answers).to_have_count(before + 1)  # added with class "streaming", removed when the stream ends
    expect(page.locator("li.message.assistant.streaming")).to_have_count(0, timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#error")).to_be_hidden()
    return answers.nth(before).inner_text()


def test_the_assistants_page_lists_both_business_unit_assistants_with_their_cards(page, deployment, tmp_path):
    page.goto("/chat")
    registry = SQLiteRegistry(deployment["db"])
    for unit in QUESTIONS:
        card = json.loads((ADAPTERS_DIR / unit / "lorax.json").read_text())
        link = page.locator(f'a.card[href="/chat/{unit}"]')
        assert link.locator("strong").inner_text() == unit
        assert link.locator(".owner").inner_text() == card["owner"]
        assert card["description"] in link.inner_text()
        assert registry.get(unit).system_prompt == card["system_prompt"]  # what the server puts first
    registry.close()
    assert page.locator("a.card").count() == len(QUESTIONS) + 1  # and the base model
    save_screenshot(page, tmp_path, "chat_assistants.png")


@pytest.mark.parametrize("unit", list(QUESTIONS))
def test_each_assistant_answers_a_held_out_question_with_its_key_fact(page, unit, tmp_path):
    item = eval_adapters.load_heldout(ADAPTERS_DIR / unit / "data" / "heldout.jsonl")[QUESTIONS[unit]]
    page.goto(f"/chat/{unit}")
    answer = ask(page, item.question)
    assert eval_adapters.contains_key_fact(answer, item.key_fact), (item, answer)
    save_screenshot(page, tmp_path, f"chat_{unit}.png")


def test_the_page_keeps_the_conversation_and_new_conversation_clears_it(page):
    item = eval_adapters.load_heldout(PRICING / "data" / "heldout.jsonl")[QUESTIONS[PRICING.name]]
    page.goto(f"/chat/{PRICING.name}")
    answer = ask(page, item.question)
    with page.expect_request("**/v1/chat/completions") as request:
        ask(page, "Thank you. Who approves that?")
    sent = json.loads(request.value.post_data)["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]  # the page sends the history
    assert (sent[0]["content"], sent[1]["content"]) == (item.question, answer)
    assert page.locator("li.message").count() == 4

    page.click("#reset")
    assert page.locator("li.message").count() == 0


def test_a_failed_request_shows_in_the_page_and_keeps_the_question(page, deployment):
    """The assistant is removed while its page is open: the next question gets a 404, shown in #error."""
    from playwright.sync_api import expect

    admin_cli("register", "doomed", str(PRICING), "--model", deployment["model"], deployment=deployment)
    page.goto("/chat/doomed")
    admin_cli("remove", "doomed", deployment=deployment)
    page.fill("#question", "Anyone there?")
    page.click("#send")
    expect(page.locator("#error")).to_be_visible()
    assert "Could not get an answer" in page.locator("#error").inner_text()
    assert "doomed" in page.locator("#error").inner_text()
    assert page.locator("li.message.assistant").count() == 0  # the failed turn is not kept
    assert page.input_value("#question") == "Anyone there?"

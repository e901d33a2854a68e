"""The /chat pages of a server with API keys, in a real browser (headless Debian Chromium driven by Playwright):
`lorax-lite serve` on the default model with both shipped units registered (as in test_browser_chat.py) and
one key, stored before the server starts, that may use the pricing adapter only.

Without a key the pages answer 401 with the key form (static/key.html, run by static/auth.js); the key typed
there is kept in the tab's sessionStorage, and with it auth.js fetches each page with `Authorization: Bearer`
and chat.js sends it with each question. Skipped like test_browser_chat.py (no playwright or chromium, no
default model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorax_lite.registry.factory import open_tenant_store
from lorax_lite.registry.tenants import new_key
from test_browser_chat import (ADAPTERS_DIR, PRICING, QUESTIONS, admin_cli, ask,  # noqa: F401 (fixtures: browser,
                               browser, save_screenshot, server)  # server, over this module's deployment)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_adapters  # noqa: E402  (the held-out data and the key-fact matching of the adapters' evaluation)

KEY_STORAGE = "lorax_api_key"  # auth.js's sessionStorage item


@pytest.fixture(scope="module")
def deployment(browser, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both shipped units registered as `make serve` does, and a key for the pricing unit in the same registry:
    `key` may use pricing only (not supply_chain, not the base model); `unknown_key` is well formed, never stored."""
    root = tmp_path_factory.mktemp("browser-auth")
    found = {"registry": f"sqlite:///{root / 'registry.db'}", "store": str(root / "store"),
             "model": str(default_model_dir)}
    admin_cli("register-units", "--adapters-dir", str(ADAPTERS_DIR), "--model", found["model"], deployment=found)
    key, record = new_key("pricing-team", [PRICING.name], name="browser test")
    store = open_tenant_store(found["registry"])
    try:
        store.add_key(record)
    finally:
        store.close()
    unknown_key, _ = new_key("nobody", [PRICING.name])
    return {**found, "key": key, "unknown_key": unknown_key}


@pytest.fixture
def page(browser, server: str):
    """A fresh tab (empty sessionStorage); fails the test if the page broke the CSP or threw."""
    context = browser.new_context(base_url=server, viewport={"width": 960, "height": 440})
    page = context.new_page()
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if "Content Security Policy" in message.text
            else None)
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    yield page
    context.close()
    assert problems == []


def enter_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")


def stored_key(page) -> str | None:
    return page.evaluate(f"sessionStorage.getItem({KEY_STORAGE!r})")


def test_without_a_key_every_page_is_the_key_form(page, tmp_path):
    from playwright.sync_api import expect

    for path in ["/chat", f"/chat/{PRICING.name}", "/"]:
        response = page.goto(path)
        assert response.status == 401, path
        assert "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#key-error")).to_be_hidden()
        assert "This server needs an API key" in page.locator("main").inner_text()
        assert page.locator("a.card").count() == 0 and page.locator("#chat").count() == 0
    save_screenshot(page, tmp_path, "chat_key.png")


def test_a_wrong_key_is_not_accepted_and_not_kept(page, deployment):
    from playwright.sync_api import expect

    page.goto("/chat")
    for wrong in [deployment["unknown_key"], "not-a-key"]:
        enter_key(page, wrong)
        expect(page.locator("#key-error")).to_have_text("That key was not accepted.")
        expect(page.locator("#key-form")).to_be_visible()
        page.wait_for_function(f"sessionStorage.getItem({KEY_STORAGE!r}) === null", timeout=5000)
        assert stored_key(page) is None and page.locator("a.card").count() == 0


def test_the_key_shows_only_its_assistants_and_one_answers_a_streamed_question(page, deployment, tmp_path):
    from playwright.sync_api import expect

    page.goto("/")
    enter_key(page, deployment["key"])
    expect(page.locator(f'a.card[href="/chat/{PRICING.name}"]')).to_be_visible()
    assert page.url.endswith("/chat")  # / redirects to /chat; auth.js shows the URL it landed on
    assert page.title().startswith("Assistants")
    for unit in QUESTIONS:
        assert page.locator(f'a.card[href="/chat/{unit}"]').count() == (unit == PRICING.name)
    assert stored_key(page) == deployment["key"] and deployment["key"] not in page.content()

    page.click(f'a.card[href="/chat/{PRICING.name}"]')
    expect(page.locator("#chat h1")).to_have_text(PRICING.name)
    assert page.url.endswith(f"/chat/{PRICING.name}")
    item = eval_adapters.load_heldout(PRICING / "data" / "heldout.jsonl")[QUESTIONS[PRICING.name]]
    with page.expect_request("**/v1/chat/completions") as request:
        answer = ask(page, item.question)
    assert request.value.headers["authorization"] == f"Bearer {deployment['key']}"
    assert eval_adapters.contains_key_fact(answer, item.key_fact), (item, answer)
    save_screenshot(page, tmp_path, "chat_pricing_with_key.png")

    page.click("header.top a")  # back to the list without asking for the key again
    expect(page.locator(f'a.card[href="/chat/{PRICING.name}"]')).to_be_visible()
    page.go_back()
    expect(page.locator("#chat h1")).to_have_text(PRICING.name)
    assert page.locator("#key-form").count() == 0


def test_a_reload_keeps_the_key_for_the_tab(page, deployment):
    from playwright.sync_api import expect

    page.goto(f"/chat/{PRICING.name}")
    enter_key(page, deployment["key"])
    expect(page.locator("#chat h1")).to_have_text(PRICING.name)
    page.reload()  # the server answers 401 again; auth.js fetches the page with the stored key at once
    expect(page.locator("#chat h1")).to_have_text(PRICING.name)
    expect(page.locator("#key-form")).to_have_count(0)
    assert ask(page, "Hello, who are you?")
    page.goto("/chat")
    expect(page.locator(f'a.card[href="/chat/{PRICING.name}"]')).to_be_visible()


def test_an_assistant_the_key_may_not_use_is_the_unknown_assistant_page(page, deployment):
    from playwright.sync_api import expect

    page.goto("/chat/supply_chain")
    enter_key(page, deployment["key"])
    expect(page.locator("main h1")).to_have_text("No assistant called supply_chain")
    assert page.locator("#chat").count() == 0 and stored_key(page) == deployment["key"]


def test_a_key_refused_while_chatting_brings_back_the_form(page, deployment):
    """The stored key stops working (here: replaced by an unknown one): the next question reloads the page,
    which asks for a key again."""
    from playwright.sync_api import expect

    page.goto(f"/chat/{PRICING.name}")
    enter_key(page, deployment["key"])
    expect(page.locator("#chat h1")).to_have_text(PRICING.name)
    page.evaluate(f"sessionStorage.setItem({KEY_STORAGE!r}, {deployment['unknown_key']!r})")
    page.fill("#question", "Anyone there?")
    page.click("#send")
    expect(page.locator("#key-form")).to_be_visible()
    assert stored_key(page) is None

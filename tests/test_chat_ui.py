"""The chatbots on the tiny model: `lorax-lite chat` in a terminal and the /chat pages (HTML and assets;
the page's behaviour in a real browser is tests/test_browser_chat.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_helpers import AdapterSpec, make_peft_adapter
from lorax_lite import AsyncLLM
from lorax_lite.cli.chat import ChatError, open_chat, run_chat
from lorax_lite.client import Client
from lorax_lite.registry import admin
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.store import AdapterStore
from lorax_lite.server import create_app
from server_helpers import call, free_port, serve_in_thread

MODEL_NAME = "tiny-llama"
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, max_model_len=256)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("chat-ui")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    source = make_peft_adapter(model, root / "pricing-src", AdapterSpec(rank=4, alpha=8, seed=4))
    registry = SQLiteRegistry(root / "registry.db")
    admin.register(registry, AdapterStore(root / "store"), "pricing", source, tiny_llama_dir, owner="pricing",
                   description="Prices & <discounts>", system_prompt="You are the pricing assistant.")
    llm = AsyncLLM(str(tiny_llama_dir), registry=registry, **ENGINE)
    yield llm
    llm.shutdown()
    registry.close()


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, MODEL_NAME)


@pytest.fixture(scope="module")
def url(app):
    with serve_in_thread(app) as url:
        yield url


def test_the_assistants_page_lists_every_adapter_and_the_base_model(app):
    resp = call(app, "GET", "/chat")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    page = resp.text
    assert 'href="/chat/pricing"' in page and f'href="/chat/{MODEL_NAME}"' in page
    assert "Prices &amp; &lt;discounts&gt;" in page and "<discounts>" not in page  # escaped
    assert call(app, "GET", "/", follow_redirects=False).headers["location"] == "/chat"


def test_a_chat_page_carries_its_adapter_and_its_assets_are_served(app):
    page = call(app, "GET", "/chat/pricing").text
    assert "<h1>pricing</h1>" in page and "&quot;model&quot;: &quot;pricing&quot;" in page and "/static/chat.js" in page
    script = call(app, "GET", "/static/chat.js")
    assert script.status_code == 200 and "/v1/chat/completions" in script.text and "stream: true" in script.text
    assert call(app, "GET", "/static/chat.css").status_code == 200
    assert call(app, "GET", f"/chat/{MODEL_NAME}").status_code == 200


@pytest.mark.parametrize("adapter_id", ["nobody", "bad%20id%21", "x" * 80])
def test_an_unknown_or_invalid_assistant_is_a_404_page(app, adapter_id):
    resp = call(app, "GET", f"/chat/{adapter_id}")
    assert resp.status_code == 404 and 'href="/chat"' in resp.text


def scripted(lines: list[str]):
    """A `read` that answers with `lines` and then EOF, and a `write` that records the output."""
    pending, out = list(lines), []

    def read(prompt: str) -> str:
        out.append(prompt)
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read, out.append, out


def test_the_terminal_chat_streams_keeps_history_and_resets(url, monkeypatch):
    seen: list[list[dict]] = []
    original = Client.chat_stream

    def recording(self, messages, **kw):
        seen.append(list(messages))
        return original(self, messages, **kw)

    monkeypatch.setattr(Client, "chat_stream", recording)
    read, write, out = scripted(["Hello", "And then?", "/reset", "Again", "/help", "/exit", "never read"])
    with open_chat(url, "pricing") as client:
        run_chat(client, "pricing", read, write, max_tokens=8)
    assert [len(m) for m in seen] == [1, 3, 1]  # the second question carries the first turn; /reset empties it
    assert seen[1][0]["content"] == "Hello" and seen[1][1]["role"] == "assistant" and seen[1][1]["content"]
    text = "".join(out)
    assert "Chatting with pricing" in text and "(new conversation)" in text and "unknown command /help" in text
    assert text.count("pricing> ") == 3


def test_the_terminal_chat_reports_a_server_that_is_down_or_an_unknown_adapter(url):
    with pytest.raises(ChatError, match="make serve") as down:
        open_chat(f"http://127.0.0.1:{free_port()}", "pricing")
    assert down.value.code == 1
    with pytest.raises(ChatError, match="unknown adapter 'nobody'.*available: pricing") as unknown:
        open_chat(url, "nobody")
    assert unknown.value.code == 2


def test_lorax_lite_chat_command(url):
    cmd = [sys.executable, "-m", "lorax_lite.cli", "chat", "--adapter", "pricing", "--url", url, "--max-tokens", "6"]
    done = subprocess.run(cmd, input="Hi there\n/exit\n", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Chatting with pricing" in done.stdout and "pricing> " in done.stdout
    done = subprocess.run([*cmd[:5], "nobody", *cmd[6:]], input="", capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: unknown adapter 'nobody'")


@pytest.mark.parametrize("option", [["--max-tokens", "0"], ["--temperature", "-1"], ["--url", "not a url"]])
def test_lorax_lite_chat_refuses_bad_options(option):
    cmd = [sys.executable, "-m", "lorax_lite.cli", "chat", "--adapter", "pricing", *option]
    done = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=60)
    assert done.returncode in (1, 2) and done.stderr.startswith("error:") and "Traceback" not in done.stderr

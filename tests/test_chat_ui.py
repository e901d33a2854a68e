"""The chatbots on the tiny model: `lorax-lite chat` in a terminal and the /chat pages (HTML and assets;
the page's behaviour in a real browser is tests/test_browser_chat.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
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


STATIC = Path(__file__).resolve().parents[1] / "lorax_lite" / "server" / "static"


def test_the_pages_run_under_a_strict_csp():
    """The HTML pages are sent with `script-src 'self'; style-src 'self'`: no inline script, style or handler."""
    for page in STATIC.glob("*.html"):
        text = page.read_text()
        assert re.findall(r"<script(?![^>]*\bsrc=)", text) == [], page.name
        assert "<style" not in text and " style=" not in text and not re.search(r"\son[a-z]+=", text), page.name
    for script in STATIC.glob("*.js"):
        text = script.read_text()
        assert "eval(" not in text and "new Function" not in text and ".style." not in text, script.name


def test_the_key_page_asks_for_a_key_kept_in_this_tab():
    page = (STATIC / "key.html").read_text()
    for part in ('<form id="key-form"', 'type="password" id="api-key"', 'id="key-error" role="alert" hidden',
                 'type="submit"', "kept in this browser tab only (sessionStorage)", '<script src="/static/auth.js">'):
        assert part in page
    auth, chat = (STATIC / "auth.js").read_text(), (STATIC / "chat.js").read_text()
    assert 'sessionStorage.getItem(STORAGE)' in auth and 'STORAGE = "lorax_api_key"' in auth
    assert "That key was not accepted." in auth and "history.pushState" in auth and "popstate" in auth
    assert 'KEY_STORAGE = "lorax_api_key"' in chat and "Authorization = `Bearer ${key}`" in chat


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


GOOD_KEY = "llk_0123456789ab_" + "g" * 43
WRONG_KEY = "llk_0123456789ab_" + "w" * 43


def keyed_app(seen: list[str | None]) -> FastAPI:
    """A stand-in for a server with API keys: a 401 (OpenAI body) unless the request carries GOOD_KEY, then
    /v1/models and a one-chunk streamed chat answer; records each request's Authorization header."""
    app = FastAPI()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != f"Bearer {GOOD_KEY}":
            error = {"message": "the API key is missing or unknown", "type": "authentication_error", "param": None,
                     "code": "invalid_api_key"}
            return JSONResponse({"error": error}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}, {"id": "pricing", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        chunk = {"choices": [{"index": 0, "delta": {"content": "Hello from pricing"}, "finish_reason": None}]}
        return Response(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n", media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []
    with serve_in_thread(keyed_app(seen)) as url:
        yield url, seen


def test_the_terminal_chat_sends_the_key_and_reports_a_missing_or_refused_one(keyed_server, monkeypatch):
    url, seen = keyed_server
    monkeypatch.delenv("LORAX_API_KEY", raising=False)
    with pytest.raises(ChatError, match="needs an API key: pass --api-key or set LORAX_API_KEY") as missing:
        open_chat(url, "pricing")
    assert missing.value.code == 2
    with pytest.raises(ChatError, match="refused the API key.*pass --api-key or set LORAX_API_KEY") as refused:
        open_chat(url, "pricing", api_key=WRONG_KEY)
    assert refused.value.code == 2 and WRONG_KEY.rsplit("_", 1)[1] not in str(refused.value)
    with pytest.raises(ChatError, match="unknown adapter 'nobody'.*available: pricing") as unknown:
        open_chat(url, "nobody", api_key=GOOD_KEY)
    assert unknown.value.code == 2
    seen.clear()
    monkeypatch.setenv("LORAX_API_KEY", GOOD_KEY)
    read, write, out = scripted(["Hi"])
    with open_chat(url, "pricing") as client:  # the key from LORAX_API_KEY
        run_chat(client, "pricing", read, write)
    assert "pricing> Hello from pricing" in "".join(out)
    assert seen == [f"Bearer {GOOD_KEY}"] * 2  # /v1/models, then the question


def test_lorax_lite_chat_command_takes_api_key_or_lorax_api_key(keyed_server):
    url, _ = keyed_server
    cmd = [sys.executable, "-m", "lorax_lite.cli", "chat", "--adapter", "pricing", "--url", url]
    env = {k: v for k, v in os.environ.items() if k != "LORAX_API_KEY"}
    run = lambda args, env: subprocess.run(  # noqa: E731
        cmd + args, input="Hi\n/exit\n", capture_output=True, text=True, timeout=120, env=env)

    missing = run([], env)
    assert missing.returncode == 2 and missing.stderr.startswith("error: the server at")
    assert "needs an API key: pass --api-key or set LORAX_API_KEY" in missing.stderr
    refused = run(["--api-key", WRONG_KEY], env)
    assert refused.returncode == 2 and "refused the API key" in refused.stderr and "Traceback" not in refused.stderr
    assert WRONG_KEY.rsplit("_", 1)[1] not in refused.stderr + refused.stdout
    for args, with_env in [(["--api-key", GOOD_KEY], env), ([], {**env, "LORAX_API_KEY": GOOD_KEY})]:
        done = run(args, with_env)
        assert done.returncode == 0, done.stderr
        assert "pricing> Hello from pricing" in done.stdout and GOOD_KEY not in done.stdout + done.stderr
    assert "LORAX_API_KEY" in run(["--help"], {**env, "LORAX_API_KEY": GOOD_KEY}).stdout
    assert GOOD_KEY not in run(["--help"], {**env, "LORAX_API_KEY": GOOD_KEY}).stdout  # help shows no key

"""What one request may cost and send, and how the server answers what it did not expect: prompt and token
limits, lone surrogates, unhandled exceptions, adapter headers on every route family, cut echoes, request
deadlines, damaged store files and the outcome metrics. In-process, over an AsyncLLM on the tiny model
with a registry, through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
import torch
from lora_helpers import AdapterSpec, make_peft_adapter
from server_helpers import call
from transformers import AutoModelForCausalLM

from lorax_lite import AsyncLLM
from lorax_lite.config import ServerLimits
from lorax_lite.registry import admin
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.store import AdapterStore
from lorax_lite.server import create_app

MODEL_NAME = "tiny-llama"
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, max_model_len=512)
LIMITS = ServerLimits(max_prompt_chars=2000, max_prompt_tokens=200, default_max_tokens=6, max_tokens_limit=300)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits-deployment")


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, store_root: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    registry = SQLiteRegistry(store_root / "registry.db")
    store = AdapterStore(store_root / "store")
    for name, seed in (("pricing", 5), ("fragile", 6)):
        source = make_peft_adapter(model, store_root / "sources" / name, AdapterSpec(rank=4, alpha=8, seed=seed))
        admin.register(registry, store, name, source, tiny_llama_dir, owner=name)
    logistics = make_peft_adapter(model, store_root / "sources" / "logistics", AdapterSpec(rank=4, alpha=8, seed=7))
    llm = AsyncLLM(str(tiny_llama_dir), registry=registry, store=store_root / "store", **ENGINE)
    llm.add_adapter("logistics", logistics)
    yield llm
    llm.shutdown()
    registry.close()


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, MODEL_NAME, LIMITS)


def chat(model: str = MODEL_NAME, **fields) -> dict:
    return {"model": model, "messages": QUESTION, "max_tokens": 5, "temperature": 0, "ignore_eos": True, **fields}


def native(**parameters) -> dict:
    return {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5, **parameters}}


def metric(app, needle: str) -> float:
    for line in call(app, "GET", "/metrics").text.splitlines():
        if line.startswith(needle + " "):
            return float(line.split()[-1])
    return 0.0


# ---- lone surrogates (were an unhandled plain-text 500, not counted) ---------------------------------


@pytest.mark.parametrize("route, body, field", [
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi \udfff"}]), "messages.0.content"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi \udfff", "max_tokens": 3}, "prompt"),
    ("/v1/chat/completions", chat(stop=["\ud800"]), "stop"),
    ("/generate", {"inputs": "hi \udfff", "parameters": {"max_new_tokens": 3}}, "inputs"),
])
def test_a_lone_surrogate_is_refused_as_invalid_text_in_the_route_format(app, route, body, field):
    resp = call(app, "POST", route, content=json.dumps(body), headers={"content-type": "application/json"})
    openai = route.startswith("/v1/")
    assert resp.status_code == (400 if openai else 422), resp.text
    message = resp.json()["error"]["message"] if openai else resp.json()["error"]
    assert "unicode" in message.lower() and field.split(".")[0] in message


# ---- an exception no route handles --------------------------------------------------------------


def test_an_unhandled_exception_is_a_json_500_counted_and_logged_with_its_request_id(app, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom at /secret/path")

    monkeypatch.setattr("lorax_lite.server.openai.render_chat", broken)
    before = metric(app, "lorax_unhandled_exceptions_total")
    with caplog.at_level(logging.ERROR, logger="lorax_lite.server.boundary"):
        resp = call(app, "POST", "/v1/chat/completions", json=chat(), headers={"x-request-id": "req-42"})
    assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
    assert resp.headers["x-request-id"] == "req-42"
    error = resp.json()["error"]
    assert error["type"] == "server_error" and "req-42" in error["message"] and "secret" not in resp.text
    assert metric(app, "lorax_unhandled_exceptions_total") == before + 1
    assert metric(app, 'lorax_http_error_responses_total{status="500"}') >= 1
    assert any("req-42" in r.getMessage() and r.exc_info for r in caplog.records)


def test_every_response_carries_a_request_id(app):
    resp = call(app, "GET", "/health", headers={"x-request-id": "not a sane id\n"})
    assert len(resp.headers["x-request-id"]) == 32  # a new one: the client's was not a plain token


# ---- what one request may cost ------------------------------------------------------------------


def test_a_prompt_over_max_prompt_chars_is_refused_before_it_is_tokenized(app, llm, monkeypatch):
    tokenized = []
    tokenizer_type = type(llm.tokenizer)
    original = tokenizer_type.__call__
    monkeypatch.setattr(tokenizer_type, "__call__",
                        lambda self, *a, **k: tokenized.append(1) or original(self, *a, **k))
    huge = "x" * (LIMITS.max_prompt_chars + 1)
    resp = call(app, "POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": huge, "max_tokens": 2})
    assert resp.status_code == 400 and "max_prompt_chars" in resp.json()["error"]["message"]
    resp = call(app, "POST", "/generate", json={"inputs": huge})
    assert resp.status_code == 422 and "max_prompt_chars" in resp.json()["error"]
    messages = [{"role": "user", "content": "y" * 1500}, {"role": "assistant", "content": "z" * 1500}]
    resp = call(app, "POST", "/v1/chat/completions", json=chat(messages=messages))
    assert resp.status_code == 400 and "max_prompt_chars" in resp.json()["error"]["message"]
    assert tokenized == []


def test_a_prompt_over_max_prompt_tokens_is_refused_naming_the_limit(app):
    prompt = "The quick brown fox jumps over the lazy dog. " * 40  # ~1800 chars, well over 200 tokens
    resp = call(app, "POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2})
    assert resp.status_code == 400 and "max_prompt_tokens" in resp.json()["error"]["message"]
    resp = call(app, "POST", "/generate", json={"inputs": prompt})
    assert resp.status_code == 422 and "max_prompt_tokens" in resp.json()["error"]


def test_asking_for_more_tokens_than_max_tokens_limit_is_refused(app):
    resp = call(app, "POST", "/v1/chat/completions", json=chat(max_tokens=LIMITS.max_tokens_limit + 1))
    assert resp.status_code == 400 and "max_tokens_limit" in resp.json()["error"]["message"]
    assert resp.json()["error"]["param"] == "max_tokens"
    resp = call(app, "POST", "/generate", json=native(max_new_tokens=LIMITS.max_tokens_limit + 1))
    assert resp.status_code == 422 and "max_tokens_limit" in resp.json()["error"]


def test_a_chat_request_without_max_tokens_gets_the_servers_default(app):
    body = chat()
    del body["max_tokens"]
    resp = call(app, "POST", "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == LIMITS.default_max_tokens
    assert resp.json()["choices"][0]["finish_reason"] == "length"


def test_info_lists_the_limits(app):
    limits = call(app, "GET", "/info").json()["limits"]
    for name in ("max_prompt_chars", "max_prompt_tokens", "default_max_tokens", "max_tokens_limit",
                 "max_request_seconds", "header_timeout", "body_timeout", "max_connections", "shutdown_timeout"):
        assert limits[name] == getattr(LIMITS, name)


# ---- adapter headers ----------------------------------------------------------------------------


def test_two_different_adapter_headers_are_a_400(app):
    headers = [("adapter_id", "pricing"), ("adapter_id", "logistics")]
    resp = call(app, "POST", "/generate", json=native(), headers=headers)
    assert resp.status_code == 400 and "conflicting adapter headers" in resp.json()["error"]
    resp = call(app, "POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2},
                headers=headers)
    assert resp.status_code == 400
    same = [("adapter_id", "logistics"), ("x-adapter-id", "logistics")]
    assert call(app, "POST", "/generate", json=native(), headers=same).status_code == 200


def test_openai_routes_honour_the_adapter_header(app):
    by_model = call(app, "POST", "/v1/chat/completions", json=chat("logistics"))
    by_header = call(app, "POST", "/v1/chat/completions", json=chat(), headers={"X-Adapter-Id": "logistics"})
    assert by_header.status_code == 200, by_header.text
    assert by_header.headers["x-adapter-id"] == "logistics" and by_header.json()["model"] == "logistics"
    assert by_header.json()["choices"] == by_model.json()["choices"]
    unknown = call(app, "POST", "/v1/chat/completions", json=chat(), headers={"adapter_id": "no-such-adapter"})
    assert unknown.status_code == 404
    conflict = call(app, "POST", "/v1/chat/completions", json=chat("pricing"), headers={"adapter_id": "logistics"})
    assert conflict.status_code == 400 and "conflicting adapters" in conflict.json()["error"]["message"]


def test_error_bodies_cut_what_they_echo(app):
    huge_id = "a" * 10_000
    for resp in [
        call(app, "POST", "/v1/chat/completions", json=chat(huge_id)),
        call(app, "POST", "/generate", json=native(), headers={"adapter_id": huge_id}),
        call(app, "POST", "/generate", json=native(adapter_id=huge_id)),
        call(app, "GET", "/" + "p" * 10_000),
        call(app, "POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "suffix": "s" * 10_000}),
    ]:
        assert 400 <= resp.status_code < 500 and len(resp.content) < 1500, (resp.status_code, len(resp.content))


# ---- deadlines ----------------------------------------------------------------------------------


def test_a_request_past_its_timeout_before_any_token_gets_a_504(app):
    resp = call(app, "POST", "/generate", json=native(timeout=1e-6))
    assert resp.status_code == 504 and resp.json()["error_type"] == "timeout"
    resp = call(app, "POST", "/v1/chat/completions", json=chat(timeout=1e-6))
    assert resp.status_code == 504 and resp.json()["error"]["type"] == "timeout"


def test_a_request_past_its_timeout_ends_with_what_it_generated_and_finish_reason_timeout(app):
    resp = call(app, "POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 300,
                                                      "temperature": 0, "ignore_eos": True, "timeout": 0.3})
    assert resp.status_code == 200, resp.text
    choice, usage = resp.json()["choices"][0], resp.json()["usage"]
    assert choice["finish_reason"] == "timeout" and 0 < usage["completion_tokens"] < 300
    resp = call(app, "POST", "/generate_stream", json=native(max_new_tokens=300, ignore_eos_token=True, timeout=0.3))
    events = [json.loads(line[5:]) for line in resp.text.splitlines() if line.startswith("data:")]
    assert events[-1]["details"]["finish_reason"] == "timeout" and 0 < len(events) < 300


@pytest.mark.parametrize("timeout", [0, -1, "soon"])
def test_a_bad_timeout_is_refused(app, timeout):
    assert call(app, "POST", "/generate", json=native(timeout=timeout)).status_code == 422
    assert call(app, "POST", "/v1/chat/completions", json=chat(timeout=timeout)).status_code == 400


def test_max_request_seconds_caps_every_request(llm):
    capped = create_app(llm, MODEL_NAME, ServerLimits(max_request_seconds=0.3))
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    for timeout in (None, 60):  # none given, or a longer one: the server's maximum wins
        resp = call(capped, "POST", "/v1/completions", json=body if timeout is None else {**body, "timeout": timeout})
        assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "timeout"


# ---- damaged store files, and the metrics' outcomes --------------------------------------------


def test_damaged_store_files_are_a_503_that_names_no_path(app, store_root):
    for weights in (store_root / "store" / "fragile").rglob("adapter_model.safetensors"):
        weights.write_bytes(b"not safetensors at all")
    before = metric(app, 'lorax_requests_total{adapter="fragile",outcome="server_error"}')
    resp = call(app, "POST", "/v1/chat/completions", json=chat("fragile"))
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "adapter_unavailable" and str(store_root) not in resp.text
    resp = call(app, "POST", "/generate", json=native(), headers={"adapter_id": "fragile"})
    assert resp.status_code == 503 and "/" not in resp.json()["error"].replace("the server log", "")
    assert metric(app, 'lorax_requests_total{adapter="fragile",outcome="server_error"}') == before + 2
    assert call(app, "POST", "/generate", json=native(), headers={"adapter_id": "pricing"}).status_code == 200


def test_a_client_that_leaves_before_its_first_token_is_counted_as_aborted(app, llm, monkeypatch):
    first_token = asyncio.Event()  # never set: the first token never comes
    original = llm.generate

    async def slow_generate(*args, **kwargs):
        await first_token.wait()
        async for out in original(*args, **kwargs):
            yield out

    monkeypatch.setattr(llm, "generate", slow_generate)
    before = metric(app, f'lorax_requests_total{{adapter="{MODEL_NAME}",outcome="aborted"}}')

    async def leave_early() -> None:
        body = json.dumps(native()).encode()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(0.3)
            return {"type": "http.disconnect"}

        async def send(message):
            pass

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/generate", "raw_path": b"/generate", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80), "root_path": ""}
        await app(scope, receive, send)

    asyncio.run(leave_early())
    assert metric(app, f'lorax_requests_total{{adapter="{MODEL_NAME}",outcome="aborted"}}') == before + 1

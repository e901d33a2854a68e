"""API keys at the HTTP boundary over an AsyncLLM on the tiny model, with a real SQLite registry and tenant store,
driven in-process (httpx's ASGI transport) and, where a stream must stay open, through uvicorn in a thread."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import torch
from starlette.routing import Mount
from transformers import AutoModelForCausalLM

from lora_helpers import AdapterSpec, make_peft_adapter
from lorax_lite import AsyncLLM
from lorax_lite.config import ServerLimits
from lorax_lite.registry import admin
from lorax_lite.registry.base import RegistryError
from lorax_lite.registry.factory import open_tenant_store
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.store import AdapterStore
from lorax_lite.registry.tenants import new_key
from lorax_lite.server import create_app
from lorax_lite.server.auth import Tenancy
from lorax_lite.server.usage import AuditLog
from server_helpers import call, serve_in_thread

MODEL_NAME = "tiny-llama"
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, max_model_len=128)
SYSTEM_PROMPT = "You answer questions about pricing, secretly."
PUBLIC = {"/health", "/ready"}
QUESTION = [{"role": "user", "content": "What is the price?"}]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("auth")


@pytest.fixture(scope="module")
def registry(tiny_llama_dir: Path, root: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    registry = SQLiteRegistry(root / "registry.db")
    for seed, adapter_id in enumerate(("pricing", "supply"), start=3):
        source = make_peft_adapter(model, root / "src" / adapter_id, AdapterSpec(rank=4, alpha=8, seed=seed))
        admin.register(registry, AdapterStore(root / "store"), adapter_id, source, tiny_llama_dir, owner=adapter_id,
                       description=f"the {adapter_id} assistant", system_prompt=SYSTEM_PROMPT)
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def store(registry, root: Path):
    store = open_tenant_store(f"sqlite:///{root / 'registry.db'}")
    yield store
    store.close()


def add_key(store, tenant: str, adapters: list[str], **settings) -> str:
    key, record = new_key(tenant, adapters, **settings)
    store.add_key(record)
    return key


@pytest.fixture(scope="module")
def keys(store) -> dict[str, str]:
    return {
        "pricing": add_key(store, "pricing", ["pricing"]),
        "supply": add_key(store, "supply_chain", ["supply"], base_model=True),
        "admin": add_key(store, "platform", ["*"], base_model=True, role="admin"),
    }


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, registry):
    llm = AsyncLLM(str(tiny_llama_dir), registry=registry, **ENGINE)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def tenancy(store, keys, root: Path):
    tenancy = Tenancy(store, audit=AuditLog(str(root / "audit.jsonl")), usage_flush_s=0.2)
    yield tenancy
    tenancy.close()


@pytest.fixture(scope="module")
def app(llm, tenancy):
    return create_app(llm, MODEL_NAME, ServerLimits(), tenancy)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def generate(app, key: str | None, adapter_id: str | None = None, max_new_tokens: int = 3) -> httpx.Response:
    parameters: dict = {"max_new_tokens": max_new_tokens}
    if adapter_id is not None:
        parameters["adapter_id"] = adapter_id
    return call(app, "POST", "/generate", json={"inputs": "The price is", "parameters": parameters},
                headers=bearer(key) if key else {})


def chat(app, key: str | None, model: str, max_tokens: int = 3) -> httpx.Response:
    return call(app, "POST", "/v1/chat/completions", json={"model": model, "messages": QUESTION,
                                                           "max_tokens": max_tokens},
                headers=bearer(key) if key else {})


# ---- every route ---------------------------------------------------------------------------------


def route_requests(app) -> list[tuple[str, str]]:
    """(method, path) for every route of the app, path parameters filled in; a new route shows up here."""
    found = []
    for route in app.routes:
        if isinstance(route, Mount):
            found.append(("GET", f"{route.path}/chat.js"))
            continue
        # FastAPI >= 0.165 keeps an included router as one entry whose contexts are its routes
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for context in contexts:
            path = context.path.replace("{adapter_id}", "pricing")
            assert "{" not in path, f"fill in the path parameters of {context.path}"
            found += [(method, path) for method in sorted(context.methods or ()) if method != "HEAD"]
    assert {path for _, path in found} >= {"/", "/generate", "/v1/models", "/chat", "/info", "/metrics", "/docs",
                                           "/openapi.json"}
    return found


def test_every_route_but_the_probes_and_static_files_needs_a_key(app):
    for method, path in route_requests(app):
        response = call(app, method, path, json={} if method == "POST" else None)
        if path in PUBLIC or path.startswith("/static/"):
            assert response.status_code == 200, (method, path, response.text)
            continue
        assert response.status_code == 401, (method, path, response.status_code, response.text[:200])
        assert response.headers["www-authenticate"].startswith('Bearer realm="lorax-lite"')
        if method == "GET" and (path in ("/", "/chat", "/docs", "/redoc") or path.startswith("/chat/")):
            assert 'id="key-form"' in response.text and "text/html" in response.headers["content-type"]
            assert response.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        elif path.startswith("/v1/"):
            assert response.json()["error"]["code"] == "invalid_api_key", (method, path)
            assert response.json()["error"]["type"] == "authentication_error"
        else:
            assert response.json()["error_type"] == "unauthorized", (method, path)


def test_a_valid_key_reaches_every_route(app, keys):
    for method, path in route_requests(app):
        if method != "GET":
            continue
        response = call(app, method, path, headers=bearer(keys["admin"]))
        assert response.status_code in (200, 307), (path, response.status_code, response.text[:200])


@pytest.mark.parametrize("headers, why", [
    ({}, "needs an API key"),
    ({"Authorization": "Bearer nope"}, "not a lorax-lite key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "invalid Authorization header"),
    ({"Authorization": "Bearer llk_000000000000_" + "a" * 43}, "invalid API key"),
])
def test_missing_malformed_and_unknown_keys_are_401(app, headers, why):
    response = call(app, "POST", "/generate", json={"inputs": "x"}, headers=headers)
    assert response.status_code == 401 and why in response.json()["error"]


def test_a_wrong_secret_is_401_and_both_headers_work(app, keys):
    key_id, secret = keys["pricing"].rsplit("_", 1)[0], keys["pricing"][-43:]
    wrong = f"{key_id}_{'b' * 43}" if secret != "b" * 43 else f"{key_id}_{'c' * 43}"
    assert generate(app, wrong, "pricing").status_code == 401
    assert generate(app, keys["pricing"], "pricing").status_code == 200
    as_header = call(app, "POST", "/generate", json={"inputs": "x", "parameters": {"adapter_id": "pricing",
                     "max_new_tokens": 2}}, headers={"X-API-Key": keys["pricing"]})
    assert as_header.status_code == 200
    both = call(app, "POST", "/generate", json={"inputs": "x"},
                headers={**bearer(keys["pricing"]), "X-API-Key": keys["supply"]})
    assert both.status_code == 401 and "two different API keys" in both.json()["error"]


def test_revoked_rotated_and_expired_keys_stop_working_within_a_second(app, store):
    key = add_key(store, "pricing", ["pricing"])
    assert generate(app, key, "pricing").status_code == 200
    record = store.get_key(key.split("_")[1])
    record.revoked_at = time.time()
    store.update_key(record)
    started = time.monotonic()
    while generate(app, key, "pricing").status_code != 401:
        assert time.monotonic() - started < 1.0, "a revoked key still works after 1 s"
        time.sleep(0.05)
    assert "revoked" in generate(app, key, "pricing").json()["error"]

    soon = add_key(store, "pricing", ["pricing"], expires_at=time.time() + 1.0)
    assert generate(app, soon, "pricing").status_code == 200
    time.sleep(1.1)
    response = generate(app, soon, "pricing")
    assert response.status_code == 401 and "expired" in response.json()["error"]


# ---- what a key may use ------------------------------------------------------------------------------


def test_another_tenants_adapter_is_answered_exactly_like_an_unknown_one(app, keys):
    for send in (lambda adapter: generate(app, keys["pricing"], adapter),
                 lambda adapter: chat(app, keys["pricing"], adapter)):
        forbidden, unknown = send("supply"), send("no-such-adapter")
        assert forbidden.status_code == unknown.status_code == 404
        assert forbidden.content.replace(b"supply", b"X") == unknown.content.replace(b"no-such-adapter", b"X")
        drop = {"x-request-id", "content-length"}
        assert ({k for k in forbidden.headers if k not in drop} == {k for k in unknown.headers if k not in drop})


def test_the_base_model_needs_the_keys_permission(app, keys):
    native = generate(app, keys["pricing"])
    assert native.status_code == 403 and native.json()["error_type"] == "forbidden"
    openai = chat(app, keys["pricing"], MODEL_NAME)
    assert openai.status_code == 403 and openai.json()["error"]["type"] == "permission_error"
    assert generate(app, keys["supply"]).status_code == 200
    assert chat(app, keys["supply"], MODEL_NAME).status_code == 200
    page = call(app, "GET", f"/chat/{MODEL_NAME}", headers=bearer(keys["pricing"]))
    assert page.status_code == 403


def test_listings_show_only_what_the_key_may_use(app, keys):
    def models(key: str) -> list[str]:
        return [card["id"] for card in call(app, "GET", "/v1/models", headers=bearer(key)).json()["data"]]

    assert models(keys["pricing"]) == ["pricing"]
    assert models(keys["supply"]) == [MODEL_NAME, "supply"]
    assert models(keys["admin"]) == [MODEL_NAME, "pricing", "supply"]
    page = call(app, "GET", "/chat", headers=bearer(keys["pricing"])).text
    assert 'href="/chat/pricing"' in page and "supply" not in page and f'href="/chat/{MODEL_NAME}"' not in page
    assert call(app, "GET", "/chat/supply", headers=bearer(keys["pricing"])).status_code == 404
    generate(app, keys["supply"], "supply")  # supply is now cached somewhere in the engine
    info = call(app, "GET", "/info", headers=bearer(keys["pricing"])).json()
    assert info["auth"]["tenant"] == "pricing"
    assert not any(k and k.startswith("supply") for k in info["adapters"]["slots"] + info["adapters"]["host"])
    admin_info = call(app, "GET", "/info", headers=bearer(keys["admin"])).json()
    assert any(k and k.startswith("supply") for k in admin_info["adapters"]["slots"] + admin_info["adapters"]["host"])


def test_metrics_need_an_admin_key(app, keys):
    response = call(app, "GET", "/metrics", headers=bearer(keys["pricing"]))
    assert response.status_code == 403 and "admin" in response.json()["error"]
    assert call(app, "GET", "/metrics", headers=bearer(keys["admin"])).status_code == 200


def test_no_route_returns_a_registered_system_prompt(app, keys):
    chat(app, keys["admin"], "pricing")
    for method, path in route_requests(app):
        if method == "GET":
            response = call(app, method, path, headers=bearer(keys["admin"]))
            assert SYSTEM_PROMPT not in response.text, path


def test_pages_are_sent_with_a_content_security_policy(app, keys):
    for path in ("/chat", "/chat/pricing"):
        response = call(app, "GET", path, headers=bearer(keys["admin"]))
        assert response.status_code == 200
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
        assert "<script>" not in response.text  # no inline script: the policy allows none


# ---- limits, usage, audit ---------------------------------------------------------------------------------


def test_a_tenant_over_its_request_rate_gets_429_while_others_are_served(app, store, keys):
    limited = add_key(store, "pricing", ["pricing"], rpm=2)
    statuses = [generate(app, limited, "pricing", 1).status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    refused = generate(app, limited, "pricing", 1)
    assert refused.json()["error_type"] == "rate_limited" and int(refused.headers["retry-after"]) >= 1
    assert generate(app, keys["supply"], "supply", 1).status_code == 200  # another tenant: unaffected
    assert chat(app, limited, "pricing").json()["error"]["type"] == "rate_limit_error"


def test_a_token_budget_is_charged_with_the_answer(app, store):
    limited = add_key(store, "pricing", ["pricing"], tpm=10)
    assert generate(app, limited, "pricing", 8).status_code == 200  # a few prompt + 8 generated tokens: over 10
    refused = generate(app, limited, "pricing", 1)
    assert refused.status_code == 429 and "tokens per minute" in refused.json()["error"]


def test_concurrent_requests_past_the_keys_cap_get_429(app, llm, store, monkeypatch):
    limited = add_key(store, "pricing", ["pricing"], max_concurrent=1)
    body = {"inputs": "The price is", "parameters": {"adapter_id": "pricing", "max_new_tokens": 60,
                                                     "ignore_eos_token": True}}
    step = llm.engine.step

    def slow_step():  # 60 tokens take over a second: the stream is still open when the second request comes
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(llm.engine, "step", slow_step)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, headers=bearer(limited), timeout=30) as client:
        with client.stream("POST", "/generate_stream", json=body) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # the first token is out: the request holds its slot
            second = client.post("/generate", json={**body, "parameters": {**body["parameters"], "max_new_tokens": 1}})
            assert second.status_code == 429 and "concurrent" in second.json()["error"]
        time.sleep(0.2)  # the stream was closed: its request is aborted and its slot freed
        assert client.post("/generate", json=body).status_code == 200


def test_usage_is_counted_exactly_per_tenant_key_and_adapter(app, store, tenancy):
    key = add_key(store, "usage_unit", ["pricing"])
    key_id = "llk_" + key.split("_")[1]
    expected = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0}
    for max_new_tokens in (2, 5):
        details = call(app, "POST", "/generate", headers=bearer(key), json={
            "inputs": "The price is", "parameters": {"adapter_id": "pricing", "max_new_tokens": max_new_tokens,
                                                     "details": True}}).json()["details"]
        expected["requests"] += 1
        expected["prompt_tokens"] += details["prompt_tokens"]
        expected["generated_tokens"] += details["generated_tokens"]
    usage = chat(app, key, "pricing", 4).json()["usage"]
    expected["requests"] += 1
    expected["prompt_tokens"] += usage["prompt_tokens"]
    expected["generated_tokens"] += usage["completion_tokens"]
    assert tenancy.usage.flush()
    rows = [row for row in store.usage(tenant="usage_unit")]
    assert [(r.key_id, r.adapter) for r in rows] == [(key_id, "pricing")]
    assert {name: getattr(rows[0], name) for name in expected} == expected
    metrics = call(app, "GET", "/metrics", headers=bearer(call_admin_key(store))).text
    line = f'lorax_tenant_generated_tokens_total{{adapter="pricing",key="{key_id}",tenant="usage_unit"}}'
    assert f"{line} {float(expected['generated_tokens'])}" in metrics


def call_admin_key(store) -> str:
    return add_key(store, "platform", [], role="admin")


def test_denied_requests_are_audited_without_the_key(app, keys, root: Path, tenancy):
    generate(app, keys["pricing"], "supply")  # 404 by the key's allow-list
    generate(app, keys["pricing"])  # 403 base model
    call(app, "GET", "/metrics", headers=bearer(keys["pricing"]))  # 403 admin route
    call(app, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})  # 401
    path = root / "audit.jsonl"
    expected = {(404, "adapter not allowed", "/generate"), (403, "base model not allowed", "/generate"),
                (403, "admin route", "/metrics"), (401, "malformed key", "/v1/models")}
    deadline = time.monotonic() + 5
    while True:  # the log is written by its own thread
        lines = [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]
        seen = {(e["status"], e["reason"], e["route"]) for e in lines}
        if expected <= seen or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert expected <= seen
    denied = next(e for e in lines if e["reason"] == "adapter not allowed")
    assert denied["tenant"] == "pricing" and denied["adapter"] == "supply" and denied["key_id"].startswith("llk_")
    text = path.read_text()
    assert all(key not in text and key[-43:] not in text for key in keys.values())


# ---- the server's switches -----------------------------------------------------------------------------


def test_the_host_header_must_be_allowed(llm, store):
    tenancy = Tenancy(store, allowed_hosts=["localhost", ".corp.example"])
    app = create_app(llm, MODEL_NAME, ServerLimits(), tenancy)
    try:
        assert call(app, "GET", "/health", headers={"Host": "evil.test"}).status_code == 200
        refused = call(app, "GET", "/v1/models", headers={"Host": "evil.test"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host"
        for host in ("localhost:8080", "llm.corp.example", "corp.example"):
            assert call(app, "GET", "/v1/models", headers={"Host": host}).status_code == 401, host  # past the check
    finally:
        tenancy.close()


def test_keys_are_required_from_the_first_key_on(llm, tiny_llama_dir, tmp_path):
    SQLiteRegistry(tmp_path / "registry.db").close()
    store = open_tenant_store(f"sqlite:///{tmp_path / 'registry.db'}")
    tenancy = Tenancy(store)
    app = create_app(llm, MODEL_NAME, ServerLimits(), tenancy)
    try:
        assert call(app, "GET", "/v1/models").status_code == 200  # no keys yet: open
        key = add_key(store, "pricing", [], base_model=True)
        started = time.monotonic()
        while call(app, "GET", "/v1/models").status_code != 401:
            assert time.monotonic() - started < 1.0
            time.sleep(0.05)
        assert call(app, "GET", "/v1/models", headers=bearer(key)).status_code == 200
    finally:
        tenancy.close()
        store.close()


class FlakyStore:
    """A tenant store that fails every call while `down` is set, as an unreachable registry does."""

    def __init__(self, store) -> None:
        self.store = store
        self.url = store.url
        self.down = False

    def __getattr__(self, name: str):
        method = getattr(self.store, name)

        def call(*args):
            if self.down:
                raise RegistryError("registry: connection refused")
            return method(*args)

        return call


def test_while_the_key_store_is_down_known_keys_work_and_others_get_503(llm, store):
    flaky = FlakyStore(store)
    tenancy = Tenancy(flaky, stale_s=30)
    app = create_app(llm, MODEL_NAME, ServerLimits(), tenancy)
    known, unknown = add_key(store, "pricing", [], base_model=True), add_key(store, "pricing", [], base_model=True)
    try:
        assert call(app, "GET", "/v1/models", headers=bearer(known)).status_code == 200
        flaky.down = True
        time.sleep(0.6)  # past the key's refresh interval: the server asks the store again, and it fails
        assert call(app, "GET", "/v1/models", headers=bearer(known)).status_code == 200  # checked 0.6 s ago
        refused = call(app, "GET", "/v1/models", headers=bearer(unknown))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "registry_unavailable"
        assert refused.headers["retry-after"]
        flaky.down = False
        time.sleep(1.1)  # the breaker lets a probe through again
        assert call(app, "GET", "/v1/models", headers=bearer(unknown)).status_code == 200
    finally:
        tenancy.close()


def test_prefix_cached_kv_is_shared_within_a_tenant_never_across_tenants(app, store):
    """The tenant salts the prefix cache: the same long prompt hits for its own tenant's second request
    (usage.prompt_tokens_details.cached_tokens), never for another tenant's, which could otherwise time it."""
    first, same, other = (add_key(store, tenant, ["pricing"]) for tenant in ("salt_a", "salt_a", "salt_b"))
    messages = [{"role": "user", "content": " ".join(f"item {i} costs {i * 3}" for i in range(2))}]  # > 2 blocks of 16

    def cached(key: str) -> int:
        response = call(app, "POST", "/v1/chat/completions", headers=bearer(key),
                        json={"model": "pricing", "messages": messages, "max_tokens": 2})
        assert response.status_code == 200, response.text
        return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(first) == 0
    assert cached(other) == 0  # the same tokens, adapter and version: another tenant's blocks
    assert cached(same) > 0 and cached(first) > 0  # the same tenant, any of its keys

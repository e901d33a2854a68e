"""The proxy's thin ingress (cluster/routing.py) at the ASGI level, without Ray: which requests get Ray's
multiplexed model id, that the body reaches the replica byte for byte, what the proxy learns from responses.
Also the replica's response headers (deployment.py, needs Ray) and the check that a proxy runs the middleware
(launch.proxy_routes_by_adapter) against a plain local HTTP server."""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from server_helpers import free_port
from starlette.middleware import Middleware
from starlette.types import Message, Receive, Scope, Send

from lorax_lite.cluster import routing
from lorax_lite.cluster.launch import proxy_routes_by_adapter
from lorax_lite.cluster.routing import (
    BASE_MODEL_HEADER,
    MAX_BASE_NAMES,
    MAX_PEEK_BYTES,
    MODEL_ID_HEADER,
    ROUTED_HEADER,
    AdapterRoutingMiddleware,
    proxy_middlewares,
)

NATIVE = {"inputs": "Hello", "parameters": {"adapter_id": "pricing", "max_new_tokens": 4}}


# ---- a fake client (receive, send) and a fake replica (the downstream app) ------------------------------------


@dataclass
class Exchange:
    """One request through the middleware: what the client sends, what the downstream app saw, what came back."""

    messages: list[Message]  # what `receive` gives, in order (then it waits forever)
    events: list[str] = field(default_factory=list)  # "receive" / "app", in the order they happened
    scope: Scope | None = None  # the scope the app was called with
    received: list[Message] = field(default_factory=list)  # what the app read
    sent: list[Message] = field(default_factory=list)  # what reached the client

    async def receive(self) -> Message:
        self.events.append("receive")
        if self.messages:
            return self.messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def model_ids(self) -> list[bytes]:
        return [value for name, value in self.scope["headers"] if name == MODEL_ID_HEADER]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.received if m["type"] == "http.request")

    @property
    def response_headers(self) -> dict[bytes, bytes]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return dict(start["headers"])

    @property
    def receives_before_app(self) -> int:
        return self.events.index("app")


def downstream(exchange: Exchange, headers: list[tuple[bytes, bytes]] | None = None, status: int = 200):
    """A replica: records its scope, reads the whole body (until the last chunk or a disconnect), answers."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        exchange.events.append("app")
        exchange.scope = scope
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            exchange.received.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": status, "headers": list(headers or [])})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def http_scope(path: str, method: str = "POST", headers: list[tuple[bytes, bytes]] = ()) -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": [(b"host", b"proxy"), *headers]}


def chunks(body: bytes, size: int) -> list[Message]:
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    return [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]


def one(body: bytes | dict) -> list[Message]:
    return chunks(body if isinstance(body, bytes) else json.dumps(body).encode(), 1 << 30)


def through(scope: Scope, messages: list[Message], middleware: AdapterRoutingMiddleware | None = None,
            response_headers: list[tuple[bytes, bytes]] | None = None, status: int = 200) -> Exchange:
    """Send one request through the middleware (a fresh one unless given) to the fake replica."""
    exchange = Exchange(list(messages))
    app = downstream(exchange, response_headers, status)
    if middleware is None:
        middleware = AdapterRoutingMiddleware(app)
    middleware.app = app  # a given one keeps what it learned, with this exchange's replica
    asyncio.run(middleware(scope, exchange.receive, exchange.send))
    return exchange


def routed(exchange: Exchange) -> bytes:
    return exchange.response_headers[ROUTED_HEADER]


# ---- headers: taken as they are, the body not read -----------------------------------------------------------


@pytest.mark.parametrize("header", [b"adapter_id", b"x-adapter-id", b"X-Adapter-Id"])
def test_an_adapter_header_wins_and_the_body_is_not_read(header: bytes):
    body = {"model": "supply_chain", "messages": []}  # the body names another: the header wins
    exchange = through(http_scope("/v1/chat/completions", headers=[(header, b"pricing")]), one(body))
    assert exchange.receives_before_app == 0
    assert exchange.model_ids == [b"pricing"] and routed(exchange) == b"pricing"
    assert json.loads(exchange.body) == body


def test_adapter_id_comes_before_x_adapter_id():
    headers = [(b"x-adapter-id", b"supply_chain"), (b"adapter_id", b"pricing")]
    assert through(http_scope("/generate", headers=headers), one(NATIVE)).model_ids == [b"pricing"]


def test_a_malformed_adapter_header_routes_by_nothing_and_still_does_not_read_the_body():
    exchange = through(http_scope("/generate", headers=[(b"adapter_id", b"../etc")]), one(NATIVE))
    assert exchange.receives_before_app == 0 and exchange.model_ids == [] and routed(exchange) == b""


# ---- the body: native parameters.adapter_id, OpenAI model ------------------------------------------------------


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
def test_the_native_routes_route_by_parameters_adapter_id(path: str):
    exchange = through(http_scope(path), one(NATIVE))
    assert exchange.model_ids == [b"pricing"] and routed(exchange) == b"pricing"
    assert exchange.body == json.dumps(NATIVE).encode()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_the_openai_routes_route_by_model(path: str):
    body = {"model": "supply_chain", "prompt": "Hi", "parameters": {"adapter_id": "pricing"}}
    exchange = through(http_scope(path), one(body))
    assert exchange.model_ids == [b"supply_chain"] and routed(exchange) == b"supply_chain"


def test_a_native_route_ignores_model_and_an_openai_route_parameters():
    assert through(http_scope("/generate"), one({"inputs": "Hi", "model": "pricing"})).model_ids == []
    assert through(http_scope("/v1/completions"), one(NATIVE)).model_ids == []


def test_a_body_in_several_chunks_reaches_the_replica_byte_for_byte():
    raw = json.dumps({**NATIVE, "inputs": "é" * 5000}, ensure_ascii=False).encode()  # chunks split characters
    messages = chunks(raw, 777)
    exchange = through(http_scope("/generate"), messages)
    assert exchange.model_ids == [b"pricing"]
    assert exchange.received == messages and exchange.body == raw


def test_a_disconnect_after_the_body_is_still_read_by_the_replica():
    raw = json.dumps(NATIVE).encode()
    messages = [*chunks(raw, 10), {"type": "http.disconnect"}]
    exchange = Exchange(list(messages))
    body_then_more: list[Message] = []

    async def replica(scope: Scope, receive: Receive, send: Send) -> None:
        exchange.scope = scope
        for _ in range(len(messages)):
            body_then_more.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})

    asyncio.run(AdapterRoutingMiddleware(replica)(http_scope("/generate"), exchange.receive, exchange.send))
    assert body_then_more == messages and exchange.model_ids == [b"pricing"]


def test_a_disconnect_in_the_middle_of_the_body_is_passed_on_without_an_id():
    raw = json.dumps(NATIVE).encode()
    messages = [*chunks(raw, 10)[:2], {"type": "http.disconnect"}]
    exchange = through(http_scope("/generate"), messages)
    assert exchange.received == messages and exchange.model_ids == [] and routed(exchange) == b""


@pytest.mark.parametrize("chunk_size", [64 * 1024, MAX_PEEK_BYTES + 100], ids=["chunked", "one-chunk"])
def test_a_body_over_the_peek_limit_is_passed_on_whole_without_an_id(chunk_size: int):
    raw = json.dumps({**NATIVE, "inputs": "x" * MAX_PEEK_BYTES}).encode()
    messages = chunks(raw, chunk_size)
    exchange = through(http_scope("/generate"), messages)
    assert exchange.received == messages and exchange.body == raw
    assert exchange.model_ids == [] and routed(exchange) == b""


def test_a_body_at_the_peek_limit_is_read():
    prefix, suffix = b'{"parameters": {"adapter_id": "pricing"}, "inputs": "', b'"}'
    raw = prefix + b"x" * (MAX_PEEK_BYTES - len(prefix) - len(suffix)) + suffix
    assert len(raw) == MAX_PEEK_BYTES
    exchange = through(http_scope("/generate"), chunks(raw, 64 * 1024))
    assert exchange.model_ids == [b"pricing"] and exchange.body == raw


def test_a_slow_body_is_passed_on_as_it_arrives_without_an_id(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(routing, "PEEK_TIMEOUT_S", 0.05)
    raw = json.dumps(NATIVE).encode()
    first, rest = chunks(raw, len(raw) // 2 + 1)
    exchange = Exchange([])
    queue: asyncio.Queue[Message] = asyncio.Queue()

    async def slow_client() -> Message:
        exchange.events.append("receive")
        return await queue.get()

    async def go() -> None:
        await queue.put(first)

        async def later() -> None:
            await asyncio.sleep(0.3)  # well past the peek's deadline
            await queue.put(rest)

        task = asyncio.create_task(later())
        await AdapterRoutingMiddleware(downstream(exchange))(http_scope("/generate"), slow_client, exchange.send)
        await task

    asyncio.run(go())
    assert exchange.received == [first, rest] and exchange.body == raw
    assert exchange.model_ids == [] and routed(exchange) == b""


@pytest.mark.parametrize("body", [
    b"{not json", b"\xff\xfe", b"", b'["pricing"]', b'"pricing"', b"null",
    b'{"model": 7}', b'{"model": ["pricing"]}', b'{"model": null}',
    b'{"model": "../etc"}', b'{"model": ""}', json.dumps({"model": "a" * 65}).encode(), b'{"model": " pricing"}',
], ids=lambda body: body[:24].decode("latin-1"))
def test_a_body_without_a_well_formed_adapter_id_gets_no_id(body: bytes):
    exchange = through(http_scope("/v1/chat/completions"), one(body))
    assert exchange.model_ids == [] and routed(exchange) == b"" and exchange.body == body


@pytest.mark.parametrize("parameters", [None, "pricing", ["pricing"], {"adapter_id": 3}, {"adapter_id": "a/b"}])
def test_a_native_body_without_a_well_formed_adapter_id_gets_no_id(parameters):
    assert through(http_scope("/generate"), one({"inputs": "Hi", "parameters": parameters})).model_ids == []


def test_the_longest_well_formed_id_is_routed():
    name = "a" * 64
    assert through(http_scope("/v1/completions"), one({"model": name})).model_ids == [name.encode()]


# ---- what is left alone ------------------------------------------------------------------------------------


def test_an_explicit_multiplexed_model_id_is_kept_and_not_duplicated():
    headers = [(MODEL_ID_HEADER, b"supply_chain"), (b"adapter_id", b"pricing")]
    exchange = through(http_scope("/generate", headers=headers), one(NATIVE))
    assert exchange.model_ids == [b"supply_chain"] and exchange.receives_before_app == 0
    assert exchange.scope["headers"] == http_scope("/generate", headers=headers)["headers"]
    assert routed(exchange) == b"supply_chain"  # the response still says what Ray routed by


@pytest.mark.parametrize("method, path", [
    ("GET", "/generate"), ("GET", "/v1/chat/completions"), ("POST", "/v1/models"), ("POST", "/info"),
    ("POST", "/generate/"), ("POST", "/v1/embeddings"), ("GET", "/health"),
])
def test_other_methods_and_paths_are_not_read(method: str, path: str):
    exchange = through(http_scope(path, method), one({**NATIVE, "model": "pricing"}))
    assert exchange.receives_before_app == 0 and exchange.model_ids == [] and routed(exchange) == b""


@pytest.mark.parametrize("scope", [{"type": "lifespan"}, {"type": "websocket", "path": "/generate", "headers": []}],
                         ids=["lifespan", "websocket"])
def test_other_scopes_pass_straight_through(scope: Scope):
    seen = []

    async def app(scope_: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope_, receive, send))

    async def receive() -> Message:
        raise AssertionError("the middleware must not read")

    async def send(message: Message) -> None:
        raise AssertionError("the middleware must not send")

    asyncio.run(AdapterRoutingMiddleware(app)(scope, receive, send))
    assert seen == [(scope, receive, send)]


# ---- learned from responses --------------------------------------------------------------------------------


def test_the_base_models_name_is_learned_and_then_not_routed():
    middleware = AdapterRoutingMiddleware(None)
    chat = {"model": "smollm2", "messages": []}
    first = through(http_scope("/v1/chat/completions"), one(chat), middleware, [(BASE_MODEL_HEADER, b"smollm2")])
    assert first.model_ids == [b"smollm2"]  # not known yet
    assert middleware.base_names == {"smollm2"}
    again = through(http_scope("/v1/chat/completions"), one(chat), middleware)
    assert again.model_ids == [] and routed(again) == b""
    native = through(http_scope("/generate"), one({"inputs": "Hi", "parameters": {"adapter_id": "smollm2"}}),
                     middleware)
    assert native.model_ids == []
    assert through(http_scope("/generate", headers=[(b"adapter_id", b"smollm2")]), one(NATIVE),
                   middleware).model_ids == []
    assert through(http_scope("/v1/completions"), one({"model": "pricing"}), middleware).model_ids == [b"pricing"]


def test_base_names_are_bounded():
    middleware = AdapterRoutingMiddleware(None)
    for i in range(MAX_BASE_NAMES + 5):
        through(http_scope("/health", "GET"), one(b""), middleware, [(BASE_MODEL_HEADER, f"base-{i}".encode())])
    assert len(middleware.base_names) == MAX_BASE_NAMES
    assert f"base-{MAX_BASE_NAMES}" not in middleware.base_names


@pytest.mark.parametrize("status", [200, 404, 503])
def test_every_response_says_what_it_was_routed_by(status: int):
    assert routed(through(http_scope("/generate"), one(NATIVE), status=status)) == b"pricing"
    plain = through(http_scope("/health", "GET"), one(b""), status=status, response_headers=[(b"x-other", b"1")])
    assert plain.response_headers == {b"x-other": b"1", ROUTED_HEADER: b""}


# ---- the callback Ray's proxy calls -------------------------------------------------------------------------


def test_proxy_middlewares_is_the_routing_middleware():
    middlewares = proxy_middlewares()
    assert len(middlewares) == 1 and isinstance(middlewares[0], Middleware)
    assert middlewares[0].cls is AdapterRoutingMiddleware


def test_the_proxy_imports_neither_torch_nor_ray():
    code = "import lorax_lite.cluster.routing, sys; print('torch' in sys.modules, 'ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


# ---- the replica's headers (deployment.py imports Ray) -------------------------------------------------------


@pytest.mark.parametrize("status, base", [(200, True), (302, True), (400, False), (404, False), (503, False)])
def test_the_replica_names_itself_always_and_the_base_model_on_success(status: int, base: bool):
    pytest.importorskip("ray", reason="Ray Serve is the optional extra `lorax-lite[cluster]`")
    from lorax_lite.cluster.deployment import ReplicaHeaders

    exchange = Exchange(one(b""))
    app = ReplicaHeaders(downstream(exchange, [(b"content-type", b"text/plain")], status), "node-abc", "smollm2")
    asyncio.run(app(http_scope("/health", "GET"), exchange.receive, exchange.send))
    expected = {b"content-type": b"text/plain", b"x-replica-id": b"node-abc"}
    if base:
        expected[BASE_MODEL_HEADER] = b"smollm2"
    assert exchange.response_headers == expected
    assert exchange.sent[1] == {"type": "http.response.body", "body": b"ok"}


# ---- launch.proxy_routes_by_adapter --------------------------------------------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[str, dict]]:
    """A plain HTTP server answering /health with `behaviour['status']`, marked as routed or not."""
    behaviour = {"status": 200, "routed": True}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(behaviour["status"] if self.path == "/health" else 404)
            if behaviour["routed"]:
                self.send_header(ROUTED_HEADER.decode(), "")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", behaviour
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [200, 503])
@pytest.mark.parametrize("marked", [True, False])
def test_a_proxy_is_seen_to_route_by_adapter_when_it_marks_its_responses(health_server, status: int,
                                                                          marked: bool):
    url, behaviour = health_server
    behaviour.update(status=status, routed=marked)
    assert proxy_routes_by_adapter(url, timeout_s=5) is marked


def test_no_proxy_listening_is_not_routing():
    assert proxy_routes_by_adapter(f"http://127.0.0.1:{free_port()}", timeout_s=0.3) is False

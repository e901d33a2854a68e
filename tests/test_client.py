"""lorax_lite.client against a real server: create_app over an AsyncLLM on the tiny model, served by
uvicorn in a background thread on a loopback port for the module; both clients talk to it over TCP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_helpers import AdapterSpec, make_peft_adapter
from lorax_lite import LLM, AsyncLLM, SamplingParams
from lorax_lite.client import (
    AsyncClient,
    AuthenticationError,
    Client,
    GenerateResult,
    InvalidRequestError,
    LoraxLiteError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ServerUnavailableError,
    UnknownAdapterError,
)
from lorax_lite.server import create_app
from server_helpers import serve_in_thread

MODEL_NAME = "tiny-llama"
PROMPT = "The quick brown fox"
PROMPTS = ["The quick brown fox", "What is the capital of France?", "Pricing: the price", "Hello, world!", "You are a"]
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, max_model_len=128)
GREEDY = dict(max_new_tokens=6, ignore_eos_token=True)
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
DEFAULT_URL = "http://lorax.test"

@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return make_peft_adapter(model, tmp_path_factory.mktemp("client-adapter") / "pricing", AdapterSpec(rank=4, alpha=8, seed=3))


@pytest.fixture(scope="module")
def base_url(tiny_llama_dir: Path, adapter_dir: Path) -> Iterator[str]:
    """The server's URL: uvicorn in a thread, on a socket bound here to a free loopback port."""
    llm = AsyncLLM(str(tiny_llama_dir), **ENGINE)
    llm.add_adapter("pricing", adapter_dir)
    try:
        with serve_in_thread(create_app(llm, MODEL_NAME)) as url:
            yield url
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_llama_dir: Path, adapter_dir: Path) -> LLM:
    offline = LLM(str(tiny_llama_dir), **ENGINE)
    offline.add_adapter("pricing", adapter_dir)
    return offline


@pytest.fixture
def client(base_url: str) -> Iterator[Client]:
    with Client(base_url) as client:
        yield client


def run_async(base_url: str, work, **client_kw):
    """Run `work(async_client)` to completion in a fresh event loop."""

    async def go():
        async with AsyncClient(base_url, **client_kw) as client:
            return await work(client)

    return asyncio.run(go())


def outcome(result: GenerateResult) -> tuple:
    return result.generated_text, [t.id for t in result.details.tokens], result.details.finish_reason


class CountingTransport(httpx.AsyncBaseTransport):
    """The network transport, counting requests in flight (sent, response not yet begun)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.num_in_flight = 0
        self.max_in_flight = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.num_in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.num_in_flight -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("adapter_id", [None, "pricing"])
def test_generate_greedy_matches_offline(client, offline, adapter_id):
    result = client.generate(PROMPT, adapter_id=adapter_id, **GREEDY)
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), adapter_ids=adapter_id)[0]
    assert result.generated_text == expected.text
    assert [t.id for t in result.details.tokens] == expected.token_ids
    assert result.details.finish_reason == "length" and result.details.generated_tokens == 6
    assert result.details.prompt_tokens == len(expected.prompt_token_ids)


def test_adapter_changes_the_output_and_stream_joins_to_generate(client):
    base = client.generate(PROMPT, **GREEDY)
    tuned = client.generate(PROMPT, adapter_id="pricing", **GREEDY)
    assert tuned.generated_text != base.generated_text
    items = list(client.generate_stream(PROMPT, adapter_id="pricing", **GREEDY))
    assert "".join(item.token.text for item in items) == tuned.generated_text
    assert [item.token.id for item in items] == [t.id for t in tuned.details.tokens]
    assert all(item.details is None for item in items[:-1])
    assert items[-1].generated_text == tuned.generated_text and items[-1].details.generated_tokens == 6


def test_async_generate_and_stream_match_sync(client, base_url):
    expected = client.generate(PROMPT, adapter_id="pricing", **GREEDY)

    async def work(aclient: AsyncClient):
        result = await aclient.generate(PROMPT, adapter_id="pricing", **GREEDY)
        items = [item async for item in aclient.generate_stream(PROMPT, adapter_id="pricing", **GREEDY)]
        return result, items

    result, items = run_async(base_url, work)
    assert outcome(result) == outcome(expected)
    assert "".join(item.token.text for item in items) == expected.generated_text


@pytest.mark.parametrize("concurrency", [1, 4])
def test_generate_many_in_prompt_order_with_per_prompt_adapters(client, base_url, concurrency):
    adapters = [None, "pricing", "pricing", None, "pricing"]
    expected = [client.generate(p, adapter_id=a, **GREEDY) for p, a in zip(PROMPTS, adapters)]
    results = run_async(base_url, lambda c: c.generate_many(PROMPTS, adapter_id=adapters, concurrency=concurrency, **GREEDY))
    assert [outcome(r) for r in results] == [outcome(e) for e in expected]  # logprobs vary with batching
    one_adapter = run_async(base_url, lambda c: c.generate_many(PROMPTS, adapter_id="pricing", concurrency=concurrency, **GREEDY))
    assert [r.generated_text for r in one_adapter] == [client.generate(p, "pricing", **GREEDY).generated_text for p in PROMPTS]


@pytest.mark.parametrize("concurrency", [1, 3])
def test_generate_many_bounds_requests_in_flight(base_url, concurrency):
    transport = CountingTransport()
    results = run_async(base_url, lambda c: c.generate_many(PROMPTS * 2, concurrency=concurrency, **GREEDY), transport=transport)
    assert len(results) == 10 and all(isinstance(r, GenerateResult) for r in results)
    assert transport.max_in_flight == concurrency


def test_generate_many_failures_raise_or_take_their_place(base_url):
    adapters = [None, "nope", "pricing"]
    results = run_async(base_url, lambda c: c.generate_many(PROMPTS[:3], adapter_id=adapters, return_exceptions=True, **GREEDY))
    assert isinstance(results[0], GenerateResult) and isinstance(results[2], GenerateResult)
    assert isinstance(results[1], UnknownAdapterError) and results[1].status == 404
    with pytest.raises(UnknownAdapterError):
        run_async(base_url, lambda c: c.generate_many(PROMPTS[:3], adapter_id=adapters, **GREEDY))


@pytest.mark.parametrize("concurrency", [0, -1, 1.5])
def test_generate_many_refuses_bad_concurrency(base_url, concurrency):
    with pytest.raises(ValueError, match="concurrency"):
        run_async(base_url, lambda c: c.generate_many(PROMPTS, concurrency=concurrency))


def test_generate_many_refuses_an_adapter_list_of_the_wrong_length(base_url):
    with pytest.raises(ValueError, match="2 adapter ids for 5 prompts"):
        run_async(base_url, lambda c: c.generate_many(PROMPTS, adapter_id=["pricing", None]))


def test_unknown_adapter_raises_unknown_adapter_error(client):
    with pytest.raises(UnknownAdapterError, match="nope") as info:
        client.generate(PROMPT, adapter_id="nope", **GREEDY)
    assert info.value.status == 404 and info.value.error_type == "not_found"
    with pytest.raises(UnknownAdapterError):
        list(client.generate_stream(PROMPT, adapter_id="nope", **GREEDY))


def test_a_wrong_base_url_is_no_unknown_adapter_error(base_url):
    with Client(base_url + "/not-the-api") as client, pytest.raises(LoraxLiteError, match="HTTP 404") as info:
        client.generate(PROMPT, max_new_tokens=2)
    assert type(info.value) is LoraxLiteError and info.value.error_type == "unknown_route"


@pytest.mark.parametrize("params, field", [({"temperature": "hot"}, "temperature"), ({"max_new_tokens": 0}, "max_new_tokens"),
                                           ({"beam_width": 2}, "beam_width")])
def test_bad_parameter_raises_invalid_request_naming_it(client, params, field):
    with pytest.raises(InvalidRequestError, match=field) as info:
        client.generate(PROMPT, **params)
    assert info.value.status == 422 and info.value.error_type == "validation"


def test_unreachable_server_raises_unavailable(base_url):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with Client(url) as client:
        assert client.health() is False
        with pytest.raises(ServerUnavailableError, match=f"cannot reach the lorax-lite server at {url}"):
            client.generate(PROMPT)
        with pytest.raises(ServerUnavailableError, match="cannot reach"):
            list(client.generate_stream(PROMPT))
    with pytest.raises(ServerUnavailableError, match="cannot reach"):
        run_async(url, lambda c: c.generate(PROMPT))


def test_health_and_models(client, base_url):
    assert client.health() is True
    assert client.models() == [MODEL_NAME, "pricing"]
    assert run_async(base_url, lambda c: c.models()) == [MODEL_NAME, "pricing"]
    assert run_async(base_url, lambda c: c.health()) is True


@pytest.mark.parametrize("adapter_id", [None, "pricing"])
def test_chat_matches_offline_and_stream_joins_to_it(client, offline, base_url, adapter_id):
    result = client.chat(MESSAGES, adapter_id=adapter_id, max_tokens=6, temperature=0)
    expected = offline.chat(MESSAGES, SamplingParams(max_tokens=6, temperature=0), adapter_id=adapter_id)[0]
    assert result.content == expected.text
    assert result.finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == len(expected.token_ids)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert "".join(client.chat_stream(MESSAGES, adapter_id=adapter_id, max_tokens=6, temperature=0)) == result.content

    async def work(aclient: AsyncClient):
        return await aclient.chat(MESSAGES, adapter_id, 6, 0), "".join([d async for d in aclient.chat_stream(MESSAGES, adapter_id, 6, 0)])

    again, streamed = run_async(base_url, work)
    assert (again.content, again.finish_reason, streamed) == (result.content, result.finish_reason, result.content)
    assert again.usage == dataclasses.replace(result.usage, cached_tokens=again.usage.cached_tokens)
    assert again.usage.cached_tokens > 0  # the same prompt again: its full blocks came from the prefix cache


def test_chat_errors_parse_the_openai_body(client):
    with pytest.raises(UnknownAdapterError, match="nope") as info:
        client.chat(MESSAGES, adapter_id="nope", max_tokens=4)
    assert info.value.status == 404 and info.value.param == "model"
    with pytest.raises(InvalidRequestError, match="temperature") as info:
        client.chat(MESSAGES, max_tokens=4, temperature=5)
    assert info.value.status == 400 and info.value.param == "temperature"
    with pytest.raises(UnknownAdapterError):
        list(client.chat_stream(MESSAGES, adapter_id="nope", max_tokens=4))


def sse(*events: object) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


TOKEN_EVENT = {"token": {"id": 1, "text": "a", "logprob": -0.1, "special": False}, "generated_text": None, "details": None}


@pytest.mark.parametrize("method, events, error, error_type", [
    ("generate_stream", [TOKEN_EVENT, {"error": "boom: the engine stopped", "error_type": "unavailable"}], ServerUnavailableError, "unavailable"),
    ("generate_stream", [TOKEN_EVENT, {"error": "boom", "error_type": "generation"}], LoraxLiteError, "generation"),
    ("chat_stream", [{"error": {"message": "boom", "type": "server_error", "param": None, "code": "generation"}}, "[DONE]"],
     LoraxLiteError, "generation"),
])
def test_an_error_event_mid_stream_raises(method, events, error, error_type):
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=sse(*events)))
    prompt = MESSAGES if method == "chat_stream" else PROMPT
    with Client(transport=transport) as client, pytest.raises(error, match="boom") as info:
        for _ in getattr(client, method)(prompt, adapter_id="pricing"):
            pass
    assert info.value.status is None and info.value.error_type == error_type


def test_overloaded_carries_retry_after_503_is_unavailable_and_a_missing_route_is_no_adapter_error():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generate":
            return httpx.Response(429, json={"error": "the server is overloaded", "error_type": "overloaded"}, headers={"Retry-After": "2"})
        if request.url.path == "/v1/models":
            return httpx.Response(404, json={"detail": "Not Found"})  # FastAPI's answer for a route it lacks
        return httpx.Response(503, json={"error": "the engine is not running", "error_type": "unavailable"})

    with Client(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(OverloadedError) as info:
            client.generate(PROMPT)
        assert info.value.status == 429 and info.value.retry_after == 2.0
        with pytest.raises(ServerUnavailableError, match="not running"):
            list(client.generate_stream(PROMPT))
        assert client.health() is False
        with pytest.raises(LoraxLiteError, match="HTTP 404: Not Found") as info:
            client.models()
        assert type(info.value) is LoraxLiteError


@pytest.mark.parametrize("status, body, error", [
    (503, {"error": "the server is shutting down", "error_type": "shutting_down"}, ServerUnavailableError),
    (503, {"error": {"message": "the adapter registry is unreachable", "type": "service_unavailable",
                     "param": "model", "code": "registry_unavailable"}}, ServerUnavailableError),
    (504, {"error": "the request timed out before its first token", "error_type": "timeout"}, RequestTimeoutError),
    (408, {"error": "the request body did not arrive", "error_type": "request_timeout"}, RequestTimeoutError),
])
def test_unavailable_and_timeout_answers_carry_their_type_and_retry_after(status, body, error):
    answer = lambda request: httpx.Response(status, json=body, headers={"Retry-After": "3"})  # noqa: E731
    with Client(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(error) as info:
            client.generate(PROMPT)
    assert info.value.status == status and info.value.retry_after == 3.0


KEY = "llk_0123456789ab_" + "s" * 43
MODELS = {"object": "list", "data": [{"id": MODEL_NAME}, {"id": "pricing"}]}


def recording_transport(seen: list[httpx.Request], async_: bool = False):
    """A MockTransport answering /v1/models, recording every request it gets."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=MODELS)

    async def answer_async(request: httpx.Request) -> httpx.Response:
        return answer(request)

    return httpx.MockTransport(answer_async if async_ else answer)


@pytest.mark.parametrize("api_key, env, sent", [
    (KEY, None, f"Bearer {KEY}"),
    (None, KEY, f"Bearer {KEY}"),  # LORAX_API_KEY
    ("llk_ffffffffffff_" + "x" * 43, KEY, "Bearer llk_ffffffffffff_" + "x" * 43),  # api_key= wins
    (None, None, None),
    (None, "", None),
    ("", KEY, None),  # api_key="" sends none even with LORAX_API_KEY set
])
def test_the_api_key_is_sent_as_a_bearer_token_on_every_request(monkeypatch, api_key, env, sent):
    if env is None:
        monkeypatch.delenv("LORAX_API_KEY", raising=False)
    else:
        monkeypatch.setenv("LORAX_API_KEY", env)
    seen: list[httpx.Request] = []
    with Client(transport=recording_transport(seen), api_key=api_key, headers={"X-Trace": "1"}) as client:
        client.models()
        client.health()
    run_async(DEFAULT_URL, lambda c: c.models(), transport=recording_transport(seen, async_=True), api_key=api_key)
    assert len(seen) == 3
    assert [r.headers.get("authorization") for r in seen] == [sent] * 3
    assert seen[0].headers["x-trace"] == "1"  # the caller's headers are kept


def test_the_api_key_is_in_no_repr_or_error_message(monkeypatch):
    monkeypatch.delenv("LORAX_API_KEY", raising=False)
    body = {"error": "the API key is unknown", "error_type": "unauthorized"}
    refuse = httpx.MockTransport(lambda request: httpx.Response(401, json=body, headers={"WWW-Authenticate": "Bearer"}))
    with Client(transport=refuse, api_key=KEY) as client, pytest.raises(AuthenticationError) as info:
        client.generate(PROMPT)
    secret = KEY.rsplit("_", 1)[1]
    assert secret not in repr(client)
    assert secret not in str(info.value) and secret not in repr(info.value)


AUTH_ANSWERS = [
    (401, {"error": "missing API key: send Authorization: Bearer KEY", "error_type": "unauthorized"},
     AuthenticationError, "unauthorized"),
    (401, {"error": {"message": "the API key is revoked", "type": "authentication_error", "param": None,
                     "code": "invalid_api_key"}}, AuthenticationError, "invalid_api_key"),
    (403, {"error": "this key may not use the base model", "error_type": "forbidden"},
     PermissionDeniedError, "forbidden"),
    (403, {"error": {"message": "this key may not use the base model", "type": "permission_error", "param": "model",
                     "code": "forbidden"}}, PermissionDeniedError, "forbidden"),
    (429, {"error": "rate limit: 60 requests per minute", "error_type": "rate_limited"},
     RateLimitError, "rate_limited"),
    (429, {"error": {"message": "rate limit: 60 requests per minute", "type": "rate_limit_error", "param": None,
                     "code": "rate_limited"}}, RateLimitError, "rate_limited"),
    (429, {"error": {"message": "the server is overloaded", "type": "server_error", "param": None,
                     "code": "overloaded"}}, OverloadedError, "overloaded"),
]


@pytest.mark.parametrize("status, body, error, error_type", AUTH_ANSWERS)
@pytest.mark.parametrize("method", ["generate", "generate_stream", "chat", "chat_stream"])
def test_refusals_of_the_key_raise_their_class_in_both_body_formats(status, body, error, error_type, method):
    answer = lambda request: httpx.Response(status, json=body, headers={"Retry-After": "7"})  # noqa: E731
    prompt = MESSAGES if method.startswith("chat") else PROMPT
    with Client(transport=httpx.MockTransport(answer), api_key=KEY) as client, pytest.raises(error) as info:
        result = getattr(client, method)(prompt, adapter_id="pricing")
        if method.endswith("stream"):
            list(result)
    assert type(info.value) is error and info.value.status == status and info.value.error_type == error_type
    assert info.value.retry_after == 7.0 and f"HTTP {status}" in str(info.value)
    assert isinstance(info.value, OverloadedError) == (status == 429)  # code catching OverloadedError still works


@pytest.mark.parametrize("status, body, error, error_type", AUTH_ANSWERS[::2])
def test_the_async_client_raises_the_same_classes(status, body, error, error_type):
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    with pytest.raises(error) as info:
        run_async(DEFAULT_URL, lambda c: c.generate(PROMPT), transport=httpx.MockTransport(answer), api_key=KEY)
    assert info.value.status == status and info.value.error_type == error_type


def test_a_rate_limit_event_mid_stream_is_a_rate_limit_error():
    events = [TOKEN_EVENT, {"error": "rate limit: tokens per minute", "error_type": "rate_limited"}]
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=sse(*events)))
    with Client(transport=transport) as client, pytest.raises(RateLimitError) as info:
        list(client.generate_stream(PROMPT))
    assert info.value.status is None

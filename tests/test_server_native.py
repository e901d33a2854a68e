"""The native LoRAX/TGI API over an AsyncLLM on the tiny model, driven in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_helpers import AdapterSpec, make_peft_adapter
from lorax_lite import LLM, AsyncLLM, SamplingParams
from lorax_lite.server import create_app
from engine_helpers import wait_until_idle
from server_helpers import call
from lorax_lite.server.auth import ANONYMOUS
from lorax_lite.server.generation import Generation
from lorax_lite.server.calls import ClientDisconnected, run_to_end_or_abort
from lorax_lite.server.schemas import GenerateRequest

MODEL_NAME = "tiny-llama"
PROMPT = "The quick brown fox"
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, max_model_len=128)


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return make_peft_adapter(model, tmp_path_factory.mktemp("server-adapter") / "pricing", AdapterSpec(rank=4, alpha=8, seed=3))


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, adapter_dir: Path):
    llm = AsyncLLM(str(tiny_llama_dir), **ENGINE)
    llm.add_adapter("pricing", adapter_dir)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, MODEL_NAME)


@pytest.fixture(scope="module")
def offline(tiny_llama_dir: Path, adapter_dir: Path) -> LLM:
    offline = LLM(str(tiny_llama_dir), **ENGINE)
    offline.add_adapter("pricing", adapter_dir)
    return offline



def body(max_new_tokens: int = 8, inputs: str = PROMPT, **params) -> dict:
    return {"inputs": inputs, "parameters": {"max_new_tokens": max_new_tokens, "ignore_eos_token": True, **params}}


def sse_events(resp: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data:"):]) for line in resp.text.splitlines() if line.startswith("data:")]


@pytest.mark.parametrize("adapter_id", [None, "pricing"])
def test_generate_greedy_matches_offline(app, offline, adapter_id):
    headers = {"adapter_id": adapter_id} if adapter_id else {}
    resp = call(app, "POST", "/generate", json=body(12, details=True), headers=headers)
    assert resp.status_code == 200, resp.text
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), adapter_ids=adapter_id)[0]
    data = resp.json()
    assert data["generated_text"] == expected.text
    details = data["details"]
    assert [t["id"] for t in details["tokens"]] == expected.token_ids
    logprobs = [t["logprob"] for t in details["tokens"]]
    assert logprobs == pytest.approx(expected.logprobs, abs=1e-5) and all(lp <= 0 for lp in logprobs)
    assert "".join(t["text"] for t in details["tokens"]) == expected.text
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 12
    assert details["prompt_tokens"] == len(expected.prompt_token_ids) and details["prefill"] == []
    assert resp.headers["x-adapter-id"] == (adapter_id or MODEL_NAME)
    assert resp.headers["x-generated-tokens"] == "12"
    assert resp.headers["x-prompt-tokens"] == str(len(expected.prompt_token_ids))
    for name in ("x-queue-time", "x-time-to-first-token", "x-inference-time"):
        assert resp.headers[name].isdigit()


def test_adapter_by_header_or_parameter_gives_the_same_text(app):
    texts = {
        where: call(app, "POST", "/generate", json=b, headers=h).json()["generated_text"]
        for where, b, h in [
            ("header", body(), {"adapter_id": "pricing"}),
            ("x-header", body(), {"X-Adapter-Id": "pricing"}),
            ("parameter", body(adapter_id="pricing"), {}),
            ("both, agreeing", body(adapter_id="pricing"), {"adapter_id": "pricing"}),
        ]
    }
    base = call(app, "POST", "/generate", json=body()).json()["generated_text"]
    assert len(set(texts.values())) == 1, texts
    assert texts["header"] != base  # the adapter changes the output
    assert call(app, "POST", "/generate", json=body(adapter_id=MODEL_NAME)).json()["generated_text"] == base


def test_details_only_when_asked_and_return_full_text(app):
    plain = call(app, "POST", "/generate", json=body()).json()
    assert "details" not in plain
    full = call(app, "POST", "/generate", json=body(return_full_text=True)).json()
    assert full["generated_text"] == PROMPT + plain["generated_text"]
    details = call(app, "POST", "/generate", json=body(details=True, decoder_input_details=True)).json()["details"]
    assert len(details["prefill"]) == details["prompt_tokens"] > 0


def test_stop_sequence(app):
    text = call(app, "POST", "/generate", json=body(16)).json()["generated_text"]
    stop = text.strip()[2:5]
    resp = call(app, "POST", "/generate", json=body(16, stop=[stop], details=True)).json()
    assert resp["generated_text"] == text[: text.index(stop)]
    assert resp["details"]["finish_reason"] == "stop_sequence"


def test_conflicting_adapters_are_a_400(app):
    resp = call(app, "POST", "/generate", json=body(adapter_id="pricing"), headers={"adapter_id": "other"})
    assert resp.status_code == 400 and "conflicting adapter ids" in resp.json()["error"]


def test_unknown_adapter_is_a_404_and_invalid_id_a_400(app):
    resp = call(app, "POST", "/generate", json=body(), headers={"adapter_id": "nope"})
    assert resp.status_code == 404 and "nope" in resp.json()["error"]
    assert resp.json()["error_type"] == "not_found"
    resp = call(app, "POST", "/generate_stream", json=body(adapter_id="nope"))
    assert resp.status_code == 404
    resp = call(app, "POST", "/generate", json=body(adapter_id="../etc/passwd"))
    assert resp.status_code == 400 and "invalid adapter id" in resp.json()["error"]


@pytest.mark.parametrize(
    "name, value",
    [
        ("best_of", 2),
        ("watermark", True),
        ("response_format", {"type": "json_object", "schema": {}}),
        ("merged_adapters", {"ids": ["a", "b"], "weights": [0.5, 0.5], "density": 1.0}),
        ("typical_p", 0.5),
        ("truncate", 10),
        ("adapter_source", "hub"),
        ("api_token", "secret"),
        ("return_k_alternatives", 3),
    ],
)
def test_unsupported_parameters_are_a_422_naming_them(app, name, value):
    resp = call(app, "POST", "/generate", json=body(**{name: value}))
    assert resp.status_code == 422, resp.text
    assert f"`{name}`" in resp.json()["error"] and resp.json()["error_type"] == "validation"


def test_lorax_client_defaults_are_accepted(app):
    """What lorax-client 0.6 sends for generate(prompt): every parameter, at its default."""
    params = dict(adapter_id=None, adapter_source=None, merged_adapters=None, api_token=None, best_of=None,
                  details=True, do_sample=False, max_new_tokens=4, ignore_eos_token=False, repetition_penalty=None,
                  return_full_text=False, seed=None, stop=[], temperature=None, top_k=None, top_p=None,
                  truncate=None, typical_p=None, watermark=False, response_format=None,
                  decoder_input_details=False, return_k_alternatives=None)
    resp = call(app, "POST", "/", json={"inputs": PROMPT, "parameters": params, "stream": False})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    "payload, field",
    [
        (body(temperature=-1.0), "temperature"),
        (body(top_p=1.5), "top_p"),
        (body(top_k=-2), "top_k"),
        (body(repetition_penalty=0), "repetition_penalty"),
        (body(max_new_tokens=0), "max_new_tokens"),
        (body(max_new_tokens="ten"), "parameters.max_new_tokens"),
        (body(seed=-1), "seed"),
        (body(do_sample="yes"), "parameters.do_sample"),
        (body(stop=[""]), "stop"),
        (body(max_new_tokens=1000), "max_new_tokens"),
        (body(inputs=""), "inputs"),
        ({"parameters": {}}, "inputs"),
        ({"inputs": 5}, "inputs"),
        (body(colour="blue"), "parameters.colour"),
        ({"inputs": PROMPT, "extra": 1}, "extra"),
    ],
)
def test_invalid_values_are_a_422_naming_the_field(app, payload, field):
    resp = call(app, "POST", "/generate", json=payload)
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["error"]


def test_malformed_json_is_a_422(app):
    resp = call(app, "POST", "/generate", content=b'{"inputs": ', headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["error_type"] == "validation"


@pytest.mark.parametrize("adapter_id", [None, "pricing"])
def test_stream_concatenates_to_the_final_text(app, adapter_id):
    headers = {"adapter_id": adapter_id} if adapter_id else {}
    resp = call(app, "POST", "/generate_stream", json=body(10), headers=headers)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp)
    assert len(events) == 10
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    final = events[-1]
    assert "".join(e["token"]["text"] for e in events) == final["generated_text"]
    assert final["details"]["finish_reason"] == "length" and final["details"]["generated_tokens"] == 10
    once = call(app, "POST", "/generate", json=body(10), headers=headers).json()["generated_text"]
    assert final["generated_text"] == once


def test_root_endpoint_in_both_modes(app):
    once = call(app, "POST", "/", json={**body(6, details=True), "stream": False})
    assert once.status_code == 200 and isinstance(once.json(), list) and len(once.json()) == 1
    streamed = sse_events(call(app, "POST", "/", json={**body(6), "stream": True}))
    assert streamed[-1]["generated_text"] == once.json()[0]["generated_text"]
    assert len(streamed) == once.json()[0]["details"]["generated_tokens"]


def test_sampling_with_a_seed_is_reproducible(app):
    params = dict(do_sample=True, temperature=0.9, top_k=20, seed=7, details=True)
    first, second = (call(app, "POST", "/generate", json=body(8, **params)).json() for _ in range(2))
    assert first["generated_text"] == second["generated_text"] and first["details"]["seed"] == 7


def test_health_and_info(app, llm):
    assert call(app, "GET", "/health").status_code == 200
    info = call(app, "GET", "/info").json()
    assert info["model_id"] == MODEL_NAME and "model" not in info["engine_config"]
    assert info["engine_config"]["max_num_batched_tokens"] == 64 and info["max_model_len"] == 128
    assert "pricing" in info["adapters"]["added"] and "pricing" in info["adapters"]["host"]
    assert len(info["adapters"]["slots"]) == llm.config.max_loras


def test_health_is_503_once_the_engine_stopped(tiny_llama_dir):
    stopped = AsyncLLM(str(tiny_llama_dir), **ENGINE)
    stopped.shutdown()
    response = call(create_app(stopped, MODEL_NAME), "GET", "/health")
    assert response.status_code == 503 and response.json()["error_type"] == "unavailable"


class DisconnectingRequest:
    """Stands in for a Starlette request (of a server without keys) whose client leaves once `left` is set."""

    def __init__(self) -> None:
        self.left = asyncio.Event()
        self.scope = {"type": "http", "state": {"principal": ANONYMOUS}}

    async def receive(self) -> dict:
        await self.left.wait()
        return {"type": "http.disconnect"}


def aborted_count(app, adapter: str) -> float:
    return app.state.server.metrics.requests.labels(adapter, "aborted")._value.get()


def test_disconnect_aborts_a_non_streaming_request(app, llm, monkeypatch):
    before = aborted_count(app, "pricing")
    held, release = threading.Event(), threading.Event()
    step = llm.engine.step

    def holding_step():  # once the request's 3rd token is out, the engine waits until the client has left
        if held.is_set():
            release.wait(timeout=30)  # no assert: an error here would kill the shared engine thread
        outputs = step()
        if any(o.adapter_id == "pricing" and o.num_generated_tokens >= 3 for o in outputs):
            held.set()
        return outputs

    monkeypatch.setattr(llm.engine, "step", holding_step)

    async def go():
        client = DisconnectingRequest()
        gen = await Generation.start(app.state.server, client, GenerateRequest(**body(100, adapter_id="pricing")),
                                     "pricing")

        def on_output(out):
            gen.advance(out)
            if len(gen.tokens) >= 3:
                client.left.set()  # the client leaves once 3 of its 100 tokens are out

        try:
            with pytest.raises(ClientDisconnected):
                await run_to_end_or_abort(gen.call, client, on_output=on_output)
        finally:
            release.set()
        return gen

    gen = asyncio.run(go())
    assert 3 <= len(gen.tokens) < 100
    wait_until_idle(llm)
    assert llm.engine.adapter_manager.refcount("pricing") == 0
    assert aborted_count(app, "pricing") == before + 1


def test_leaving_a_stream_early_aborts_the_request(app, llm):
    async def go():
        gen = await Generation.start(app.state.server, DisconnectingRequest(), GenerateRequest(**body(100)), None)
        events = gen.stream_events()
        seen = [await events.__anext__() for _ in range(3)]
        await events.aclose()  # what Starlette does when the client goes away
        return seen

    assert len(asyncio.run(go())) == 3
    wait_until_idle(llm)


def test_every_way_a_request_ends_leaves_the_engine_idle(app, llm):
    """Finished, streamed, refused and left early: afterwards nothing is held (this test's own requests)."""
    assert call(app, "POST", "/generate", json=body(4, adapter_id="pricing")).status_code == 200
    assert call(app, "POST", "/generate_stream", json=body(4)).status_code == 200
    assert call(app, "POST", "/generate", json=body(4, adapter_id="no-such-adapter")).status_code == 404
    assert call(app, "POST", "/generate", json=body(10**6)).status_code == 422

    async def leave_a_stream():
        gen = await Generation.start(app.state.server, DisconnectingRequest(),
                                     GenerateRequest(**body(100, adapter_id="pricing")), "pricing")
        events = gen.stream_events()
        await events.__anext__()
        await events.aclose()

    asyncio.run(leave_a_stream())
    wait_until_idle(llm)
    llm.engine.check_invariants(idle=True)

"""The OpenAI-compatible routes, /metrics and the request limits over an AsyncLLM on the tiny model
with a registry, driven in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from lora_helpers import AdapterSpec, make_peft_adapter
from lorax_lite import LLM, AsyncLLM, SamplingParams
from lorax_lite.engine.prefix_cache import PrefixCacheStats
from lorax_lite.engine.stats import AdapterCacheSnapshot, EngineSnapshot, EngineStats, PrefixCacheSnapshot
from lorax_lite.lora.manager import AdapterCacheStats
from lorax_lite.registry import admin
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.store import AdapterStore
from lorax_lite.server import create_app
from lorax_lite.server.metrics import EngineCollector
from lorax_lite.config import ServerLimits
from engine_helpers import wait_until_idle
from server_helpers import call

MODEL_NAME = "tiny-llama"
ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=64, max_model_len=128)
SYSTEM_PROMPT = "You answer questions about pricing."
QUESTION = [{"role": "user", "content": "What is the discount for gold customers?"}]


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("openai-adapters")
    return {name: make_peft_adapter(model, root / name, AdapterSpec(rank=4, alpha=8, seed=seed))
            for name, seed in (("pricing", 5), ("logistics", 6))}


@pytest.fixture(scope="module")
def registry(tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("openai-registry")
    registry = SQLiteRegistry(root / "registry.db")
    admin.register(registry, AdapterStore(root / "store"), "pricing", adapters["pricing"], tiny_llama_dir,
                   owner="pricing-team", system_prompt=SYSTEM_PROMPT)
    yield registry
    registry.close()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path, registry, adapters: dict[str, Path]):
    llm = AsyncLLM(str(tiny_llama_dir), registry=registry, **ENGINE)
    llm.add_adapter("logistics", adapters["logistics"])  # added by path: no system prompt
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, MODEL_NAME, ServerLimits(max_queued_requests=8, max_body_bytes=4096))


@pytest.fixture(scope="module")
def offline(tiny_llama_dir: Path, adapters: dict[str, Path]) -> LLM:
    offline = LLM(str(tiny_llama_dir), **ENGINE)
    for name, path in adapters.items():
        offline.add_adapter(name, path)
    return offline



def chat_body(model: str = MODEL_NAME, messages: list[dict] = QUESTION, **fields) -> dict:
    return {"model": model, "messages": messages, "max_tokens": 10, "temperature": 0, "ignore_eos": True, **fields}


def sse_payloads(resp: httpx.Response) -> list[dict | str]:
    data = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("model", [MODEL_NAME, "logistics"])
def test_chat_greedy_matches_offline_chat(app, offline, model):
    resp = call(app, "POST", "/v1/chat/completions", json=chat_body(model))
    assert resp.status_code == 200, resp.text
    data = resp.json()
    adapter = None if model == MODEL_NAME else model
    expected = offline.chat(QUESTION, GREEDY, adapter_id=adapter)[0]
    assert data["object"] == "chat.completion" and data["model"] == model and data["id"].startswith("chatcmpl-")
    assert data["choices"] == [{"index": 0, "message": {"role": "assistant", "content": expected.text},
                                "logprobs": None, "finish_reason": "length"}]
    usage = dict(data["usage"])
    assert 0 <= usage.pop("prompt_tokens_details")["cached_tokens"] < len(expected.prompt_token_ids)  # prefix cache
    assert usage == {"prompt_tokens": len(expected.prompt_token_ids), "completion_tokens": 10,
                     "total_tokens": len(expected.prompt_token_ids) + 10}
    assert resp.headers["x-adapter-id"] == model and resp.headers["x-generated-tokens"] == "10"


def test_registered_system_prompt_is_used_when_the_request_has_none(app, offline):
    resp = call(app, "POST", "/v1/chat/completions", json=chat_body("pricing"))
    assert resp.status_code == 200, resp.text
    with_system = [{"role": "system", "content": SYSTEM_PROMPT}, *QUESTION]
    expected = offline.chat(with_system, GREEDY, adapter_id="pricing")[0]
    assert resp.json()["choices"][0]["message"]["content"] == expected.text
    assert resp.json()["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)
    own = [{"role": "system", "content": "Be brief."}, *QUESTION]  # the request's own system prompt wins
    resp = call(app, "POST", "/v1/chat/completions", json=chat_body("pricing", own))
    assert resp.json()["usage"]["prompt_tokens"] == len(offline.chat(own, GREEDY, adapter_id="pricing")[0].prompt_token_ids)


def test_developer_role_and_text_parts_are_accepted(app):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert call(app, "POST", "/v1/chat/completions", json=chat_body(messages=messages)).status_code == 200


@pytest.mark.parametrize("model", [MODEL_NAME, "pricing"])
def test_chat_stream_concatenates_to_the_non_streamed_answer(app, model):
    whole = call(app, "POST", "/v1/chat/completions", json=chat_body(model)).json()
    resp = call(app, "POST", "/v1/chat/completions", json=chat_body(model, stream=True, stream_options={"include_usage": True}))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    chunks, usage_chunk = payloads[:-2], payloads[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] and c["usage"] is None for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_stream_without_include_usage_has_no_usage_field(app):
    payloads = sse_payloads(call(app, "POST", "/v1/chat/completions", json=chat_body(stream=True)))
    assert payloads[-1] == "[DONE]" and all("usage" not in p for p in payloads[:-1])


def test_completions_match_the_native_api(app):
    prompt = "The quick brown fox"
    native = call(app, "POST", "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 8, "ignore_eos_token": True}})
    body = {"model": "logistics", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    resp = call(app, "POST", "/v1/completions", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "text_completion" and data["choices"][0]["finish_reason"] == "length"
    native_adapter = call(app, "POST", "/generate", headers={"adapter_id": "logistics"},
                          json={"inputs": prompt, "parameters": {"max_new_tokens": 8, "ignore_eos_token": True}})
    assert data["choices"][0]["text"] == native_adapter.json()["generated_text"] != native.json()["generated_text"]
    echoed = call(app, "POST", "/v1/completions", json={**body, "echo": True, "prompt": [prompt]}).json()
    assert echoed["choices"][0]["text"] == prompt + data["choices"][0]["text"]
    streamed = sse_payloads(call(app, "POST", "/v1/completions", json={**body, "stream": True}))
    assert "".join(p["choices"][0]["text"] for p in streamed[:-1]) == data["choices"][0]["text"]


def test_completions_default_to_16_tokens_and_accept_token_ids(app):
    ids = call(app, "POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": [5, 6, 7], "temperature": 0, "ignore_eos": True}).json()
    assert ids["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19,
                            "prompt_tokens_details": {"cached_tokens": 0}}  # 3 tokens: not one full block


def test_models_lists_base_added_and_registered_adapters_without_paths(app):
    resp = call(app, "GET", "/v1/models")
    data = resp.json()
    assert data["object"] == "list"
    ids = [m["id"] for m in data["data"]]
    assert ids == [MODEL_NAME, "logistics", "pricing"]
    pricing = data["data"][2]
    assert pricing["owned_by"] == "pricing-team" and pricing["parent"] == MODEL_NAME and pricing["object"] == "model"
    assert "/" not in resp.text


def test_an_adapter_registered_while_serving_is_usable_and_a_removed_one_is_a_404(app, registry, adapters, tiny_llama_dir, tmp_path):
    assert call(app, "POST", "/v1/chat/completions", json=chat_body("late")).status_code == 404
    admin.register(registry, AdapterStore(tmp_path / "store"), "late", adapters["pricing"], tiny_llama_dir)
    assert call(app, "POST", "/v1/chat/completions", json=chat_body("late")).status_code == 200
    assert "late" in [m["id"] for m in call(app, "GET", "/v1/models").json()["data"]]
    registry.remove("late")
    resp = call(app, "POST", "/v1/chat/completions", json=chat_body("late"))
    assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"


OPENAI_BAD_INPUTS = [
    ("/v1/chat/completions", chat_body("no-such-adapter"), 404, "model"),
    ("/v1/chat/completions", chat_body("../etc/passwd"), 400, "model"),
    ("/v1/chat/completions", chat_body(messages=[]), 400, "messages"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "tool", "content": "x"}]), 400, "messages.0.role"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400, "messages.0.content"),
    ("/v1/chat/completions", chat_body(temperature=3), 400, "temperature"),
    ("/v1/chat/completions", chat_body(top_p=0), 400, "top_p"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens="ten"), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens=10_000), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(seed=-1), 400, "seed"),
    ("/v1/chat/completions", chat_body(n=2), 400, "n"),
    ("/v1/chat/completions", chat_body(presence_penalty=0.5), 400, "presence_penalty"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function"}]), 400, "tools"),
    ("/v1/chat/completions", chat_body(logprobs=True), 400, "logprobs"),
    ("/v1/chat/completions", chat_body(stream_options={"include_usage": True}), 400, "stream_options"),
    ("/v1/chat/completions", chat_body(unknown_field=1), 400, "unknown_field"),
    ("/v1/chat/completions", {"messages": QUESTION}, 400, "model"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": ""}, 400, None),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [10**9]}, 400, None),
]


@pytest.mark.parametrize("path,payload,status,param", OPENAI_BAD_INPUTS)
def test_bad_openai_requests_get_an_openai_error_naming_the_field(app, path, payload, status, param):
    resp = call(app, "POST", path, json=payload)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if param is not None:
        assert param.split(".")[0] in error["message"]


def test_malformed_json_and_oversized_bodies(app):
    resp = call(app, "POST", "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "malformed JSON" in resp.json()["error"]["message"]
    big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
    resp = call(app, "POST", "/v1/chat/completions", json=big)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "invalid_request_error"
    resp = call(app, "POST", "/generate", json={"inputs": "x" * 5000})
    assert resp.status_code == 413 and resp.json()["error_type"] == "payload_too_large"

    async def chunked() -> httpx.Response:  # no Content-Length: the limit applies while reading
        async def parts():
            for _ in range(10):
                yield b"x" * 1000

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/generate", content=parts(), headers={"content-type": "application/json"})

    assert asyncio.run(chunked()).status_code == 413
    assert call(app, "GET", "/health").status_code == 200


def test_a_full_queue_is_a_429_with_retry_after(app):
    state = app.state.server
    assert state.num_queued == 0  # every finished request left the count
    state.num_queued = state.limits.max_queued_requests
    try:
        resp = call(app, "POST", "/v1/chat/completions", json=chat_body())
        native = call(app, "POST", "/generate", json={"inputs": "Hi"})
    finally:
        state.num_queued = 0
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1" and resp.json()["error"]["type"] == "rate_limit_error"
    assert native.status_code == 429 and native.json()["error_type"] == "overloaded"
    assert call(app, "POST", "/v1/chat/completions", json=chat_body()).status_code == 200


def test_metrics_count_requests_tokens_and_the_adapter_cache(app):
    call(app, "POST", "/v1/chat/completions", json=chat_body("logistics"))
    call(app, "POST", "/v1/chat/completions", json=chat_body("nope-404"))
    resp = call(app, "GET", "/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for needle in [
        'lorax_requests_total{adapter="logistics",outcome="finished"}',
        'lorax_http_error_responses_total{status="404"}',
        'lorax_time_to_first_token_seconds_bucket{adapter="logistics",le="+Inf"}',
        'lorax_time_per_output_token_seconds_count{adapter="logistics"}',
        'lorax_request_queue_seconds_count{adapter="tiny-llama"}',
        'lorax_request_generated_tokens_sum{adapter="logistics"}',
        "lorax_kv_blocks_used 0.0", "lorax_kv_blocks_total", "lorax_batch_size_bucket{le=\"1\"}",
        "lorax_adapter_misses_total", "lorax_adapter_slot_hits_total", "lorax_adapter_load_seconds_total",
        "lorax_num_requests_waiting 0.0",
    ]:
        assert needle in text, needle
    assert "nope-404" not in text  # label values are adapters the engine accepted, never raw input


# ---- the Gateway API Inference Extension's gauges ---------------------------------------------------

GATEWAY = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
           "vllm:gpu_cache_usage_perc", "vllm:lora_requests_info")


def gateway_samples(text: str) -> dict[str, tuple[str, dict[str, str], float]]:
    """The inference gateway's series in a /metrics text: name -> (type, labels, value), one sample each."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name in GATEWAY:
            [sample] = family.samples
            found[family.name] = (family.type, sample.labels, sample.value)
    return found


def metric_value(text: str, name: str) -> float:
    [value] = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


def snapshot(num_waiting: int, num_running: int, waiting: tuple[str, ...], running: tuple[str, ...],
             slot_keys: list[str | None] | None) -> EngineSnapshot:
    cache = None if slot_keys is None else AdapterCacheSnapshot([], slot_keys, [], AdapterCacheStats())
    return EngineSnapshot(num_waiting=num_waiting, num_running=num_running, waiting_adapters=waiting,
                          running_adapters=running, num_kv_blocks_used=3, num_kv_blocks=12, num_preemptions=0,
                          stats=EngineStats(), adapter_cache=cache,
                          prefix_cache=PrefixCacheSnapshot(True, 0, PrefixCacheStats()))


@pytest.mark.parametrize("snap, max_lora, running, waiting", [
    (snapshot(2, 3, ("logistics",), ("logistics", "pricing"), ["pricing@2", None]), "2", "logistics,pricing",
     "logistics"),
    (snapshot(1, 0, (), (), ["pricing@2"]), "1", "", ""),
    (snapshot(1, 1, (), (), None), "0", "", ""),  # LoRA off: still reported
], ids=["adapters", "base-only", "lora-off"])
def test_the_collector_reports_a_snapshot_under_the_gateways_names(snap, max_lora, running, waiting):
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: snap))
    before = time.time()
    found = gateway_samples(generate_latest(registry).decode())
    assert {name: kind for name, (kind, _, _) in found.items()} == dict.fromkeys(GATEWAY, "gauge")
    assert found["vllm:num_requests_waiting"][2] == snap.num_waiting
    assert found["vllm:num_requests_running"][2] == snap.num_running
    assert found["vllm:kv_cache_usage_perc"][2] == found["vllm:gpu_cache_usage_perc"][2] == 0.25
    _, labels, value = found["vllm:lora_requests_info"]
    assert labels == {"max_lora": max_lora, "running_lora_adapters": running, "waiting_lora_adapters": waiting}
    assert before <= value <= time.time()


class HeldSteps:
    """Holds the engine thread before each step until `take_step`; `held` gets the number of requests in the
    engine each time it stops. `let_go` lets it run freely again."""

    def __init__(self, llm: AsyncLLM, monkeypatch: pytest.MonkeyPatch) -> None:
        self.engine, self.real_step = llm.engine, llm.engine.step
        self.turns = threading.Semaphore(0)
        self.held: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.free = False
        monkeypatch.setattr(llm.engine, "step", self.step)

    def step(self):
        if not self.free:
            snap = self.engine.snapshot()
            self.held.put(snap.num_waiting + snap.num_running)
            self.turns.acquire(timeout=30)  # no assert: an error here would kill the engine thread
        return self.real_step()

    async def next_stop(self) -> int:
        """The number of requests in the engine when it next stops."""
        return await asyncio.to_thread(self.held.get, timeout=30)

    async def take_step(self) -> int:
        """One step; returns the number of requests in the engine when it stops before the next."""
        self.turns.release()
        return await self.next_stop()

    def let_go(self) -> None:
        self.free = True
        self.turns.release(100)


@pytest.fixture
def llm_of_three(tiny_llama_dir: Path, registry, adapters: dict[str, Path]):
    """At most three requests run at once: the rest wait."""
    llm = AsyncLLM(str(tiny_llama_dir), registry=registry, **{**ENGINE, "max_num_seqs": 3, "max_loras": 2})
    llm.add_adapter("logistics", adapters["logistics"])
    yield llm
    llm.shutdown()


def test_metrics_tell_the_inference_gateway_which_adapters_run_and_wait(llm_of_three, monkeypatch):
    app = create_app(llm_of_three, MODEL_NAME, ServerLimits(max_queued_requests=8))
    held = HeldSteps(llm_of_three, monkeypatch)
    # in this order, one step apart: the first three run (max_num_seqs=3), the last three wait
    models = ["pricing", MODEL_NAME, "logistics", "logistics", MODEL_NAME, "logistics"]

    async def main() -> tuple[str, list[httpx.Response]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            sent, in_engine = [], 0
            try:
                for model in models:
                    body = {"model": model, "prompt": "Hi", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
                    sent.append(asyncio.create_task(client.post("/v1/completions", json=body)))
                    in_engine = await (held.take_step() if in_engine else held.next_stop())  # the first wakes it
                    while in_engine < len(sent):  # not in the engine yet: the others step meanwhile
                        in_engine = await held.take_step()
                await held.take_step()  # the last one's step: now the snapshot has all six
                text = (await client.get("/metrics")).text
            finally:
                held.let_go()
            return text, await asyncio.gather(*sent)

    text, responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    found = gateway_samples(text)
    assert {name: kind for name, (kind, _, _) in found.items()} == dict.fromkeys(GATEWAY, "gauge")
    assert found["vllm:num_requests_running"][2] == 3 and found["vllm:num_requests_waiting"][2] == 3
    usage = found["vllm:kv_cache_usage_perc"][2]
    assert 0 < usage < 1 and found["vllm:gpu_cache_usage_perc"][2] == usage
    assert usage == metric_value(text, "lorax_kv_blocks_used") / metric_value(text, "lorax_kv_blocks_total")
    # adapter ids as clients name them (the registered "pricing", never its adapter key), base-model ones left out
    assert found["vllm:lora_requests_info"][1] == {"max_lora": "2", "running_lora_adapters": "logistics,pricing",
                                                   "waiting_lora_adapters": "logistics"}
    wait_until_idle(llm_of_three)
    idle = gateway_samples(call(app, "GET", "/metrics").text)
    assert idle["vllm:num_requests_running"][2] == idle["vllm:num_requests_waiting"][2] == 0
    assert idle["vllm:lora_requests_info"][1] == {"max_lora": "2", "running_lora_adapters": "",
                                                  "waiting_lora_adapters": ""}


def test_a_damaged_adapter_is_a_503_that_shows_no_paths_and_disturbs_nothing(app, registry, adapters, tiny_llama_dir, tmp_path):
    record, _ = admin.register(registry, AdapterStore(tmp_path / "store"), "damaged", adapters["logistics"], tiny_llama_dir)
    weights = Path(record.store_path) / "adapter_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")  # the checksum no longer matches
    resp = call(app, "POST", "/v1/chat/completions", json=chat_body("damaged"))
    assert resp.status_code == 503, resp.text  # the store's fault, not the client's: alerts fire on 5xx
    message = resp.json()["error"]["message"]
    assert "'damaged' is unavailable" in message and "damaged or changed" in message and str(tmp_path) not in message
    assert call(app, "POST", "/v1/chat/completions", json=chat_body("logistics")).status_code == 200
    registry.remove("damaged")


def test_unknown_routes_and_methods_answer_in_the_route_familys_body(app):
    resp = call(app, "GET", "/v1/nothing-here")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_route"
    resp = call(app, "GET", "/generate")
    assert resp.status_code == 405 and "GET /generate" in resp.json()["error"]


def test_an_id_both_added_and_registered_is_listed_once(app, llm, adapters):
    llm.add_adapter("pricing", adapters["pricing"])  # now shadows the registered "pricing"
    try:
        ids = [m["id"] for m in call(app, "GET", "/v1/models").json()["data"]]
    finally:
        llm.remove_adapter("pricing")
    assert ids.count("pricing") == 1


class CountingRegistry:
    """Wraps a registry: records the thread of every `get` (the lookup of one adapter id)."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.get_threads: list[threading.Thread] = []

    def __getattr__(self, name):
        return getattr(self.registry, name)

    def get(self, adapter_id):
        self.get_threads.append(threading.current_thread())
        return self.registry.get(adapter_id)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_chat_request_reads_the_registry_once_and_never_on_the_event_loop(app, llm, offline, monkeypatch, stream):
    counting = CountingRegistry(llm.engine.catalog.registry)
    monkeypatch.setattr(llm.engine.catalog, "registry", counting)
    loop_threads = []

    async def send():
        loop_threads.append(threading.current_thread())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json=chat_body("pricing", max_tokens=6, stream=stream))

    resp = asyncio.run(send())
    assert resp.status_code == 200
    assert len(counting.get_threads) == 1 and counting.get_threads[0] is not loop_threads[0]
    if not stream:  # and the record it read gave the system prompt
        expected = offline.chat([{"role": "system", "content": SYSTEM_PROMPT}, *QUESTION],
                                SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), adapter_id="pricing")[0].text
        assert resp.json()["choices"][0]["message"]["content"] == expected

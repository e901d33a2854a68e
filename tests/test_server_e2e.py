"""`lorax-lite serve` on the default model, driven over TCP by real clients: LoRAX's `lorax-client` and
the official `openai` SDK (both unchanged, in their own venv: `make clients`), `lorax_lite.client`,
and raw HTTP for the bad inputs and the disconnects."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorax_lite.client import AsyncClient, Client, UnknownAdapterError
from lorax_lite.lora.synthetic import make_random_adapter
from lorax_lite.registry import admin
from lorax_lite.registry.sqlite import SQLiteRegistry
from lorax_lite.registry.store import AdapterStore
from server_helpers import serve

BASE = "smollm2"
PRICING_PROMPT = "You are the pricing assistant of Acme Corp."
PROMPT = "The three most important things about pricing are"
QUESTION = [{"role": "user", "content": "What is a discount?"}]
CLIENTS_DIR = Path(__file__).parent / "clients"


def clients_python() -> str:
    """The venv holding lorax-client and openai (`make clients`); skipped outside `make test` if missing."""
    python = os.environ.get("LORAX_CLIENTS_PYTHON", ".venv-clients/bin/python")
    if not Path(python).exists():
        if os.environ.get("LORAX_REQUIRE_DEFAULT_MODEL") == "1":
            pytest.fail(f"{python} is missing: run `make clients`")
        pytest.skip(f"{python} is missing: run `make clients`")
    return python


@pytest.fixture(scope="module")
def adapter_sources(default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("e2e-adapters")
    return {name: make_random_adapter(model, root / name, rank=8, alpha=16, seed=seed, std=0.3)
            for name, seed in (("pricing", 1), ("supply-chain", 2), ("late", 3))}


@pytest.fixture(scope="module")
def deployment(default_model_dir: Path, adapter_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Registry and store with two adapters registered before the server starts (`make serve` does the same)."""
    root = tmp_path_factory.mktemp("e2e-deployment")
    registry_url, store = f"sqlite:///{root / 'registry.db'}", root / "store"
    registry = SQLiteRegistry(root / "registry.db")
    admin.register(registry, AdapterStore(store), "pricing", adapter_sources["pricing"], default_model_dir,
                   owner="pricing", system_prompt=PRICING_PROMPT)
    admin.register(registry, AdapterStore(store), "supply-chain", adapter_sources["supply-chain"], default_model_dir, owner="supply-chain")
    registry.close()
    return {"registry": registry_url, "store": str(store), "model": str(default_model_dir)}


@pytest.fixture(scope="module")
def server(deployment: dict[str, str]):
    with serve("--model", deployment["model"], "--registry", deployment["registry"], "--store", deployment["store"],
               "--served-model-name", BASE, "--dtype", "float32", "--device", "cpu", "--max-loras", "2") as base:
        yield base


def lorax_client(server: str, calls: list[dict], api_key: str | None = None) -> list[dict]:
    return _run_client("lorax_client_calls.py", server, calls, api_key)


def openai_sdk(server: str, calls: list[dict], api_key: str | None = None) -> list[dict]:
    return _run_client("openai_calls.py", server, calls, api_key)


def _run_client(script: str, server: str, calls: list[dict], api_key: str | None = None) -> list[dict]:
    """Run the calls through `script` in the clients' venv; `api_key` (LORAX_TEST_API_KEY there) is sent as a
    bearer token."""
    env = {name: value for name, value in os.environ.items() if name != "LORAX_TEST_API_KEY"}
    done = subprocess.run([clients_python(), str(CLIENTS_DIR / script), server, json.dumps(calls)],
                          capture_output=True, text=True, timeout=600,
                          env={**env, "LORAX_TEST_API_KEY": api_key} if api_key else env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def admin_cli(deployment: dict[str, str], *args: str) -> None:
    cmd = [sys.executable, "-m", "lorax_lite.cli", "adapters", *args, "--registry", deployment["registry"], "--store", deployment["store"]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def metric(server: str, name: str, labels: str = "") -> float:
    """One sample of /metrics (0 when the series does not exist yet)."""
    text = httpx.get(f"{server}/metrics").text
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def generate_call(op: str = "generate", **kw) -> dict:
    return {"op": op, "prompt": PROMPT, "max_new_tokens": 12, "ignore_eos_token": True, **kw}


def test_lorax_client_generate_and_stream(server):
    base, by_param, by_header, streamed, streamed_base = lorax_client(server, [
        generate_call(), generate_call(adapter_id="pricing"), generate_call(header_adapter_id="pricing"),
        generate_call("generate_stream", adapter_id="pricing"), generate_call("generate_stream"),
    ])
    assert "error" not in base and base["generated_tokens"] == 12 and base["finish_reason"] == "length"
    assert all(lp <= 0 for lp in base["logprobs"])
    assert by_param["text"] == by_header["text"] != base["text"]
    assert by_param["token_ids"] == by_header["token_ids"]
    assert streamed["text"] == streamed["generated_text"] == by_param["text"]
    assert streamed["token_ids"] == by_param["token_ids"]
    assert streamed_base["text"] == base["text"]
    raw = httpx.post(f"{server}/generate", headers={"adapter_id": "pricing"}, timeout=120,
                     json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "ignore_eos_token": True}})
    assert raw.json()["generated_text"] == by_param["text"]
    assert raw.headers["x-adapter-id"] == "pricing" and raw.headers["x-generated-tokens"] == "12"
    assert {"x-prompt-tokens", "x-queue-time", "x-time-to-first-token", "x-inference-time"} <= set(raw.headers)


def test_lorax_lite_client_agrees_with_lorax_client(server):
    expected = lorax_client(server, [generate_call(adapter_id="pricing"), generate_call()])
    with Client(server, timeout=120) as client:
        one = client.generate(PROMPT, adapter_id="pricing", max_new_tokens=12, ignore_eos_token=True)
        streamed = list(client.generate_stream(PROMPT, adapter_id="pricing", max_new_tokens=12, ignore_eos_token=True))
        chat = client.chat(QUESTION, adapter_id="pricing", max_tokens=16, temperature=0)
        chat_streamed = "".join(client.chat_stream(QUESTION, adapter_id="pricing", max_tokens=16, temperature=0))
        assert client.models()[0] == BASE and client.health()
    assert one.generated_text == expected[0]["text"] and [t.id for t in one.details.tokens] == expected[0]["token_ids"]
    assert "".join(i.token.text for i in streamed) == streamed[-1].generated_text == one.generated_text
    assert chat.content and chat_streamed == chat.content
    sdk = openai_sdk(server, [{"op": "chat", "model": "pricing", "messages": QUESTION, "max_tokens": 16, "temperature": 0}])[0]
    assert chat.content == sdk["content"]

    async def many() -> list:
        async with AsyncClient(server, timeout=120) as client:
            return await client.generate_many([PROMPT, PROMPT, "Hello"], adapter_id=["pricing", None, None],
                                              concurrency=2, max_new_tokens=12, ignore_eos_token=True)

    results = asyncio.run(many())
    assert [r.generated_text for r in results[:2]] == [expected[0]["text"], expected[1]["text"]]


def test_openai_sdk_chat_stream_completion_and_models(server):
    with_prompt = [{"role": "system", "content": PRICING_PROMPT}, *QUESTION]
    chat = dict(messages=QUESTION, max_tokens=16, temperature=0)
    models, implicit, explicit, streamed, base_chat, completion = openai_sdk(server, [
        {"op": "models"},
        {"op": "chat", "model": "pricing", **chat},
        {"op": "chat", "model": "pricing", **{**chat, "messages": with_prompt}},
        {"op": "chat_stream", "model": "pricing", **chat},
        {"op": "chat", "model": BASE, **chat},
        {"op": "completion", "model": "supply-chain", "prompt": PROMPT, "max_tokens": 12, "temperature": 0},
    ])
    assert models["ids"][0] == BASE and {"pricing", "supply-chain"} <= set(models["ids"])
    assert implicit == explicit  # the registered system prompt is used when the request has none
    assert implicit["content"] and implicit["model"] == "pricing"
    assert streamed["content"] == implicit["content"] and streamed["usage"] == implicit["usage"]
    assert base_chat["content"] != implicit["content"]
    native = httpx.post(f"{server}/generate", headers={"adapter_id": "supply-chain"}, timeout=120,
                        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}})
    assert completion["text"] == native.json()["generated_text"]
    assert completion["finish_reason"] in ("length", "stop") and 1 <= completion["usage"]["completion_tokens"] <= 12


def test_an_adapter_registered_while_serving_then_removed(server, deployment, adapter_sources):
    before_lorax, before_openai = lorax_client(server, [generate_call(adapter_id="late")]), openai_sdk(server, [
        {"op": "chat", "model": "late", "messages": QUESTION, "max_tokens": 4}])
    assert before_lorax[0]["error"] == "NotFoundError" and before_openai[0]["status"] == 404
    admin_cli(deployment, "register", "late", str(adapter_sources["late"]), "--model", deployment["model"])
    after_lorax = lorax_client(server, [generate_call(adapter_id="late")])[0]
    after_openai = openai_sdk(server, [{"op": "chat", "model": "late", "messages": QUESTION, "max_tokens": 4},
                                       {"op": "models"}])
    assert "error" not in after_lorax and after_lorax["generated_tokens"] == 12
    assert "error" not in after_openai[0] and "late" in after_openai[1]["ids"]
    admin_cli(deployment, "remove", "late")
    removed_lorax = lorax_client(server, [generate_call(adapter_id="late")])[0]
    removed_openai = openai_sdk(server, [{"op": "chat", "model": "late", "messages": QUESTION, "max_tokens": 4}])[0]
    assert removed_lorax["error"] == "NotFoundError" and "late" in removed_lorax["message"]
    assert removed_openai["error"] == "NotFoundError" and removed_openai["status"] == 404
    with Client(server) as client, pytest.raises(UnknownAdapterError):
        client.generate(PROMPT, adapter_id="late")


GOOD = {"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}
CHAT = {"model": BASE, "messages": QUESTION, "max_tokens": 4}
BAD_INPUTS = [  # (id, method path, body (dict, or bytes sent as is), headers, expected status)
    ("unknown adapter", "/generate", GOOD, {"adapter_id": "nobody"}, 404),
    ("adapter id with a path", "/generate", GOOD, {"adapter_id": "../../etc"}, 400),
    ("conflicting adapters", "/generate", {**GOOD, "parameters": {"adapter_id": "pricing"}}, {"adapter_id": "supply-chain"}, 400),
    ("empty inputs", "/generate", {"inputs": ""}, {}, 422),
    ("missing inputs", "/generate", {"parameters": {}}, {}, 422),
    ("inputs not a string", "/generate", {"inputs": 42}, {}, 422),
    ("max_new_tokens zero", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, {}, 422),
    ("max_new_tokens a string", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": "5"}}, {}, 422),
    ("max_new_tokens past max_model_len", "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, {}, 422),
    ("temperature negative", "/generate", {"inputs": "x", "parameters": {"temperature": -1.0}}, {}, 422),
    ("top_p above 1", "/generate", {"inputs": "x", "parameters": {"top_p": 1.5, "do_sample": True}}, {}, 422),
    ("top_k negative", "/generate", {"inputs": "x", "parameters": {"top_k": -3}}, {}, 422),
    ("repetition_penalty zero", "/generate", {"inputs": "x", "parameters": {"repetition_penalty": 0}}, {}, 422),
    ("seed negative", "/generate", {"inputs": "x", "parameters": {"seed": -1}}, {}, 422),
    ("best_of 2", "/generate", {"inputs": "x", "parameters": {"best_of": 2}}, {}, 422),
    ("response_format", "/generate", {"inputs": "x", "parameters": {"response_format": {"type": "json_object"}}}, {}, 422),
    ("unknown parameter", "/generate", {"inputs": "x", "parameters": {"max_tokens": 3}}, {}, 422),
    ("malformed JSON", "/generate", b'{"inputs": "x",', {}, 422),
    ("stream with a bad value", "/generate_stream", {"inputs": "x", "parameters": {"temperature": "hot"}}, {}, 422),
    ("body over the size limit", "/generate", {"inputs": "x" * (2 << 20)}, {}, 413),
    ("openai unknown model", "/v1/chat/completions", {**CHAT, "model": "nobody"}, {}, 404),
    ("openai empty messages", "/v1/chat/completions", {**CHAT, "messages": []}, {}, 400),
    ("openai bad role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, {}, 400),
    ("openai n=3", "/v1/chat/completions", {**CHAT, "n": 3}, {}, 400),
    ("openai temperature 9", "/v1/chat/completions", {**CHAT, "temperature": 9}, {}, 400),
    ("openai malformed JSON", "/v1/chat/completions", b"[1, 2", {}, 400),
    ("openai prompt too long", "/v1/completions", {"model": BASE, "prompt": "word " * 9000, "max_tokens": 4}, {}, 400),
    ("openai max_tokens negative", "/v1/completions", {"model": BASE, "prompt": "x", "max_tokens": -1}, {}, 400),
]


def test_bad_inputs_get_a_4xx_naming_the_problem_and_leave_the_server_healthy(server):
    assert len(BAD_INPUTS) >= 20
    failures = []
    with httpx.Client(base_url=server, timeout=120) as client:
        for name, path, body, headers, status in BAD_INPUTS:
            if isinstance(body, bytes):
                resp = client.post(path, content=body, headers={"content-type": "application/json", **headers})
            else:
                resp = client.post(path, json=body, headers=headers)
            error = resp.json().get("error")
            message = error["message"] if isinstance(error, dict) else error
            if resp.status_code != status or not message:
                failures.append(f"{name}: {resp.status_code} {resp.text[:200]}")
        assert not failures, "\n".join(failures)
        assert client.get("/health").status_code == 200
        assert client.post("/generate", json=GOOD).status_code == 200
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_has_its_request_aborted_and_its_blocks_freed(server, stream):
    aborted = 'lorax_requests_total{adapter="pricing",outcome="aborted"}'
    before = metric(server, aborted)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "ignore_eos_token": True}}
    path = "/generate_stream" if stream else "/generate"
    with httpx.Client(base_url=server, headers={"adapter_id": "pricing"}) as client:
        if stream:
            with client.stream("POST", path, json=body, timeout=120) as resp:
                lines = resp.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))  # one token arrived, then we leave
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(path, json=body, timeout=1.5)
    wait_for(lambda: metric(server, aborted) == before + 1)
    # The engine thread applies the abort at its next step: the request leaves, its KV blocks are freed.
    wait_for(lambda: metric(server, "lorax_num_requests_running") == metric(server, "lorax_num_requests_waiting") == 0)
    assert metric(server, "lorax_kv_blocks_used") == 0
    assert httpx.get(f"{server}/health").status_code == 200


def test_metrics_describe_the_traffic(server):
    text = httpx.get(f"{server}/metrics").text
    for needle in ['lorax_requests_total{adapter="pricing",outcome="finished"}', 'lorax_requests_total{adapter="smollm2",outcome="finished"}',
                   "lorax_time_to_first_token_seconds_bucket", "lorax_time_per_output_token_seconds_sum",
                   "lorax_request_prompt_tokens_sum", "lorax_batch_size_count", "lorax_adapter_misses_total",
                   "lorax_adapter_evictions_total", 'lorax_http_error_responses_total{status="404"}']:
        assert needle in text, needle

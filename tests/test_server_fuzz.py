"""Schema fuzzing: schemathesis generates requests, valid and invalid, from the server's own OpenAPI
document (GET /openapi.json) and sends them to `lorax-lite serve` on the tiny model with two registered
adapters. No request may get a 5xx (nor a server error inside a 200 event stream), and an error answer
on an API route is JSON.

Bounded and repeatable: a fixed number of requests per operation, derandomized generation, and
--max-model-len 64, so no request can generate more than 64 tokens whatever max_tokens the fuzzer picks.
(schemathesis's own pytest loader, `schemathesis.pytest.from_fixture`, fails on pytest 9, so the test
drives each operation's hypothesis strategy itself.)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from lora_helpers import register_adapters
from schemathesis import APIOperation, GenerationMode
from server_helpers import ServerProcess, serve_process

MODEL_NAME = "tiny"
ADAPTERS = ("pricing", "logistics")
# Requests per operation and mode (valid, invalid); more with LORAX_FUZZ_EXAMPLES=500 (about 90 s on 2 cores).
MAX_EXAMPLES = int(os.environ.get("LORAX_FUZZ_EXAMPLES", "50"))
NATIVE_ROUTES = ("/generate", "/generate_stream", "/")
OPENAI_REFUSED = {"n", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "suffix",
                  "best_of", "response_format", "tools", "tool_choice", "functions", "max_completion_tokens"}
HTML_ROUTES = ("/chat",)  # the chat pages answer in HTML, errors included
SERVER_ERROR_TYPES = {"generation", "unavailable", "server_error", "service_unavailable"}  # 5xx classes (errors.py)


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    args = (*register_adapters(tiny_llama_dir, root, ADAPTERS), "--served-model-name", MODEL_NAME, "--dtype",
            "float32", "--device", "cpu", "--max-model-len", "64", "--max-loras", "1")
    with serve_process(*args, log=root / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess):
    # Streams are read to the end (at most 64 tokens): an error event at the end is seen too. Reports show the
    # values sent (schemathesis masks fields that look secret, and max_tokens does).
    config = schemathesis.Config.from_dict({"max-stream-events": 1000, "output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json", config=config)
    schema.hook("before_generate_case")(_steer_towards_the_engine)
    return schema


def _steer_towards_the_engine(context, strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Random model names are all 404s and random OpenAI fields mostly refusals (n, logprobs, tools, ...). So a
    third of the cases name the base model or a registered adapter (`model`, `parameters.adapter_id`, the chat
    page's id) and leave out the fields refused at non-default values; and native requests sometimes carry an
    adapter header. The odd values then reach the engine, the adapter loads and the evictions (one adapter slot
    for two adapters)."""
    known = st.sampled_from([MODEL_NAME, *ADAPTERS])
    header = st.sampled_from([None, None, *ADAPTERS, "nobody", "../x"])
    return st.tuples(strategy, st.integers(0, 2), known, header).map(lambda drawn: _steered(*drawn))


def _steered(case: schemathesis.Case, choice: int, model: str, header: str | None) -> schemathesis.Case:
    if choice == 0 and isinstance(case.body, dict):
        case.body = _with_model(case.body, model)
    if choice == 0 and case.path_parameters and "adapter_id" in case.path_parameters:
        case.path_parameters = {**case.path_parameters, "adapter_id": model}
    if header is not None and case.path in NATIVE_ROUTES:
        case.headers = {**(case.headers or {}), "adapter_id": header}
    return case


def _with_model(body: dict, model: str) -> dict:
    if "model" in body:
        return {key: value for key, value in body.items() if key not in OPENAI_REFUSED} | {"model": model}
    if isinstance(body.get("parameters"), dict):
        return {**body, "parameters": {**body["parameters"], "adapter_id": model}}
    return body


def test_no_request_gets_a_server_error_and_api_errors_are_json(api_schema, fuzz_server: ServerProcess):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {"POST /generate", "POST /generate_stream", "POST /", "POST /v1/chat/completions", "POST /v1/completions",
            "GET /v1/models", "GET /chat/{adapter_id}", "GET /health"} <= {op.label for op in operations}
    statuses: Counter[tuple[str, int]] = Counter()
    failures = [failure for operation in operations for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                for failure in _fuzz(operation, mode, statuses)]
    print("requests sent, by operation and status:", dict(sorted(statuses.items())))
    assert not failures, "\n\n".join(failures)
    assert fuzz_server.proc.poll() is None, fuzz_server.log_tail()


def _fuzz(operation: APIOperation, mode: GenerationMode, statuses: Counter) -> list[str]:
    """Send MAX_EXAMPLES requests for `operation` (valid ones, or invalid ones); the minimal failing request, if any."""

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(timeout=60)
        statuses[operation.label, response.status_code] += 1
        _check(case, response)

    try:
        run()
    except Unsatisfiable:  # every request is valid (GET /health, any adapter id in a path): no invalid ones to send
        assert mode == GenerationMode.NEGATIVE
    except Exception as exc:  # hypothesis re-raises the shrunk failure (or a group of them)
        return [f"{operation.label} ({mode.value}): {exc}"]
    return []


def _check(case: schemathesis.Case, response: schemathesis.Response) -> None:
    request = f"{case.as_curl_command()}\n-> {response.status_code} {response.content[:500]!r}"
    assert response.status_code < 500, request
    content_type = ",".join(response.headers.get("content-type", []))
    if response.status_code >= 400 and not case.path.startswith(HTML_ROUTES):
        assert content_type.startswith("application/json"), request
        json.loads(response.content)
    if response.status_code == 200 and content_type.startswith("text/event-stream"):
        assert not response.stream_cut_short, request
        events = _sse_events(response.content)
        errors = [e for e in events if isinstance(e, dict) and "error" in e and _error_type(e) in SERVER_ERROR_TYPES]
        assert not errors, request


def _sse_events(content: bytes) -> list:
    lines = content.decode(errors="replace").splitlines()
    payloads = [line[len("data:"):].strip() for line in lines if line.startswith("data:")]
    return [json.loads(p) for p in payloads if p and p != "[DONE]"]


def _error_type(event: dict) -> str:
    error = event["error"]
    return error.get("type", "") if isinstance(error, dict) else event.get("error_type", "")


@pytest.mark.parametrize("prompt", [[-1], [2**70]], ids=["negative", "huge"])
def test_completions_echo_of_token_ids_out_of_range_is_a_400(fuzz_server: ServerProcess, prompt: list[int]):
    body = {"model": MODEL_NAME, "prompt": prompt, "echo": True, "max_tokens": 1}
    resp = httpx.post(f"{fuzz_server.url}/v1/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "validation"


VANISHING = [  # (id, path, body): the minimal request the fuzzer found (LORAX_FUZZ_EXAMPLES=500), and siblings
    ("chat top_p", "/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                                            "max_tokens": 4, "top_p": 2.272465887675192e-234}),
    ("completions temperature", "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4,
                                                    "temperature": 1e-300}),
    ("completions repetition_penalty", "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4,
                                                           "repetition_penalty": 1e-300}),
    ("native temperature", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 4, "temperature": 1e-300}}),
    ("native top_p", "/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 4, "top_p": 1e-300,
                                                                 "do_sample": True}}),
]


@pytest.mark.parametrize("path, body", [case[1:] for case in VANISHING], ids=[case[0] for case in VANISHING])
def test_a_vanishing_sampling_value_is_no_server_error(fuzz_server: ServerProcess, path: str, body: dict):
    resp = httpx.post(f"{fuzz_server.url}{path}", json=body, timeout=60)
    assert resp.status_code < 500, resp.text

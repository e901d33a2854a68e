"""Runs calls through LoRAX's own Python client (`lorax-client`, module `lorax`), unchanged, in its venv.

Usage: python lorax_client_calls.py BASE_URL CALLS_JSON; prints a JSON list with one result per call.
A call is {"op": "generate" | "generate_stream", "prompt", "adapter_id", "header_adapter_id", **parameters};
a client exception becomes {"error": its class name, "message"}. With LORAX_TEST_API_KEY set, every call
sends it as `Authorization: Bearer KEY` (for a server with API keys).
"""

import json
import os
import sys

from lorax import Client


def run(base_url: str, call: dict) -> dict:
    call = dict(call)
    op, prompt = call.pop("op"), call.pop("prompt")
    header = call.pop("header_adapter_id", None)
    headers = {"adapter_id": header} if header else {}
    if api_key := os.environ.get("LORAX_TEST_API_KEY"):
        headers["Authorization"] = f"Bearer {api_key}"
    client = Client(base_url, headers=headers or None, timeout=120)
    try:
        if op == "generate":
            resp = client.generate(prompt, **call)
            details = resp.details
            return {"text": resp.generated_text, "finish_reason": details.finish_reason.value,
                    "generated_tokens": details.generated_tokens, "prompt_tokens": details.prompt_tokens,
                    "token_ids": [t.id for t in details.tokens], "logprobs": [t.logprob for t in details.tokens]}
        if op == "generate_stream":
            events = list(client.generate_stream(prompt, **call))
            last = events[-1]
            return {"text": "".join(e.token.text for e in events), "generated_text": last.generated_text,
                    "finish_reason": last.details.finish_reason.value, "generated_tokens": last.details.generated_tokens,
                    "token_ids": [e.token.id for e in events]}
        raise ValueError(f"unknown op {op!r}")
    except Exception as exc:  # the client's own error classes are what the test checks
        return {"error": type(exc).__name__, "message": str(exc)}


if __name__ == "__main__":
    print(json.dumps([run(sys.argv[1], c) for c in json.loads(sys.argv[2])]))

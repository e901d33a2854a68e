"""Runs calls through the official `openai` Python SDK, unchanged, in its venv.

Usage: python openai_calls.py BASE_URL CALLS_JSON; prints a JSON list with one result per call.
A call is {"op": "chat" | "chat_stream" | "completion" | "models", **create() arguments};
an SDK exception becomes {"error": its class name, "status", "message"}. With LORAX_TEST_API_KEY set, the SDK
uses it as its api_key (sent as `Authorization: Bearer KEY`; else the placeholder "unused").
"""

import json
import os
import sys

import openai


def run(client: openai.OpenAI, call: dict) -> dict:
    call = dict(call)
    op = call.pop("op")
    try:
        if op == "models":
            return {"ids": [m.id for m in client.models.list()]}
        if op == "chat":
            resp = client.chat.completions.create(**call)
            choice = resp.choices[0]
            return {"content": choice.message.content, "finish_reason": choice.finish_reason, "model": resp.model,
                    "usage": resp.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})}
        if op == "chat_stream":
            chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **call))
            with_choices = [c for c in chunks if c.choices]
            return {"content": "".join(c.choices[0].delta.content or "" for c in with_choices),
                    "finish_reason": with_choices[-1].choices[0].finish_reason,
                    "usage": chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})}
        if op == "completion":
            resp = client.completions.create(**call)
            return {"text": resp.choices[0].text, "finish_reason": resp.choices[0].finish_reason,
                    "usage": resp.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})}
        raise ValueError(f"unknown op {op!r}")
    except openai.APIStatusError as exc:
        return {"error": type(exc).__name__, "status": exc.status_code, "message": exc.message}


if __name__ == "__main__":
    api_key = os.environ.get("LORAX_TEST_API_KEY") or "unused"
    sdk = openai.OpenAI(base_url=f"{sys.argv[1]}/v1", api_key=api_key, max_retries=0, timeout=120)
    print(json.dumps([run(sdk, c) for c in json.loads(sys.argv[2])]))

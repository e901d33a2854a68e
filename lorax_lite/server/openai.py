"""The OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

`model` names an adapter id, or the served base model's name for the base model; an unknown one is
a 404. Chat requests go through the tokenizer's chat template; when the conversation has no system
message, the adapter's registered `system_prompt` is put first. Streams are server-sent events of
chunks ending with `data: [DONE]`; an error after the stream started arrives as an error event.
"""

from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError

from lorax_lite.engine.request import RequestOutput
from lorax_lite.llm import render_chat
from lorax_lite.lora.naming import check_adapter_id
from lorax_lite.server.calls import CLIENT_CLOSED_REQUEST, ClientDisconnected, EngineCall, run_to_end_or_abort, unless_disconnected
from lorax_lite.server.errors import ServerError, as_server_error
from lorax_lite.server.openai_schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from lorax_lite.server.state import ServerState

router = APIRouter(prefix="/v1")

FINISH_REASONS = {"length": "length", "eos": "stop", "stop": "stop"}
STARTED = int(time.time())


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    """The base model, then every adapter (added by path, or registered); never a filesystem path."""
    state: ServerState = request.app.state.server
    base = state.served_model_name
    cards = [ModelCard(id=base, created=STARTED, owned_by="lorax-lite")]
    for adapter_id, record in await run_in_threadpool(state.adapters):
        created, owner = (int(record.created_at), record.owner) if record else (STARTED, None)
        cards.append(ModelCard(id=adapter_id, created=created, owned_by=owner or "lorax-lite", parent=base))
    return ModelList(data=cards)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.server
    adapter_id = _adapter_for(state, body)
    messages = [m.as_template_message() for m in body.messages]
    if adapter_id is not None and not any(m["role"] == "system" for m in messages):
        record = await run_in_threadpool(state.adapter_record, adapter_id)
        if record is not None and record.system_prompt:
            messages.insert(0, {"role": "system", "content": record.system_prompt})
    try:
        text, prompt_ids = render_chat(state.llm.tokenizer, messages)
    except (ValueError, TemplateError) as exc:
        raise ServerError(400, f"messages: the chat template refused them: {exc}", "validation", param="messages") from exc
    max_tokens = body.requested_max_tokens or _room_left(state, len(prompt_ids))
    return await _respond(state, request, body, prompt_ids, text, adapter_id, max_tokens, ChatFormat(body.model, body.include_usage))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.server
    adapter_id = _adapter_for(state, body)
    try:
        prompt = body.prompt_value()
    except ValueError as exc:
        raise as_server_error(exc) from exc
    if isinstance(prompt, str):
        text, prompt_ids = prompt, state.llm.tokenizer(prompt).input_ids
    else:
        text, prompt_ids = None, prompt
    echo = "" if not body.echo else text if text is not None else state.llm.tokenizer.decode(prompt_ids)
    max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    return await _respond(state, request, body, prompt_ids, text, adapter_id, max_tokens, CompletionFormat(body.model, body.include_usage, echo))


def _adapter_for(state: ServerState, body: SamplingFields) -> str | None:
    if state.is_base_model(body.model):
        return None
    try:
        return check_adapter_id(body.model)
    except ValueError as exc:
        raise ServerError(400, f"model: {exc}", "validation", param="model") from exc


def _room_left(state: ServerState, num_prompt_tokens: int) -> int:
    """Without max_tokens a chat answer may fill the context; a prompt that fills it alone is a 400."""
    room = state.llm.engine.max_model_len - num_prompt_tokens
    if room < 1:
        raise ServerError(400, f"messages: the prompt ({num_prompt_tokens} tokens) leaves no room to answer within "
                          f"{state.llm.engine.max_model_len} tokens (max_model_len)", "validation", param="messages")
    return room


async def _respond(
    state: ServerState,
    request: Request,
    body: SamplingFields,
    prompt_ids: list[int],
    prompt_text: str | None,
    adapter_id: str | None,
    max_tokens: int,
    fmt: ChatFormat | CompletionFormat,
) -> Response:
    try:
        body.check_supported()
        params = body.sampling_params(max_tokens)
    except ValueError as exc:
        raise as_server_error(exc) from exc
    start = EngineCall.start(state, prompt_ids, params, adapter_id, prompt_text, max_tokens_name="max_tokens")
    try:
        call = await unless_disconnected(start, request)
        if body.stream:
            return StreamingResponse(_sse(call, fmt), media_type="text/event-stream", headers=call.headers())
        out = await run_to_end_or_abort(call, request)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(fmt.response(out), headers=call.headers())


async def _sse(call: EngineCall, fmt: ChatFormat | CompletionFormat) -> AsyncIterator[str]:
    """Chunks of new text, a last chunk with the finish reason, the usage chunk if asked, [DONE]."""
    text = ""
    try:
        for chunk in fmt.opening_chunks():
            yield _event(chunk)
        async for out in call.outputs():
            delta, text = out.text[len(text):], out.text
            if delta or out.finished:
                yield _event(fmt.chunk(delta, FINISH_REASONS.get(out.finish_reason) if out.finished else None))
        if fmt.include_usage:
            yield _event(fmt.usage_chunk(_usage(call.last)))
    except Exception as exc:
        yield _event(as_server_error(exc).to_json(openai=True))
    finally:
        await call.close()
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _usage(out: RequestOutput) -> Usage:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _Format(ABC):
    """What one endpoint's responses and stream chunks look like; one id and creation time per request."""

    object_name: str
    id_prefix: str

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, object_name: str, choices: list[dict]) -> dict:
        envelope = {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            envelope["usage"] = None  # OpenAI: null on every chunk but the last
        return envelope

    def usage_chunk(self, usage: Usage) -> dict:
        return {**self.envelope(self.object_name, []), "usage": usage.model_dump()}

    def opening_chunks(self) -> list[dict]:
        return []

    @abstractmethod
    def chunk(self, delta: str, finish_reason: str | None) -> dict:
        """A stream chunk carrying new text (and the finish reason on the last)."""

    @abstractmethod
    def response(self, out: RequestOutput) -> dict:
        """The non-streaming response for a finished request."""


class ChatFormat(_Format):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def opening_chunks(self) -> list[dict]:
        return [self._choice_chunk({"role": "assistant", "content": ""}, None)]

    def chunk(self, delta: str, finish_reason: str | None) -> dict:
        return self._choice_chunk({"content": delta} if delta else {}, finish_reason)

    def _choice_chunk(self, delta: dict, finish_reason: str | None) -> dict:
        return self.envelope(self.object_name, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def response(self, out: RequestOutput) -> dict:
        message = {"role": "assistant", "content": out.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": FINISH_REASONS[out.finish_reason]}
        return {**self.envelope("chat.completion", [choice]), "usage": _usage(out).model_dump()}


class CompletionFormat(_Format):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model: str, include_usage: bool, echo: str) -> None:
        super().__init__(model, include_usage)
        self.echo = echo

    def opening_chunks(self) -> list[dict]:
        return [self.chunk(self.echo, None)] if self.echo else []

    def chunk(self, delta: str, finish_reason: str | None) -> dict:
        return self.envelope(self.object_name, [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}])

    def response(self, out: RequestOutput) -> dict:
        choice = {"index": 0, "text": self.echo + out.text, "logprobs": None, "finish_reason": FINISH_REASONS[out.finish_reason]}
        return {**self.envelope(self.object_name, [choice]), "usage": _usage(out).model_dump()}

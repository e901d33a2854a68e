"""The OpenAI-compatible API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

`model` names an adapter id, or the served base model's name for the base model; an unknown one is
a 404. The native API's `adapter_id` / `X-Adapter-Id` headers are honoured here too: with `model` set
to the base model's name the header's adapter is used; naming a different adapter in each is a 400.
Chat requests go through the tokenizer's chat template; when the conversation has no system
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
from transformers import PreTrainedTokenizerBase

from lorax_lite.engine.async_llm import ResolvedAdapter
from lorax_lite.engine.request import RequestOutput
from lorax_lite.llm import render_chat
from lorax_lite.server.calls import (
    CLIENT_CLOSED_REQUEST,
    ClientDisconnected,
    EngineCall,
    adapter_from_headers,
    finish_reason_of,
    run_to_end_or_abort,
    unless_disconnected,
)
from lorax_lite.server.errors import ServerError, as_server_error, brief
from lorax_lite.server.openai_schemas import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingFields,
    Usage,
)
from lorax_lite.server.state import ServerState

router = APIRouter(prefix="/v1")

FINISH_REASONS = {"length": "length", "eos": "stop", "stop": "stop", "timeout": "timeout"}
STARTED = int(time.time())


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    """The base model, then every adapter (added by path, or registered), as far as the caller's key may use
    them; never a filesystem path."""
    state: ServerState = request.app.state.server
    base = state.served_model_name
    cards = [ModelCard(id=base, created=STARTED, owned_by="lorax-lite")] if state.may_use_base_model(request) else []
    for adapter in await state.list_adapters(request):
        record = adapter.record
        created, owner = (int(record.created_at), record.owner) if record else (STARTED, None)
        cards.append(ModelCard(id=adapter.adapter_id, created=created, owned_by=owner or "lorax-lite", parent=base))
    return ModelList(data=cards)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.server
    model = requested_model(request, body.model, state)
    state.check_prompt_chars(sum(len(m.text) for m in body.messages), "messages")
    state.check_max_tokens(body.requested_max_tokens, "max_tokens")
    adapter = await state.resolve_adapter(request, model, field="model")
    messages = [m.as_template_message() for m in body.messages]
    if adapter is not None and adapter.system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": adapter.system_prompt})
    try:
        text, prompt_ids = await run_in_threadpool(render_chat, state.llm.tokenizer, messages)
    except (ValueError, TemplateError) as exc:
        raise ServerError(
            400, f"messages: the chat template refused them: {exc}", "validation", param="messages"
        ) from exc
    state.check_prompt_tokens(len(prompt_ids), "messages")
    max_tokens = body.requested_max_tokens or min(state.limits.default_max_tokens, _room_left(state, len(prompt_ids)))
    fmt = ChatFormat(model, body.include_usage)
    return await _respond(state, request, body, prompt_ids, text, adapter, max_tokens, fmt)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.server
    try:
        prompt = body.prompt_value()
    except ValueError as exc:
        raise as_server_error(exc) from exc
    model = requested_model(request, body.model, state)
    if isinstance(prompt, str):
        state.check_prompt_chars(len(prompt), "prompt")  # before tokenizing: a huge prompt costs nothing
    state.check_max_tokens(body.max_tokens, "max_tokens")
    adapter = await state.resolve_adapter(request, model, field="model")
    tokenizer = state.llm.tokenizer
    if isinstance(prompt, str):
        text, prompt_ids = prompt, (await run_in_threadpool(tokenizer, prompt)).input_ids
    else:
        text, prompt_ids = None, prompt
    echo = "" if not body.echo else text if text is not None else await _decode_prompt(tokenizer, prompt_ids)
    max_tokens = body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
    fmt = CompletionFormat(model, body.include_usage, echo)
    return await _respond(state, request, body, prompt_ids, text, adapter, max_tokens, fmt)


async def _decode_prompt(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> str:
    """The text of a prompt given as token ids (for `echo`); ids the tokenizer does not have are a 400."""
    if any(not 0 <= token_id < len(tokenizer) for token_id in prompt_ids):
        raise ServerError(400, f"prompt: token ids must be in [0, {len(tokenizer)})", "validation", param="prompt")
    return str(await run_in_threadpool(tokenizer.decode, prompt_ids))


def requested_model(request: Request, model: str, state: ServerState) -> str:
    """`model`, or the adapter an `adapter_id` / `X-Adapter-Id` header names when `model` is the base model's
    name (or the same adapter); a different adapter in each is a 400."""
    header = adapter_from_headers(request)
    if header is None or header[1] == model:
        return model
    if state.is_base_model(model):
        return header[1]
    raise ServerError(400, f"conflicting adapters: model is {brief(model)} but the {header[0]} header names "
                      f"{brief(header[1])}; name one adapter, or the same in both", "validation", param="model")


def _room_left(state: ServerState, num_prompt_tokens: int) -> int:
    """Without max_tokens a chat answer may fill the context; a prompt that fills it alone is a 400."""
    room = state.llm.max_seq_len - num_prompt_tokens
    if room < 1:
        raise ServerError(400, f"messages: the prompt ({num_prompt_tokens} tokens) leaves no room to answer within "
                          f"{state.llm.max_seq_len} tokens (max_model_len)", "validation", param="messages")
    return room


async def _respond(
    state: ServerState,
    request: Request,
    body: SamplingFields,
    prompt_ids: list[int],
    prompt_text: str | None,
    adapter: ResolvedAdapter | None,
    max_tokens: int,
    fmt: ChatFormat | CompletionFormat,
) -> Response:
    try:
        body.check_supported()
        params = body.sampling_params(max_tokens)
    except ValueError as exc:
        raise as_server_error(exc) from exc
    start = EngineCall.start(state, request, prompt_ids, params, adapter, prompt_text, max_tokens_name="max_tokens",
                             timeout=body.timeout)
    try:
        call = await unless_disconnected(start, request)
        if body.stream:
            return StreamingResponse(_sse(call, fmt), media_type="text/event-stream", headers=call.headers())
        out = await run_to_end_or_abort(call, request)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return JSONResponse(fmt.response(out, call.text), headers=call.headers())


async def _sse(call: EngineCall, fmt: ChatFormat | CompletionFormat) -> AsyncIterator[str]:
    """Chunks of new text, a last chunk with the finish reason, the usage chunk if asked, [DONE]."""
    try:
        for chunk in fmt.opening_chunks():
            yield _event(chunk)
        async for out in call.outputs():  # each output carries only its new text
            if out.text or out.finished:
                yield _event(fmt.chunk(out.text, FINISH_REASONS[finish_reason_of(out)] if out.finished else None))
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
    prompt, completion = len(out.prompt_token_ids), out.num_generated_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens))


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
        envelope = {
            "id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices
        }
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
    def response(self, out: RequestOutput, text: str) -> dict:
        """The non-streaming response for a finished request (`out`, its last output) that generated `text`."""


class ChatFormat(_Format):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def opening_chunks(self) -> list[dict]:
        return [self._choice_chunk({"role": "assistant", "content": ""}, None)]

    def chunk(self, delta: str, finish_reason: str | None) -> dict:
        return self._choice_chunk({"content": delta} if delta else {}, finish_reason)

    def _choice_chunk(self, delta: dict, finish_reason: str | None) -> dict:
        return self.envelope(
            self.object_name, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def response(self, out: RequestOutput, text: str) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {
            "index": 0, "message": message, "logprobs": None, "finish_reason": FINISH_REASONS[finish_reason_of(out)]
        }
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
        return self.envelope(
            self.object_name, [{"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def response(self, out: RequestOutput, text: str) -> dict:
        choice = {"index": 0, "text": self.echo + text, "logprobs": None,
                  "finish_reason": FINISH_REASONS[finish_reason_of(out)]}
        return {**self.envelope(self.object_name, [choice]), "usage": _usage(out).model_dump()}

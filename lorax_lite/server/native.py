"""The native API in LoRAX/TGI's wire format: POST /generate, /generate_stream, and / (what lorax-client calls).

The adapter comes from the `adapter_id` header, the `X-Adapter-Id` header, or `parameters.adapter_id`
(all that are given must agree, and a header given twice must repeat its value); none, or the served
model's name, means the base model. An unknown adapter is a 404, never a silent fallback to the base model.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorax_lite.server.calls import (
    CLIENT_CLOSED_REQUEST,
    ClientDisconnected,
    adapter_from_headers,
    run_to_end_or_abort,
    unless_disconnected,
)
from lorax_lite.server.errors import ServerError, brief
from lorax_lite.server.generation import Generation
from lorax_lite.server.schemas import GenerateRequest
from lorax_lite.server.state import ServerState

router = APIRouter()


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    return await _respond(body, request, stream=False, as_list=False)


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request) -> Response:
    return await _respond(body, request, stream=True, as_list=False)


@router.post("/")
async def compat_generate(body: GenerateRequest, request: Request) -> Response:
    """lorax-client's endpoint: `stream` picks SSE or a JSON list holding one response."""
    return await _respond(body, request, stream=body.stream, as_list=True)


def requested_adapter_id(request: Request, body: GenerateRequest) -> str | None:
    """The adapter asked for, from headers and parameters (None: none given); conflicting values are a 400."""
    header = adapter_from_headers(request)
    param = body.parameters.adapter_id
    if header is not None and param and header[1] != param:
        raise ServerError(400, f"conflicting adapter ids ({header[0]}: {brief(header[1])}, parameters.adapter_id: "
                          f"{brief(param)}); give one, or the same in each place", "validation", param="adapter_id")
    return header[1] if header is not None else param or None


async def _respond(body: GenerateRequest, request: Request, stream: bool, as_list: bool) -> Response:
    state: ServerState = request.app.state.server
    adapter_id = requested_adapter_id(request, body)
    try:
        gen = await unless_disconnected(Generation.start(state, request, body, adapter_id), request)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if stream:
        return _respond_stream(gen)
    try:
        out = await run_to_end_or_abort(gen.call, request, on_output=gen.advance)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    payload = (await gen.response(out)).model_dump()
    if payload["details"] is None:
        del payload["details"]  # TGI leaves it out unless `details` was asked for
    return JSONResponse([payload] if as_list else payload, headers=gen.call.headers())


def _respond_stream(gen: Generation) -> StreamingResponse:
    async def sse() -> AsyncIterator[str]:
        async for event in gen.stream_events():
            yield f"data: {json.dumps(event)}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers=gen.call.headers())

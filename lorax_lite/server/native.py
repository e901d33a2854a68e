"""The native API in LoRAX/TGI's wire format: POST /generate, /generate_stream, and / (what lorax-client calls).

The adapter comes from the `adapter_id` header, the `X-Adapter-Id` header, or `parameters.adapter_id`
(all that are given must agree); none, or the served model's name, means the base model. An unknown
adapter is a 404, never a silent fallback to the base model.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorax_lite.engine.async_llm import AsyncLLM
from lorax_lite.lora.naming import check_adapter_id
from lorax_lite.server.errors import ServerError, as_server_error
from lorax_lite.server.generation import Generation
from lorax_lite.server.schemas import GenerateRequest

router = APIRouter()

ADAPTER_HEADERS = ("adapter_id", "x-adapter-id")


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    gen = await _start(body, request)
    return await _respond_once(gen, request, as_list=False)


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request) -> Response:
    return _respond_stream(await _start(body, request))


@router.post("/")
async def compat_generate(body: GenerateRequest, request: Request) -> Response:
    """lorax-client's endpoint: `stream` picks SSE or a JSON list holding one response."""
    gen = await _start(body, request)
    return _respond_stream(gen) if body.stream else await _respond_once(gen, request, as_list=True)


def resolve_adapter_id(request: Request, body: GenerateRequest) -> str | None:
    """The adapter asked for, from headers and parameters; conflicting values are a 400."""
    given = {name: request.headers.get(name) for name in ADAPTER_HEADERS}
    given["parameters.adapter_id"] = body.parameters.adapter_id
    given = {name: value for name, value in given.items() if value}
    if len(set(given.values())) > 1:
        listed = ", ".join(f"{name}={value!r}" for name, value in given.items())
        raise ServerError(400, f"conflicting adapter ids ({listed}); give one, or the same in each place", "validation")
    adapter_id = next(iter(given.values()), None)
    if adapter_id is None or adapter_id == request.app.state.served_model_name:
        return None
    try:
        return check_adapter_id(adapter_id)
    except ValueError as exc:
        raise as_server_error(exc) from exc


async def _start(body: GenerateRequest, request: Request) -> Generation:
    llm: AsyncLLM = request.app.state.llm
    adapter_id = resolve_adapter_id(request, body)
    return await Generation.start(llm, body, adapter_id, request.app.state.served_model_name)


async def _respond_once(gen: Generation, request: Request, as_list: bool) -> Response:
    try:
        out = await _unless_disconnected(gen.run_to_end(), request)
    except Exception as exc:
        return as_server_error(exc).to_response()
    finally:
        await gen.close()
    if out is None:
        return Response(status_code=499)  # the client is gone; its request was aborted
    payload = gen.response(out).model_dump()
    if payload["details"] is None:
        del payload["details"]  # TGI leaves it out unless `details` was asked for
    return JSONResponse([payload] if as_list else payload, headers=gen.headers(out))


def _respond_stream(gen: Generation) -> StreamingResponse:
    async def sse() -> AsyncIterator[str]:
        async for event in gen.stream_events():
            yield f"data: {json.dumps(event)}\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream", headers=gen.headers())


async def _unless_disconnected(work: Awaitable, request: Request) -> object | None:
    """Await `work`, cancelling it (which aborts the engine request) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass

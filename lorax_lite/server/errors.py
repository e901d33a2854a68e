"""HTTP errors in LoRAX's body (`{"error", "error_type"}`), and how engine exceptions map onto them.

lorax-client turns `error_type` "validation"/"generation"/"overloaded" into its own exception types
and otherwise goes by status (400, 404, 422, 429, ...).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lorax_lite.engine.async_llm import EngineDeadError
from lorax_lite.lora.errors import AdapterError, AdapterNotFoundError
from lorax_lite.server.schemas import UnsupportedParameterError


class ServerError(Exception):
    """An HTTP error answer: status, LoRAX error_type and a message that says what to change."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type

    def to_response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "error_type": self.error_type}, status_code=self.status)

    def to_json(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


def as_server_error(exc: BaseException) -> ServerError:
    """Map an exception from validation or the engine onto its HTTP answer."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return ServerError(404, str(exc), "not_found")
    if isinstance(exc, AdapterError):
        return ServerError(400, str(exc), "adapter")
    if isinstance(exc, UnsupportedParameterError):
        return ServerError(422, str(exc), "validation")
    if isinstance(exc, ValueError):
        return ServerError(422, str(exc), "validation")
    if isinstance(exc, EngineDeadError):
        return ServerError(503, str(exc), "unavailable")
    return ServerError(500, f"generation failed: {exc}", "generation")


def _format_validation_error(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "extra_forbidden":
            parts.append(f"`{loc}`: unknown field")
        else:
            parts.append(f"`{loc}`: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server in LoRAX's body; pydantic errors become 422 naming the field."""

    async def on_server_error(request: Request, exc: ServerError) -> JSONResponse:
        return exc.to_response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return ServerError(422, _format_validation_error(exc), "validation").to_response()

    app.add_exception_handler(ServerError, on_server_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)

"""HTTP errors, and how engine exceptions map onto them.

Native routes answer in LoRAX's body (`{"error", "error_type"}`): lorax-client turns `error_type`
"validation"/"generation"/"overloaded" into its own exception types and otherwise goes by status.
OpenAI routes (/v1/...) answer in OpenAI's body (`{"error": {"message", "type", "param", "code"}}`),
where a field the request gets wrong is a 400 (a 422 on native routes, as in LoRAX).
"""

from __future__ import annotations

import contextvars
import logging
import math
from typing import cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorax_lite.engine.async_llm import EngineDeadError
from lorax_lite.lora.errors import (
    AdapterConfigError,
    AdapterError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTooLargeError,
    CorruptWeightsError,
    PickledWeightsError,
    TargetModuleError,
    UnsupportedAdapterError,
)
from lorax_lite.lora.naming import InvalidAdapterIdError
from lorax_lite.registry.base import RegistryError, RegistryUnavailableError
from lorax_lite.server.schemas import UnsupportedParameterError

logger = logging.getLogger(__name__)

OPENAI_PATH_PREFIX = "/v1/"
OPENAI_TYPES = {
    401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "invalid_request_error",
    429: "rate_limit_error", 503: "service_unavailable",
    504: "timeout",
}
OPENAI_CODES = {"unauthorized": "invalid_api_key"}  # OpenAI's code for a 401
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("lorax_request_id", default="-")  # for the log
MAX_MESSAGE_CHARS = 1000  # an error body never echoes more of the request than this
MAX_ECHO_CHARS = 64  # an id, path or value quoted in a message is cut to this
RETRY_AFTER_SECONDS = 1


def cut(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` for a message, cut to `limit` characters (saying how long it was)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def brief(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`repr(value)` for a message, cut to `limit` characters."""
    return cut(repr(value), limit)


class ServerError(Exception):
    """An HTTP error answer: status, error_type, a message that says what to change, and (when one
    field is to blame) its name in `param`."""

    def __init__(
        self, status: int, message: str, error_type: str, param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "... (cut)"
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.headers = headers

    def to_response(self, openai: bool = False) -> JSONResponse:
        status = 400 if openai and self.status == 422 else self.status  # OpenAI refuses bad fields with a 400
        return JSONResponse(self.to_json(openai), status_code=status, headers=self.headers)

    def to_json(self, openai: bool = False) -> dict:
        if not openai:
            return {"error": self.message, "error_type": self.error_type}
        default = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": OPENAI_TYPES.get(self.status, default),
                          "param": self.param, "code": OPENAI_CODES.get(self.error_type, self.error_type)}}


def is_openai_route(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PATH_PREFIX)


def as_server_error(exc: BaseException, adapter_id: str | None = None) -> ServerError:
    """Map an exception from validation or the engine onto its HTTP answer; `adapter_id` is the
    adapter the request asked for (adapter errors name it)."""
    if isinstance(exc, ServerError):
        return exc
    if isinstance(exc, AdapterError):
        return _adapter_refusal(exc, adapter_id)
    if isinstance(exc, UnsupportedParameterError):
        return ServerError(422, str(exc), "validation", param=exc.name)
    if isinstance(exc, ValueError):
        return ServerError(422, str(exc), "validation")
    if isinstance(exc, EngineDeadError):
        return ServerError(503, "the engine is not running; the server is restarting or shutting down",
                           "unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, RegistryError):  # the log has its message; the client a URL-free one
        logger.warning("request %s: adapter registry: %s", REQUEST_ID.get(), exc)
        return registry_unavailable(exc.retry_after_s if isinstance(exc, RegistryUnavailableError) else None)
    logger.error("request %s failed: %r", REQUEST_ID.get(), exc, exc_info=exc)
    return ServerError(500, "generation failed: internal error; the server log has the details "
                       "(look for this response's x-request-id)", "generation")


def registry_unavailable(retry_after_s: float | None = None) -> ServerError:
    """503 for a lookup the adapter registry must answer while it cannot (never its URL)."""
    retry_after = max(RETRY_AFTER_SECONDS, math.ceil(retry_after_s or 0))
    return ServerError(503, "the adapter registry is unreachable, so this adapter cannot be looked up now; "
                       "retry shortly (adapters already in use keep being served)", "registry_unavailable",
                       param="model", headers={"Retry-After": str(retry_after)})


ADAPTER_REASONS = [  # what a client is told; the full message (store paths, ...) goes to the server log
    (PickledWeightsError, "its weights are pickled; only safetensors are loaded"),
    (CorruptWeightsError, "its files are missing, damaged or changed since registration"),
    (UnsupportedAdapterError, "it uses a PEFT feature lorax-lite cannot serve"),
    (AdapterRankError, "its rank is above the server's max_lora_rank"),
    (TargetModuleError, "it targets modules this base model lacks"),
    (AdapterShapeError, "its tensors do not fit this base model"),
    (AdapterConfigError, "its adapter_config.json is invalid"),
    (AdapterTooLargeError, "it is over the adapter size limit"),
]


def _adapter_refusal(exc: AdapterError, adapter_id: str | None) -> ServerError:
    if isinstance(exc, InvalidAdapterIdError):  # the message only echoes the id and the rule
        return ServerError(400, str(exc), "validation", param="model")
    name = brief(adapter_id) if adapter_id else "(unnamed)"
    if isinstance(exc, AdapterNotFoundError):
        return ServerError(404, f"unknown adapter {name}: it is not registered on this server (GET /v1/models lists "
                           "the base model and the adapters)", "not_found", param="model")
    logger.warning("request %s: adapter %s refused: %s", REQUEST_ID.get(), name, exc)
    reason = next((why for cls, why in ADAPTER_REASONS if isinstance(exc, cls)), "it failed to load")
    if isinstance(exc, UnsupportedAdapterError) and exc.feature:
        reason += f" ({exc.feature})"
    if isinstance(exc, CorruptWeightsError):  # the store's fault, not the client's: a 5xx, so alerts fire
        return ServerError(503, f"adapter {name} is unavailable: {reason}; the server log has the details",
                           "adapter_unavailable", param="model")
    return ServerError(
        400, f"adapter {name} cannot be served: {reason}; the server log has the details", "adapter", param="model"
    )


def _from_validation_error(exc: RequestValidationError) -> ServerError:
    parts, fields = [], []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if _is_field(p)) or "body"
        if err.get("type") != "json_invalid":
            fields.append(loc)
        if err.get("type") == "extra_forbidden":
            parts.append(f"`{loc}`: unknown field")
        elif err.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {err.get('ctx', {}).get('error', 'cannot parse the body')}")
        else:
            parts.append(f"`{loc}`: {err.get('msg', 'invalid')}")
    return ServerError(422, "invalid request: " + "; ".join(parts), "validation", param=fields[0] if fields else None)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic names union members in `loc`


def _is_field(part: str | int) -> bool:
    """A part of a pydantic error location that is a field name or an index (not "body", not a union tag)."""
    if isinstance(part, int):
        return True
    return part != "body" and part not in _UNION_TAGS and part.replace("_", "a").isalnum()


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server in its route family's body; schema errors name the field."""

    # Starlette types every handler's exception as Exception; each is registered for one type below.
    async def on_server_error(request: Request, exc: Exception) -> Response:
        return cast(ServerError, exc).to_response(is_openai_route(request))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return _from_validation_error(cast(RequestValidationError, exc)).to_response(is_openai_route(request))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        """Unknown routes and wrong methods: the route family's body, not FastAPI's {"detail"}."""
        exc = cast(StarletteHTTPException, exc)
        error_type = {404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        error = ServerError(exc.status_code, f"{request.method} {cut(request.url.path)}: {exc.detail}", error_type,
                            headers=getattr(exc, "headers", None))
        return error.to_response(is_openai_route(request))

    app.add_exception_handler(ServerError, on_server_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)

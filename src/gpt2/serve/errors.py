"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Every way a request can fail ends here, so that a client written for OpenAI (which reads
``error.message``) shows the user a sentence, never a stack trace or FastAPI's own 422 format.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"

# Fields whose type is a union: pydantic reports one error per member; one sentence says it better.
UNION_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of such lists",
    "stop": "a string or a list of strings",
}


class APIError(Exception):
    """A request the server refuses; becomes a JSON error with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        detail = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        return {"error": detail}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def encode(self) -> bytes:
        return json.dumps(self.body()).encode("utf-8")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of validation errors, reduced to its first one as a single sentence."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    # loc is ("body", field, ...); pydantic adds the union member tried, e.g. ("prompt", "str").
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {param}", param=param)
    if first.get("type") == "missing":
        if param is None:  # the body itself is missing
            return APIError(
                400, 'the request body is empty: send a JSON object such as {"prompt": "Hello"}'
            )
        return APIError(400, f"missing required argument: {param}", param=param)
    if not loc:
        hint = (
            " sent with Content-Type: application/json"
            if isinstance(first.get("input"), bytes)
            else ""
        )
        return APIError(400, f"the request body must be a JSON object{hint}")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "value_error":  # our own validators: their sentence is the message
        return APIError(400, f"{param}: {message}", param=param)
    if param in UNION_TYPES:
        return APIError(400, f"{param} must be {UNION_TYPES[param]}", param=param)
    return APIError(400, f"{'.'.join(loc)}: {message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route FastAPI's and Starlette's errors through the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} not allowed on {request.url.path}")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        return err.response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        err = APIError(500, "internal server error", type="server_error")
        return err.response()

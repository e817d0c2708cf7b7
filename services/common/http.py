"""What the three FastAPI apps share: JSON errors, bearer auth, body limits, health and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, SecretStr
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.kafka import is_transient

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of the API."""

    error: ErrorBody


def error_responses(descriptions: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a route's documented error statuses, all ``ErrorResponse``."""
    return {
        code: {"model": ErrorResponse, "description": text} for code, text in descriptions.items()
    }


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, field=field))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def field_path(loc: Sequence[Any]) -> str:
    """("body", 1, "data", "customer", "id") → "[1].data.customer.id"."""
    out = ""
    for part in loc:
        if part in ("body", "query", "path", "header", "form") and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(body)"


async def refuse_nul(request: Request) -> None:
    """A path or query parameter holding a NUL character is refused (422, naming it): PostgreSQL
    text cannot store one, so it would otherwise fail the request (a 500) in the database."""
    params = [*request.path_params.items(), *request.query_params.multi_items()]
    for name, value in params:
        if "\x00" in name or "\x00" in str(value):
            raise ApiError(422, "invalid", "NUL characters are not allowed", name)


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors for every refusal, and ``refuse_nul`` on every route included afterwards."""
    app.router.dependencies.append(Depends(refuse_nul))

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        return error_response(422, "invalid", str(first["msg"]), field_path(first["loc"]))

    # The database away for a moment (a restart, a fail-over): 503 and when to try again, as
    # the ingress does for the broker; any other error stays a 500 (a bug).
    async def _unavailable(request: Request, exc: Exception) -> Response:
        if not is_transient(exc):
            raise exc
        log.warning("the database is unavailable (%s): answered 503", type(exc).__name__)
        message = "the database is unavailable; retry later"
        return error_response(503, "unavailable", message, headers={"Retry-After": "5"})

    for kind in (DBAPIError, SQLAlchemyTimeoutError, OSError):
        app.add_exception_handler(kind, _unavailable)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "error")
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the path's first route only.
            allowed = {
                method
                for route in request.app.routes
                if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE
                for method in route.methods or ()
            }
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)


def bearer_auth(token: SecretStr | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency that requires ``Authorization: Bearer <token>``."""

    async def check(request: Request) -> None:
        if token is None:
            raise ApiError(503, "not_configured", "no API token is configured (KAIKU_API_TOKEN)")
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.get_secret_value().encode()
        ):
            raise ApiError(
                401,
                "unauthorized",
                "a valid bearer token is required",
                headers={"WWW-Authenticate": 'Bearer realm="kaiku"'},
            )

    return check


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes with 413 before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ApiError(413, "too_large", f"the body is larger than {limit} bytes")
        except ValueError:
            raise ApiError(400, "bad_request", "invalid Content-Length") from None
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "too_large", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class BodyLimit:
    """ASGI middleware: every request's body is read before the app sees the request, refused
    with 413 when it is larger than ``max_bytes`` (at once when ``Content-Length`` says so,
    else as soon as it grows past it, chunked or not), and with 408 when it has not arrived
    ``timeout`` seconds after the request's headers: a client that trickles its body (slowloris)
    cannot hold a request open for longer. Both answers close the connection; the app never runs,
    so nothing is stored. The app then gets the whole body in one message."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, 413)
            return
        chunks: list[bytes] = []
        size = 0
        refusal: int | None = None
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client went away: nobody to answer
                    chunk: bytes = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        refusal = 413
                        break
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            log.info("request body not complete after %gs: refused (408)", self.timeout)
            refusal = 408
        if refusal is not None:
            await self._refuse(scope, receive, send, refusal)
            return
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: http.disconnect when the client leaves
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int) -> None:
        if status == 413:
            response = error_response(
                413, "too_large", f"the body is larger than {self.max_bytes} bytes"
            )
        else:
            response = error_response(
                408, "timeout", f"the request body did not arrive within {self.timeout:g}s"
            )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def install_body_limit(app: FastAPI, max_bytes: int, timeout: float) -> None:
    """``KAIKU_MAX_BODY_BYTES`` and ``KAIKU_BODY_TIMEOUT_SECONDS`` for every route of ``app``."""
    app.add_middleware(BodyLimit, max_bytes=max_bytes, timeout=timeout)


HealthCheck = Callable[[], Awaitable[dict[str, bool]]]


def install_health(app: FastAPI, liveness: HealthCheck, readiness: HealthCheck) -> None:
    """``/healthz`` (the process works), ``/readyz`` (it can serve: database and broker up) and
    ``/metrics`` (Prometheus)."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        checks = await liveness()
        return JSONResponse(
            {"ok": all(checks.values()), "checks": checks},
            status_code=200 if all(checks.values()) else 503,
        )

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        checks = await readiness()
        return JSONResponse(
            {"ok": all(checks.values()), "checks": checks},
            status_code=200 if all(checks.values()) else 503,
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (seconds or an HTTP date), if any."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

"""A real local HTTP server standing in for a vendor's API in tests.

    api = LocalApi()
    @api.route("GET", "/api/v2/users/{user_id}.json")
    def user(request: Request) -> Response: ...
    with api:            # serves on http://127.0.0.1:<port> in a thread
        ...  api.url ...  api.calls (every request seen: method, path, headers, query, body)

Handlers are plain Starlette handlers (sync or async); they should check what the vendor's
documentation requires (paths, auth headers, query parameters) and answer as it documents.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support import free_port


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    query: dict[str, str]
    body: bytes


@dataclass
class LocalApi:
    port: int = field(default_factory=free_port)
    calls: list[Call] = field(default_factory=list)
    _routes: list[Route] = field(default_factory=list)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, method: str, path: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            async def endpoint(request: Request) -> Response:
                self.calls.append(
                    Call(
                        request.method,
                        request.url.path,
                        dict(request.headers),
                        dict(request.query_params),
                        await request.body(),
                    )
                )
                result = handler(request)
                if hasattr(result, "__await__"):
                    result = await result
                return result  # type: ignore[no-any-return]

            self._routes.append(Route(path, endpoint, methods=[method]))
            return handler

        return register

    def __enter__(self) -> LocalApi:
        app = Starlette(routes=self._routes)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the local vendor API did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(10)

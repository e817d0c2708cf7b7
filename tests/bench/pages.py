"""The survey page: ``GET /s/{token}`` requests/s (token signature check, the invitation and any
earlier answer read from PostgreSQL, the visit noted in ``collector_hits``, the localized page
rendered) beside a minimal FastAPI endpoint that returns a small HTML page, served and loaded the
same way in the same run."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import SecretStr

from services.collector import repository
from services.collector.app import create_app
from services.common.config import DatabaseSettings, KafkaSettings, LinkSettings
from services.common.db import create_engine, create_sessionmaker, unit_of_work
from services.common.program import load_program
from services.common.settings import CommonSettings
from services.common.tokens import LinkKeys
from tests.bench.http import Served, requests_per_second

ROOT = Path(__file__).resolve().parents[2]
LINK_KEYS = "p:bench-page-link-key-0123456789"
INVITATIONS = 2000


def minimal_app() -> FastAPI:
    app = FastAPI()

    @app.get("/s/{token}", response_class=HTMLResponse)
    async def page(token: str) -> str:
        return f"<!doctype html><title>survey</title><p>{token}</p>"

    return app


async def survey_page(
    kafka: KafkaSettings, database: DatabaseSettings, n: int
) -> tuple[str, float, str, float, str]:
    keys = LinkKeys.parse(LINK_KEYS)
    tokens = [keys.issue() for _ in range(INVITATIONS)]
    settings = CommonSettings(
        kafka=kafka, database=database, links=LinkSettings(link_keys=SecretStr(LINK_KEYS))
    )
    app = create_app(settings, program=load_program(ROOT / "deploy/local/program.yaml"))
    now = datetime.now(UTC)
    rows = [
        {
            "invitation_id": uuid.uuid4(),
            "token": token,
            "survey_id": "relationship-nps",
            "metric": "nps",
            "customer_id": f"cust-{i}",
            "locale": ("fi", "sv", "en")[i % 3],
            "survey_channel": "email",
            "expires_at": now + timedelta(days=14),
            "created_at": now,
            "team": "billing",
        }
        for i, token in enumerate(tokens)
    ]

    def get(i: int) -> tuple[str, dict[str, str], bytes]:
        return (f"/s/{tokens[i % len(tokens)]}?score={i % 11}", {}, b"")

    with Served(app) as url:  # the app's start creates the tables; it runs on its own loop
        engine = create_engine(database)
        try:
            async with unit_of_work(create_sessionmaker(engine)) as session:
                await repository.store_invitations(session, rows)
        finally:
            await engine.dispose()
        served = await requests_per_second(url, get, n, expect=200, method="GET")
    with Served(minimal_app()) as url:
        baseline = await requests_per_second(url, get, n, expect=200, method="GET")
    return ("survey_page", served, "requests/s", baseline, "requests/s")

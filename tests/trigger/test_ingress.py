"""POST /v1/events refuses bad input with a clear 4xx naming the problem, and publishes nothing."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from services.common.config import HttpSettings, KafkaSettings
from services.common.program import Program
from services.common.settings import CommonSettings
from services.trigger.app import create_app
from tests.common.test_schemas import EVENT
from tests.support import client

TOKEN = "ingress-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


@pytest.fixture
def app(program: Program):  # type: ignore[no-untyped-def]
    # No lifespan: the broker is never reached, so anything that tried to publish would fail.
    settings = CommonSettings(
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        http=HttpSettings(api_token=SecretStr(TOKEN), max_body_bytes=4096),
    )
    return create_app(settings, program=program)


async def post(app, body: bytes | str, headers: dict[str, str] = AUTH):  # type: ignore[no-untyped-def]
    async with client(app) as http:
        return await http.post("/v1/events", content=body, headers=headers)


async def test_missing_or_wrong_token_is_401(app) -> None:  # type: ignore[no-untyped-def]
    r = await post(app, json.dumps(EVENT), {"Content-Type": "application/json"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == "unauthorized"
    r = await post(app, json.dumps(EVENT), {**AUTH, "Authorization": "Bearer wrong"})
    assert r.status_code == 401


async def test_wrong_content_type_is_415(app) -> None:  # type: ignore[no-untyped-def]
    r = await post(app, json.dumps(EVENT), {**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert "JSON" in r.json()["error"]["message"]


async def test_malformed_json_is_400_with_the_position(app) -> None:  # type: ignore[no-untyped-def]
    r = await post(app, '{"specversion": "1.0",\n "id": }')
    assert r.status_code == 400
    assert r.json()["error"] == {
        "code": "malformed_json",
        "message": "the body is not valid JSON at line 2 column 8",
    }


async def test_oversized_body_is_413(app) -> None:  # type: ignore[no-untyped-def]
    big = dict(EVENT, data={**EVENT["data"], "attributes": {"x": "y" * 5000}})  # type: ignore[dict-item]
    r = await post(app, json.dumps(big))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "too_large"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (
            dict(EVENT, data={**EVENT["data"], "customer": {"email": "a@example.com"}}),  # type: ignore[dict-item]
            "data.customer.id",
        ),
        (dict(EVENT, specversion="0.3"), "specversion"),
        (
            [EVENT, dict(EVENT, data={"customer": {"id": "c", "email": "not-an-address"}})],
            "[1].data.customer.email",
        ),
        (dict(EVENT, time="yesterday"), "time"),
        (
            dict(EVENT, data={"customer": {"id": "c", "timezone": "Mars/Olympus"}}),
            "data.customer.timezone",
        ),
    ],
)
async def test_schema_violations_are_422_naming_the_field(app, body, field) -> None:  # type: ignore[no-untyped-def]
    r = await post(app, json.dumps(body))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


async def test_empty_array_and_non_object_are_422(app) -> None:  # type: ignore[no-untyped-def]
    assert (await post(app, "[]")).status_code == 422
    assert (await post(app, '"event"')).status_code == 422


async def test_openapi_documents_the_route(app) -> None:  # type: ignore[no-untyped-def]
    async with client(app) as http:
        doc = (await http.get("/openapi.json")).json()
    op = doc["paths"]["/v1/events"]["post"]
    assert set(op["responses"]) >= {"202", "400", "401", "413", "415", "422", "503"}
    assert "CloudEvent" in doc["components"]["schemas"]

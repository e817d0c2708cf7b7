"""The servicenow source: a shared secret, the business rule's JSON (state changes of incidents),
and the caller look-up through the Table API."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.events import CloudEvent
from services.trigger.ingress import Contact, LookupFailed, WebhookRequest
from services.trigger.ingress.mapping import Ignored, to_event
from services.trigger.ingress.servicenow import (
    ServiceNow,
    ServiceNowResolver,
    ServiceNowSettings,
)
from tests.trigger.webhook_support import app_with, error, post
from tests.vendor_api import LocalApi

SECRET = "sn-webhook-secret-41d9c2e7f0"
API_USER = "kaiku.integration"
API_PASSWORD = "sn-api-password-9f8e7d"
PATH = "/v1/webhooks/servicenow"
CALLER = "681ccaf9c0a8016400b98a06818d57c7"  # a sys_user sys_id (Abel Tuter in demo data)

# What the business rule in docs/webhooks/servicenow.md posts when INC0010023 is resolved; the
# values are those of ServiceNow's Table API examples (sys_id, number, state, sys_mod_count).
PAYLOAD: dict[str, Any] = {
    "table": "incident",
    "sys_id": "a9e30c7dc61122760116894de7bcc7bd",
    "number": "INC0010023",
    "state": "6",
    "previous_state": "2",
    "sys_mod_count": "5",
    "sys_updated_on": "2026-11-20 14:03:00",
    "caller_id": CALLER,
    "contact_type": "phone",
    "priority": "3",
    "assignment_group": "Service Desk",
    "assigned_to": "Beth Anglin",
}
BODY = json.dumps(PAYLOAD).encode()


def settings(**overrides: Any) -> ServiceNowSettings:
    values: dict[str, Any] = {"webhook_secret": SECRET, "instance": "acme"} | overrides
    return ServiceNowSettings(**values)


def vendor() -> ServiceNow:
    return ServiceNow(settings())


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def headers(secret: str = SECRET) -> dict[str, str]:
    return {"content-type": "application/json", "X-Kaiku-Webhook-Secret": secret}


def example_request(
    config: ServiceNowSettings | None = None,
) -> tuple[str, dict[str, str], bytes]:
    """A valid ServiceNow webhook request (path with query, headers, body) for these settings."""
    config = config or settings()
    assert config.webhook_secret is not None
    return PATH, headers(config.webhook_secret.get_secret_value()), BODY


def event_of(**changes: Any) -> CloudEvent:
    v = vendor()
    body = json.dumps(PAYLOAD | changes).encode()
    request = WebhookRequest("POST", "http://kaiku.test" + PATH, headers(), body, None)  # type: ignore[arg-type]
    [item] = v.items(request)
    event = to_event(v, item, None)
    assert isinstance(event, CloudEvent), event
    return event


# --- verification and refusals -------------------------------------------------------------------


async def test_the_secret_header_is_accepted_until_it_tries_to_publish() -> None:
    path, h, body = example_request()
    r = await post(app_with({"servicenow": vendor()}), path, body, h)
    assert r.status_code == 503
    assert error(r)["code"] == "unavailable"


async def test_set_basic_auth_credentials_are_accepted() -> None:
    h = {"content-type": "application/json", "authorization": basic("kaiku", SECRET)}
    r = await post(app_with({"servicenow": vendor()}), PATH, BODY, h)
    assert r.status_code == 503


@pytest.mark.parametrize(
    "h",
    [
        headers("sn-webhook-secret-41d9c2e7f1"),  # one byte of the secret changed
        headers("forged"),
        {"content-type": "application/json"},
        {"content-type": "application/json", "authorization": basic("kaiku", "wrong")},
        {"content-type": "application/json", "authorization": basic("admin", SECRET)},
    ],
)
async def test_wrong_or_missing_credentials_are_401(h: dict[str, str]) -> None:
    r = await post(app_with({"servicenow": vendor()}), PATH, BODY, h)
    assert r.status_code == 401
    assert error(r)["code"] == "bad_signature"
    assert SECRET not in r.text


async def test_malformed_oversize_and_wrong_content_type() -> None:
    app = app_with({"servicenow": vendor()}, max_body=2048)
    r = await post(app, PATH, b'{"table": "incident", ', headers())
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    r = await post(app, PATH, b"[]", headers())
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    big = json.dumps(PAYLOAD | {"description": "y" * 4000}).encode()
    r = await post(app, PATH, big, headers())
    assert (r.status_code, error(r)["code"]) == (413, "too_large")
    r = await post(app, PATH, BODY, headers() | {"content-type": "application/xml"})
    assert (r.status_code, error(r)["code"]) == (415, "unsupported_media_type")


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trigger.ingress import servicenow

    monkeypatch.delenv("KAIKU_SERVICENOW_WEBHOOK_SECRET", raising=False)
    assert servicenow.from_env() is None
    monkeypatch.setenv("KAIKU_SERVICENOW_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("KAIKU_SERVICENOW_INSTANCE", "acme")
    configured = servicenow.from_env()
    assert configured is not None and configured.source() == "servicenow://acme"


# --- mapping -------------------------------------------------------------------------------------


def test_a_resolved_incident_maps_to_ticket_solved() -> None:
    event = event_of()
    assert event.id == "servicenow-incident-a9e30c7dc61122760116894de7bcc7bd-5"
    assert event.source == "servicenow://acme"
    assert event.type == "ticket.solved"
    assert event.customer_id == CALLER
    assert event.time is not None and event.time.isoformat() == "2026-11-20T14:03:00+00:00"
    assert event.data.case_id == "INC0010023"
    assert event.data.channel == "phone"
    assert event.data.team == "Service Desk"
    assert event.data.agent == "Beth Anglin"
    assert event.data.attributes == {"priority": "3", "table": "incident"}


def test_delivered_twice_is_one_event_and_the_next_update_another() -> None:
    assert event_of().id == event_of().id
    assert event_of(sys_mod_count="9").id != event_of().id


def test_closed_reopened_and_other_states() -> None:
    assert event_of(state="7", previous_state="6").type == "ticket.closed"
    assert event_of(state="2", previous_state="6").type == "ticket.reopened"
    v = vendor()
    assert to_event(v, PAYLOAD | {"state": "3", "previous_state": "2"}, None) == Ignored(
        "incident.3"
    )


# --- the caller look-up --------------------------------------------------------------------------

# Table API answer for sys_user with sysparm_fields (reference fields are {"link", "value"}).
USER = {
    "result": {
        "email": "abel.tuter@example.com",
        "mobile_phone": "+358 40 765 4321",
        "phone": "",
        "preferred_language": "fi",
        "time_zone": "Europe/Helsinki",
        "company": {
            "link": "https://acme.service-now.com/api/now/table/core_company/"
            "31bea3d53790200044e0bfc8bcbe5dec",
            "value": "31bea3d53790200044e0bfc8bcbe5dec",
        },
    }
}
EXPECTED = Contact(
    email="abel.tuter@example.com",
    phone="+358407654321",
    locale="fi",
    timezone="Europe/Helsinki",
    account_id="31bea3d53790200044e0bfc8bcbe5dec",
)


def users_api(answers: list[Response]) -> LocalApi:
    api = LocalApi()

    @api.route("GET", "/api/now/table/sys_user/{sys_id}")
    def user(request: Request) -> Response:
        if request.headers.get("authorization") != basic(API_USER, API_PASSWORD):
            return JSONResponse(
                {"error": {"message": "User Not Authenticated"}, "status": "failure"},
                status_code=401,
            )
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return api


def resolver(api: LocalApi) -> ServiceNowResolver:
    return ServiceNowResolver(
        settings(api_username=API_USER, api_password=API_PASSWORD, api_base_url=api.url)
    )


async def test_the_resolver_finds_the_caller_and_caches_it() -> None:
    api = users_api([JSONResponse(USER)])
    with api:
        r = resolver(api)
        async with httpx.AsyncClient() as http:
            assert await r.resolve(event_of(), http) == EXPECTED
            assert await r.resolve(event_of(), http) == EXPECTED
    assert len(api.calls) == 1
    call = api.calls[0]
    assert (call.method, call.path) == ("GET", f"/api/now/table/sys_user/{CALLER}")
    assert call.query == {
        "sysparm_fields": "email,mobile_phone,phone,preferred_language,time_zone,company"
    }
    assert call.headers["accept"] == "application/json"


async def test_an_unknown_user_is_none() -> None:
    not_found = {
        "error": {"message": "No Record found", "detail": "Record doesn't exist"},
        "status": "failure",
    }
    api = users_api([JSONResponse(not_found, status_code=404)])
    with api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(event_of(), http) is None


async def test_rate_limited_then_found() -> None:
    api = users_api(
        [
            JSONResponse(
                {"error": {"message": "Too Many Requests"}},
                status_code=429,
                headers={"Retry-After": "0"},
            ),
            JSONResponse(USER),
        ]
    )
    with api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(event_of(), http) == EXPECTED
    assert len(api.calls) == 2


async def test_server_errors_three_times_fail_the_look_up() -> None:
    api = users_api([Response("oops", status_code=500)])
    with api:
        async with httpx.AsyncClient() as http:
            with pytest.raises(LookupFailed) as failed:
                await resolver(api).resolve(event_of(), http)
    assert len(api.calls) == 3
    assert API_PASSWORD not in str(failed.value)


async def test_a_customer_id_that_is_not_a_sys_id_is_not_looked_up() -> None:
    api = users_api([JSONResponse(USER)])
    with api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(event_of(caller_id="../sys_user"), http) is None
    assert api.calls == []


def test_resolver_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trigger.ingress import servicenow

    monkeypatch.setenv("KAIKU_SERVICENOW_INSTANCE", "acme")
    monkeypatch.delenv("KAIKU_SERVICENOW_API_USERNAME", raising=False)
    monkeypatch.delenv("KAIKU_SERVICENOW_API_PASSWORD", raising=False)
    assert servicenow.resolver_from_env() is None
    monkeypatch.setenv("KAIKU_SERVICENOW_API_USERNAME", API_USER)
    monkeypatch.setenv("KAIKU_SERVICENOW_API_PASSWORD", API_PASSWORD)
    configured = servicenow.resolver_from_env()
    assert configured is not None and configured.base == "https://acme.service-now.com"

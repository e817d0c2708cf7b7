"""The freshdesk source: a shared secret (custom header or HTTP Basic), the automation rule's JSON,
and the contact look-up through Freshdesk's API."""

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
from services.trigger.ingress.freshdesk import (
    Freshdesk,
    FreshdeskResolver,
    FreshdeskSettings,
    iana_zone,
)
from services.trigger.ingress.mapping import Ignored, Unmappable, to_event
from tests.trigger.webhook_support import app_with, error, post
from tests.vendor_api import LocalApi

SECRET = "fd-webhook-secret-7c1e0b6a9d"
API_KEY = "fd-api-key-abcdef123456"
PATH = "/v1/webhooks/freshdesk"

# The "Advanced" content of docs/webhooks/freshdesk.md as Freshdesk renders it; the key names and
# values follow Freshdesk's "Simple" mode (ticket_id, ticket_status, ticket_requester_email, …).
PAYLOAD: dict[str, Any] = {
    "freshdesk_webhook": {
        "ticket_id": "11",
        "ticket_status": "Resolved",
        "ticket_source": "Email",
        "ticket_priority": "Low",
        "ticket_type": "Incident",
        "ticket_group_name": "Billing",
        "ticket_agent_name": "Agent Alice",
        "ticket_requester_id": "42001318958",
        "ticket_requester_name": "Requester Bob",
        "ticket_requester_email": "requester-bob@example.com",
        "ticket_requester_mobile": "+358 40 123 4567",
        "ticket_requester_language": "fi",
        "triggered_event": "{status:{from:2,to:4}}",
    }
}
BODY = json.dumps(PAYLOAD).encode()


def settings(**overrides: Any) -> FreshdeskSettings:
    values: dict[str, Any] = {"webhook_secret": SECRET, "domain": "acme"} | overrides
    return FreshdeskSettings(**values)


def vendor() -> Freshdesk:
    return Freshdesk(settings())


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def headers(secret: str = SECRET) -> dict[str, str]:
    return {"content-type": "application/json", "X-Kaiku-Webhook-Secret": secret}


def example_request(
    config: FreshdeskSettings | None = None,
) -> tuple[str, dict[str, str], bytes]:
    """A valid Freshdesk webhook request (path with query, headers, body) for these settings."""
    config = config or settings()
    assert config.webhook_secret is not None
    return PATH, headers(config.webhook_secret.get_secret_value()), BODY


def unit_request(body: bytes = BODY) -> WebhookRequest:
    return WebhookRequest("POST", "http://kaiku.test" + PATH, headers(), body, None)  # type: ignore[arg-type]


def event_of(payload: dict[str, Any] = PAYLOAD) -> CloudEvent:
    v = vendor()
    [item] = v.items(unit_request(json.dumps(payload).encode()))
    event = to_event(v, item, None)
    assert isinstance(event, CloudEvent), event
    return event


# --- verification and refusals -------------------------------------------------------------------


async def test_the_secret_header_is_accepted_until_it_tries_to_publish() -> None:
    path, h, body = example_request()
    r = await post(app_with({"freshdesk": vendor()}), path, body, h)
    assert r.status_code == 503  # past verification: no broker in this app
    assert error(r)["code"] == "unavailable"


async def test_http_basic_credentials_are_accepted() -> None:
    h = {"content-type": "application/json", "authorization": basic("kaiku", SECRET)}
    r = await post(app_with({"freshdesk": vendor()}), PATH, BODY, h)
    assert r.status_code == 503


@pytest.mark.parametrize(
    "h",
    [
        headers("fd-webhook-secret-7c1e0b6a9e"),  # one byte of the secret changed
        headers("forged"),
        {"content-type": "application/json"},  # nothing
        {"content-type": "application/json", "authorization": basic("kaiku", "wrong")},
        {"content-type": "application/json", "authorization": basic("someone", SECRET)},
        {"content-type": "application/json", "authorization": "Bearer " + SECRET},
        {"content-type": "application/json", "authorization": "Basic !!!notbase64"},
    ],
)
async def test_wrong_or_missing_credentials_are_401(h: dict[str, str]) -> None:
    r = await post(app_with({"freshdesk": vendor()}), PATH, BODY, h)
    assert r.status_code == 401
    assert error(r)["code"] == "bad_signature"
    assert SECRET not in r.text


async def test_malformed_oversize_and_wrong_content_type() -> None:
    app = app_with({"freshdesk": vendor()}, max_body=2048)
    r = await post(app, PATH, b'{"freshdesk_webhook": {', headers())
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    r = await post(app, PATH, b'["not", "an", "object"]', headers())
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    big = json.dumps({"freshdesk_webhook": {"ticket_id": "1", "pad": "y" * 4000}}).encode()
    r = await post(app, PATH, big, headers())
    assert (r.status_code, error(r)["code"]) == (413, "too_large")
    r = await post(
        app, PATH, BODY, headers() | {"content-type": "application/x-www-form-urlencoded"}
    )
    assert (r.status_code, error(r)["code"]) == (415, "unsupported_media_type")


def test_the_secret_is_required_and_from_env_needs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trigger.ingress import freshdesk

    with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
        Freshdesk(FreshdeskSettings())
    monkeypatch.delenv("KAIKU_FRESHDESK_WEBHOOK_SECRET", raising=False)
    assert freshdesk.from_env() is None
    monkeypatch.setenv("KAIKU_FRESHDESK_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("KAIKU_FRESHDESK_DOMAIN", "acme")
    configured = freshdesk.from_env()
    assert configured is not None and configured.source() == "freshdesk://acme"


# --- mapping -------------------------------------------------------------------------------------


def test_a_resolved_ticket_maps_to_ticket_solved() -> None:
    event = event_of()
    assert event.id == "freshdesk-11-resolved"
    assert event.source == "freshdesk://acme"
    assert event.type == "ticket.solved"
    assert event.subject == event.customer_id == "42001318958"
    assert event.data.customer.email == "requester-bob@example.com"
    assert event.data.customer.phone == "+358401234567"
    assert event.data.customer.locale == "fi"
    assert event.data.case_id == "11"
    assert event.data.channel == "Email"
    assert event.data.team == "Billing"
    assert event.data.agent == "Agent Alice"
    assert event.data.attributes == {"priority": "Low", "ticket_type": "Incident"}


def test_delivered_twice_is_the_same_event_id() -> None:
    assert event_of().id == event_of().id
    closed = {"freshdesk_webhook": PAYLOAD["freshdesk_webhook"] | {"ticket_status": "Closed"}}
    assert event_of(closed).id == "freshdesk-11-closed"
    assert event_of(closed).type == "ticket.closed"


def test_unmapped_statuses_are_ignored_and_a_bare_object_works_too() -> None:
    v = vendor()
    pending = PAYLOAD["freshdesk_webhook"] | {"ticket_status": "Waiting on Customer"}
    [item] = v.items(unit_request(json.dumps(pending).encode()))  # no freshdesk_webhook wrapper
    assert to_event(v, item, None) == Ignored("Waiting on Customer")


def test_a_simple_mode_body_without_the_requester_id_is_unmappable() -> None:
    # Freshdesk's Simple mode has no requester id: the Advanced content is required.
    simple = {
        "freshdesk_webhook": {
            "ticket_id": "11",
            "ticket_status": "Resolved",
            "ticket_requester_email": "requester-bob@example.com",
        }
    }
    v = vendor()
    [item] = v.items(unit_request(json.dumps(simple).encode()))
    result = to_event(v, item, None)
    assert isinstance(result, Unmappable)
    assert result.event_id == "11-resolved"
    assert "ticket_requester_id" in result.reason


def test_time_zone_names_become_iana() -> None:
    assert iana_zone("Helsinki") == "Europe/Helsinki"
    assert iana_zone("Eastern Time (US & Canada)") == "America/New_York"
    assert iana_zone("Chennai") == "Asia/Kolkata"
    assert iana_zone("Europe/Stockholm") == "Europe/Stockholm"
    assert iana_zone("Nowhere Land") is None
    assert iana_zone("") is None


# --- the contact look-up -------------------------------------------------------------------------

# The shape of Freshdesk's "View a Contact" response (developers.freshdesk.com/api/#view_contact).
CONTACT: dict[str, Any] = {
    "active": True,
    "address": None,
    "company_id": 23,
    "description": None,
    "email": "requester-bob@example.com",
    "id": 42001318958,
    "job_title": None,
    "language": "fi",
    "mobile": "+358 40 123 4567",
    "name": "Requester Bob",
    "phone": "+358 9 123 4567",
    "time_zone": "Helsinki",
    "twitter_id": None,
    "custom_fields": {},
    "created_at": "2015-08-18T16:18:14Z",
    "updated_at": "2015-08-24T09:25:19Z",
    "other_emails": [],
    "deleted": False,
}
EXPECTED = Contact(
    email="requester-bob@example.com",
    phone="+358401234567",
    locale="fi",
    timezone="Europe/Helsinki",
    account_id="23",
)


def contacts_api(answers: list[Response]) -> LocalApi:
    api = LocalApi()

    @api.route("GET", "/api/v2/contacts/{contact_id}")
    def contact(request: Request) -> Response:
        expected = "Basic " + base64.b64encode(f"{API_KEY}:X".encode()).decode()
        if request.headers.get("authorization") != expected:
            return JSONResponse({"code": "invalid_credentials"}, status_code=401)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return api


def resolver(api: LocalApi) -> FreshdeskResolver:
    return FreshdeskResolver(settings(api_key=API_KEY, api_base_url=api.url))


async def test_the_resolver_finds_the_contact_and_caches_it() -> None:
    api = contacts_api([JSONResponse(CONTACT)])
    with api:
        r = resolver(api)
        async with httpx.AsyncClient() as http:
            assert await r.resolve(event_of(), http) == EXPECTED
            assert await r.resolve(event_of(), http) == EXPECTED
    assert len(api.calls) == 1  # the second came from the cache
    call = api.calls[0]
    assert (call.method, call.path) == ("GET", "/api/v2/contacts/42001318958")


async def test_an_unknown_contact_is_none() -> None:
    api = contacts_api([JSONResponse({"code": "not_found"}, status_code=404)])
    with api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(event_of(), http) is None


async def test_rate_limited_then_found() -> None:
    api = contacts_api(
        [
            JSONResponse({"code": "rate_limited"}, status_code=429, headers={"Retry-After": "0"}),
            JSONResponse(CONTACT),
        ]
    )
    with api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(event_of(), http) == EXPECTED
    assert len(api.calls) == 2


async def test_server_errors_three_times_fail_the_look_up() -> None:
    api = contacts_api([Response("oops", status_code=500)])
    with api:
        async with httpx.AsyncClient() as http:
            with pytest.raises(LookupFailed) as failed:
                await resolver(api).resolve(event_of(), http)
    assert len(api.calls) == 3
    assert API_KEY not in str(failed.value)


async def test_a_non_numeric_customer_id_is_not_looked_up() -> None:
    api = contacts_api([JSONResponse(CONTACT)])
    payload = {"freshdesk_webhook": PAYLOAD["freshdesk_webhook"] | {"ticket_requester_id": "x/y"}}
    with api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(event_of(payload), http) is None
    assert api.calls == []


def test_resolver_from_env_needs_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trigger.ingress import freshdesk

    monkeypatch.setenv("KAIKU_FRESHDESK_DOMAIN", "acme")
    monkeypatch.delenv("KAIKU_FRESHDESK_API_KEY", raising=False)
    assert freshdesk.resolver_from_env() is None
    monkeypatch.setenv("KAIKU_FRESHDESK_API_KEY", API_KEY)
    configured = freshdesk.resolver_from_env()
    assert configured is not None and configured.base == "https://acme.freshdesk.com"

"""The hubspot source: v3 signatures, freshness, refusals, mapping and the contact resolver.

Signature recipe and test vector: https://developers.hubspot.com/docs/api/webhooks/validating-requests
and HubSpot's Python SDK (hubspot-api-python, tests/spec/utils/test_signature.py). Payloads:
https://developers.hubspot.com/docs/api/webhooks ("Webhook payloads").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.events import CloudEvent
from services.common.program import SourceConfig
from services.trigger.ingress import Contact, LookupFailed, WebhookError, WebhookRequest
from services.trigger.ingress.hubspot import (
    Hubspot,
    HubspotResolver,
    HubspotSettings,
    iana_timezone,
    sign,
    signed_uri,
)
from services.trigger.ingress.mapping import Ignored, to_event
from tests.trigger.webhook_support import app_with, error, post
from tests.vendor_api import LocalApi

SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"  # the placeholder client secret of HubSpot's docs
BASE_URL = "http://kaiku.test"
PATH = "/v1/webhooks/hubspot"
TOKEN = "pat-na1-11111111-2222-3333-4444-555555555555"  # placeholder private app token

# HubSpot's documented example batch ("Webhook payloads"): the docs name the type field eventType.
DOCS_BATCH = [
    {
        "objectId": 1246965,
        "propertyName": "lifecyclestage",
        "propertyValue": "subscriber",
        "changeSource": "ACADEMY",
        "eventId": 3816279340,
        "subscriptionId": 25,
        "portalId": 33,
        "appId": 1160452,
        "occurredAt": 1462216307945,
        "eventType": "contact.propertyChange",
        "attemptNumber": 0,
    },
    {
        "objectId": 1246978,
        "changeSource": "IMPORT",
        "eventId": 3816279480,
        "subscriptionId": 22,
        "portalId": 33,
        "appId": 1160452,
        "occurredAt": 1462216307945,
        "eventType": "contact.creation",
        "attemptNumber": 0,
    },
]
# The body of the docs' signature example, byte for byte (it uses subscriptionType).
DOCS_V1_BODY = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
    b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,'
    b'"changeSource":"CRM","changeFlag":"NEW","appId":54321}]'
)
# A ticket moved to the "Closed" status (stage 4 of the default support pipeline), with the
# documented fields of a property change event.
TICKET_CLOSED = {
    "eventId": 1849523617,
    "subscriptionId": 2376154,
    "portalId": 62515,
    "appId": 54321,
    "occurredAt": 1764601200000,
    "subscriptionType": "ticket.propertyChange",
    "attemptNumber": 0,
    "objectId": 8811,
    "propertyName": "hs_pipeline_stage",
    "propertyValue": "4",
    "changeSource": "CRM_UI",
    "sourceId": "userId:45678",
}
BODY = json.dumps([TICKET_CLOSED], separators=(",", ":")).encode()
# A conversation thread closed (conversations webhooks: property "status", value OPEN or CLOSED).
THREAD_CLOSED = {
    "eventId": 95512,
    "subscriptionId": 3001,
    "portalId": 62515,
    "appId": 54321,
    "occurredAt": 1764601200000,
    "subscriptionType": "conversation.propertyChange",
    "attemptNumber": 0,
    "objectId": 7120331,
    "propertyName": "status",
    "propertyValue": "CLOSED",
    "changeSource": "CONVERSATIONS",
}


def settings(**overrides: Any) -> HubspotSettings:
    values: dict[str, Any] = {"webhook_secret": SECRET, "tolerance_seconds": 300} | overrides
    return HubspotSettings(**values)


def vendor(**overrides: Any) -> Hubspot:
    return Hubspot(settings(**overrides))


def now_ms() -> int:
    return int(time.time() * 1000)


def expected_signature(secret: str, method: str, uri: str, body: bytes, ts: int | str) -> str:
    """The documented recipe, independently of the module: base64(HMAC-SHA256(secret,
    method + uri + body + timestamp)) over UTF-8."""
    source = method.encode("utf-8") + uri.encode("utf-8") + body + str(ts).encode("utf-8")
    return base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()


# HubSpot's table of URL-encoded characters decoded in the signed URI (v3).
DECODED_IN_URI = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}


def as_signed(url: str) -> str:
    for encoded, decoded in DECODED_IN_URI.items():
        url = url.replace(encoded, decoded)
    return url


def example_request(
    secret: str = SECRET,
    base_url: str = BASE_URL,
    path: str = PATH,
    body: bytes = BODY,
    timestamp_ms: int | None = None,
) -> tuple[str, dict[str, str], bytes]:
    """A valid signed HubSpot delivery for now: (path with query, headers, body). The signature
    covers the full URL, so ``base_url`` must be the URL the app sees (or its public URL)."""
    ts = now_ms() if timestamp_ms is None else timestamp_ms
    headers = {
        "content-type": "application/json",
        "X-HubSpot-Signature-v3": expected_signature(
            secret, "POST", as_signed(base_url + path), body, ts
        ),
        "X-HubSpot-Request-Timestamp": str(ts),
    }
    return path, headers, body


def request(
    body: bytes = BODY, ts: int | None = None, received_at: datetime | None = None
) -> WebhookRequest:
    _, headers, _ = example_request(body=body, timestamp_ms=ts)
    received = received_at or datetime.now(UTC)
    return WebhookRequest("POST", BASE_URL + PATH, headers, body, received)


# --- the signature ------------------------------------------------------------------------------


def test_hubspot_sdk_v3_test_vector() -> None:
    # hubspot-api-python tests/spec/utils/test_signature.py::test_get_signature__v3
    body = b"{'example_field':'example_value'}"
    url = "https://www.example.com/webhook_uri"
    vector = "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw="
    assert expected_signature(SECRET, "POST", url, body, 15000000) == vector
    assert sign(SECRET, "POST", url, body, 15000000) == vector


def test_the_listed_url_encoded_characters_are_decoded_before_signing() -> None:
    raw = "https://kaiku.example/v1/webhooks/hubspot?src=hs%3Aapp%2Fv3&x=%28a%29&y=%20%25"
    decoded = "https://kaiku.example/v1/webhooks/hubspot?src=hs:app/v3&x=(a)&y=%20%25"
    assert signed_uri(raw) == decoded  # %20 and %25 are not in HubSpot's table
    ts = 1764601200000
    assert sign(SECRET, "POST", raw, BODY, ts) == expected_signature(
        SECRET, "POST", decoded, BODY, ts
    )
    v = vendor()
    headers = {
        "X-HubSpot-Signature-v3": expected_signature(SECRET, "POST", decoded, BODY, ts),
        "X-HubSpot-Request-Timestamp": str(ts),
    }
    at = datetime.fromtimestamp(ts / 1000, UTC)
    v.verify(WebhookRequest("POST", raw, headers, BODY, at))  # no exception


async def test_a_signed_request_is_accepted_until_it_tries_to_publish() -> None:
    path, headers, body = example_request()
    r = await post(app_with({"hubspot": vendor()}), path, body, headers)
    assert r.status_code == 503  # no broker: it got as far as publishing
    assert r.headers["retry-after"] == "5"


async def test_the_documented_example_batch_passes_verification() -> None:
    body = json.dumps(DOCS_BATCH).encode()
    path, headers, body = example_request(body=body)
    r = await post(app_with({"hubspot": vendor()}), path, body, headers)
    assert r.status_code == 503


async def test_behind_a_proxy_the_public_url_is_what_is_signed() -> None:
    public = "https://kaiku.example.com"
    path, headers, body = example_request(base_url=public, path=PATH + "?k=a%3Ab")
    app = app_with({"hubspot": vendor()}, public_url=public)
    r = await post(app, path, body, headers)
    assert r.status_code == 503
    r = await post(app_with({"hubspot": vendor()}), path, body, headers)  # no public URL set
    assert (r.status_code, error(r)["code"]) == (401, "bad_signature")


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda h, b: (h | {"X-HubSpot-Signature-v3": "A" * 43 + "="}, b), id="forged"),
        pytest.param(lambda h, b: (h, b.replace(b'"4"', b'"5"')), id="one-byte-changed"),
        pytest.param(
            lambda h, b: ({k: v for k, v in h.items() if k != "X-HubSpot-Signature-v3"}, b),
            id="unsigned",
        ),
        pytest.param(
            lambda h, b: ({k: v for k, v in h.items() if k != "X-HubSpot-Request-Timestamp"}, b),
            id="no-timestamp",
        ),
        pytest.param(
            lambda h, b: (h | {"X-HubSpot-Request-Timestamp": "yesterday"}, b), id="bad-timestamp"
        ),
        pytest.param(
            lambda h, b: (
                h | {"X-HubSpot-Request-Timestamp": str(int(h["X-HubSpot-Request-Timestamp"]) + 1)},
                b,
            ),
            id="timestamp-changed",
        ),
        pytest.param(
            lambda h, b: (h | {"X-HubSpot-Signature-v3": sign("other", "POST", BASE_URL, b, 1)}, b),
            id="wrong-secret",
        ),
    ],
)
async def test_forged_changed_or_unsigned_requests_are_401(change) -> None:  # type: ignore[no-untyped-def]
    path, headers, body = example_request()
    h, b = change(headers, body)
    r = await post(app_with({"hubspot": vendor()}), path, b, h)
    assert r.status_code == 401
    assert error(r)["code"] == "bad_signature"


async def test_stale_requests_are_401_and_the_window_is_five_minutes() -> None:
    app = app_with({"hubspot": vendor()})
    path, headers, body = example_request(timestamp_ms=now_ms() - 301_000)
    r = await post(app, path, body, headers)
    assert (r.status_code, error(r)["code"]) == (401, "bad_signature")
    assert "X-HubSpot-Request-Timestamp is 301s old" in error(r)["message"]
    path, headers, body = example_request(timestamp_ms=now_ms() - 290_000)
    r = await post(app, path, body, headers)
    assert r.status_code == 503  # inside the window: verified


def test_the_window_edges_exactly() -> None:
    ts = 1764601200000
    signed_at = datetime.fromtimestamp(ts / 1000, UTC)
    v = vendor()
    v.verify(request(ts=ts, received_at=signed_at + timedelta(seconds=299.999)))
    v.verify(request(ts=ts, received_at=signed_at + timedelta(seconds=300)))
    with pytest.raises(WebhookError) as refused:
        v.verify(request(ts=ts, received_at=signed_at + timedelta(seconds=300.001)))
    assert refused.value.status == 401
    with pytest.raises(WebhookError):  # far in the future is refused too
        v.verify(request(ts=ts, received_at=signed_at - timedelta(seconds=301)))
    lenient = vendor(tolerance_seconds=600)
    lenient.verify(request(ts=ts, received_at=signed_at + timedelta(seconds=500)))


async def test_malformed_oversize_and_wrong_content_type() -> None:
    app = app_with({"hubspot": vendor()}, max_body=2048)
    for bad in (b'[{"eventId": 1, ', b"[]", b"[1, 2]", b'"text"'):
        path, headers, body = example_request(body=bad)
        r = await post(app, path, body, headers)
        assert (r.status_code, error(r)["code"]) == (400, "malformed_payload"), bad
    big = json.dumps([TICKET_CLOSED | {"pad": "y" * 4000}]).encode()
    path, headers, body = example_request(body=big)
    r = await post(app, path, body, headers)
    assert (r.status_code, error(r)["code"]) == (413, "too_large")
    path, headers, body = example_request()
    r = await post(app, path, body, headers | {"content-type": "text/plain"})
    assert (r.status_code, error(r)["code"]) == (415, "unsupported_media_type")


# --- mapping ------------------------------------------------------------------------------------


def events(v: Hubspot, body: bytes, config: SourceConfig | None = None) -> list[Any]:
    return [to_event(v, item, config) for item in v.items(request(body))]


def test_a_closed_ticket_becomes_ticket_solved() -> None:
    [event] = events(vendor(), BODY)
    assert isinstance(event, CloudEvent)
    assert event.id == "hubspot-62515-2376154-1849523617"
    assert event.type == "ticket.solved"
    assert event.source == "hubspot://default"
    assert event.time == datetime(2025, 12, 1, 15, 0, tzinfo=UTC)
    assert event.data.customer.id == "ticket:8811"
    assert event.subject == "ticket:8811"
    assert event.data.customer.email is None  # only ids: the resolver finds the contact
    assert event.data.case_id == "8811"
    assert event.data.attributes == {
        "hubspot_object": "ticket",
        "hubspot_object_id": 8811,
        "hubspot_portal_id": 62515,
        "hubspot_change_source": "CRM_UI",
    }


def test_other_stages_and_contact_events_are_ignored_by_default() -> None:
    v = vendor()
    other = json.dumps([TICKET_CLOSED | {"propertyValue": "1"}]).encode()
    assert events(v, other) == [Ignored("ticket.hs_pipeline_stage=1")]
    assert events(v, json.dumps(DOCS_BATCH).encode()) == [
        Ignored("contact.lifecyclestage=subscriber"),
        Ignored("contact.creation"),
    ]
    assert events(v, DOCS_V1_BODY) == [Ignored("contact.creation")]


def test_portal_specific_stages_and_contact_events_are_mapped_in_the_program() -> None:
    config = SourceConfig(
        types={
            "ticket.hs_pipeline_stage=87654321": "ticket.closed",
            "ticket.hs_pipeline_stage=4": "",  # an empty value ignores the default
            "contact.creation": "contact.created",
        },
        mapping={"touchpoint": "=support", "attributes.subscription": "subscriptionId"},
    )
    v = vendor()
    custom = json.dumps([TICKET_CLOSED | {"propertyValue": "87654321"}]).encode()
    [event] = events(v, custom, config)
    assert isinstance(event, CloudEvent)
    assert (event.type, event.data.touchpoint) == ("ticket.closed", "support")
    assert event.data.attributes["subscription"] == 2376154
    assert events(v, BODY, config) == [Ignored("ticket.hs_pipeline_stage=4")]
    [_, created] = events(v, json.dumps(DOCS_BATCH).encode(), config)
    assert isinstance(created, CloudEvent)
    assert created.type == "contact.created"
    assert created.data.customer.id == "1246978"  # a contact event: the contact's own id
    assert created.data.case_id is None
    assert created.id == "hubspot-33-22-3816279480"


def test_generic_object_subscriptions_and_conversations() -> None:
    v = vendor()
    generic = TICKET_CLOSED | {"subscriptionType": "object.propertyChange", "objectTypeId": "0-5"}
    [event] = events(v, json.dumps([generic]).encode())
    assert isinstance(event, CloudEvent)
    assert (event.type, event.data.customer.id) == ("ticket.solved", "ticket:8811")
    [chat] = events(v, json.dumps([THREAD_CLOSED]).encode())
    assert isinstance(chat, CloudEvent)
    assert (chat.type, chat.data.customer.id) == ("chat.ended", "thread:7120331")
    assert chat.data.case_id is None


def test_events_of_other_portals_are_ignored_when_the_portal_is_set() -> None:
    v = vendor(portal_id="62515")
    [event] = events(v, BODY)
    assert isinstance(event, CloudEvent)
    assert event.source == "hubspot://62515"
    assert events(vendor(portal_id="33"), BODY) == [Ignored(None)]


def test_delivered_twice_or_retried_gives_the_same_event_id() -> None:
    v = vendor()
    [first] = events(v, BODY)
    [again] = events(v, BODY)
    retry = json.dumps([TICKET_CLOSED | {"attemptNumber": 3}]).encode()
    [retried] = events(v, retry)
    assert isinstance(first, CloudEvent) and isinstance(retried, CloudEvent)
    assert first.id == again.id == retried.id  # type: ignore[union-attr]
    other = json.dumps([TICKET_CLOSED | {"eventId": 1849523618}]).encode()
    [different] = events(v, other)
    assert different.id != first.id  # type: ignore[union-attr]


def test_hubspot_time_zones_become_iana_names() -> None:
    assert iana_timezone("europe_slash_helsinki") == "Europe/Helsinki"
    assert iana_timezone("america_slash_argentina_slash_buenos_aires") == (
        "America/Argentina/Buenos_Aires"
    )
    assert iana_timezone("us_slash_eastern") == "US/Eastern"
    assert iana_timezone("Europe/Stockholm") == "Europe/Stockholm"
    assert iana_timezone("mars_slash_olympus") is None
    assert iana_timezone("") is None


# --- the resolver -------------------------------------------------------------------------------

CONTACT_ID = "1246965"
CONTACT = {  # GET /crm/v3/objects/contacts/{id}?properties=...
    "id": CONTACT_ID,
    "properties": {
        "associatedcompanyid": "5551",
        "createdate": "2025-10-30T03:30:17.883Z",
        "email": "aino@example.fi",
        "hs_language": "fi",
        "hs_object_id": CONTACT_ID,
        "hs_timezone": "europe_slash_helsinki",
        "lastmodifieddate": "2025-11-30T09:12:00.000Z",
        "mobilephone": "+358 40 123 4567",
        "phone": "09 1234 5678",
    },
    "createdAt": "2025-10-30T03:30:17.883Z",
    "updatedAt": "2025-11-30T09:12:00.000Z",
    "archived": False,
}
ASSOCIATIONS = {  # GET /crm/v4/objects/tickets/{id}/associations/contacts
    "results": [
        {
            "toObjectId": int(CONTACT_ID),
            "associationTypes": [{"category": "HUBSPOT_DEFINED", "typeId": 16, "label": None}],
        }
    ]
}
NOT_FOUND = {
    "status": "error",
    "message": "resource not found",
    "correlationId": "2c9beb86-387b-4ff6-96f7-dbb486c00a95",
    "category": "OBJECT_NOT_FOUND",
}
EXPECTED = Contact(
    email="aino@example.fi",
    phone="+358401234567",
    locale="fi",
    timezone="Europe/Helsinki",
    account_id="5551",
    customer_id=CONTACT_ID,  # the person replaces the ticket as the customer
)


def ticket_event(ticket_id: int = 8811) -> CloudEvent:
    body = json.dumps([TICKET_CLOSED | {"objectId": ticket_id}]).encode()
    [event] = events(vendor(), body)
    assert isinstance(event, CloudEvent)
    return event


def resolver(api: LocalApi) -> HubspotResolver:
    return HubspotResolver(settings(api_url=api.url, access_token=TOKEN))


def hubspot_api(
    contact: list[tuple[int, dict[str, Any], dict[str, str]]] | None = None,
    associations: dict[str, Any] = ASSOCIATIONS,
) -> LocalApi:
    """A HubSpot API that checks the documented contract and answers with ``contact`` in turn."""
    api = LocalApi()
    answers = list(contact or [(200, CONTACT, {})])

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {TOKEN}"

    @api.route("GET", "/crm/v4/objects/tickets/{ticket_id}/associations/contacts")
    def ticket_contacts(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"status": "error", "category": "INVALID_AUTHENTICATION"}, 401)
        if request.path_params["ticket_id"] != "8811":
            return JSONResponse(NOT_FOUND, 404)
        return JSONResponse(associations)

    @api.route("GET", "/conversations/v3/conversations/threads/{thread_id}")
    def thread(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"status": "error", "category": "INVALID_AUTHENTICATION"}, 401)
        return JSONResponse(
            {
                "id": request.path_params["thread_id"],
                "associatedContactId": CONTACT_ID,
                "status": "CLOSED",
                "inboxId": "147959634",
                "spam": False,
                "archived": False,
                "createdAt": "2025-12-01T14:31:00Z",
                "closedAt": "2025-12-01T15:00:00Z",
                "originalChannelId": "1000",
                "originalChannelAccountId": "93719",
            }
        )

    @api.route("GET", "/crm/v3/objects/contacts/{contact_id}")
    def contact_endpoint(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"status": "error", "category": "INVALID_AUTHENTICATION"}, 401)
        wanted = set(request.query_params.get("properties", "").split(","))
        if not {"email", "mobilephone", "phone", "hs_language", "hs_timezone"} <= wanted:
            return JSONResponse({"status": "error", "message": "properties missing"}, 400)
        if request.path_params["contact_id"] != CONTACT_ID:
            return JSONResponse(NOT_FOUND, 404)
        status, body, headers = answers.pop(0) if len(answers) > 1 else answers[0]
        return JSONResponse(body, status, headers=headers)

    return api


async def test_a_ticket_resolves_to_its_contact_and_the_cache_saves_the_second_call() -> None:
    with hubspot_api() as api:
        r = resolver(api)
        async with httpx.AsyncClient(timeout=5) as http:
            assert await r.resolve(ticket_event(), http) == EXPECTED
            assert [c.path for c in api.calls] == [
                "/crm/v4/objects/tickets/8811/associations/contacts",
                f"/crm/v3/objects/contacts/{CONTACT_ID}",
            ]
            assert all(c.headers["authorization"] == f"Bearer {TOKEN}" for c in api.calls)
            assert "email" in api.calls[1].query["properties"].split(",")
            assert await r.resolve(ticket_event(), http) == EXPECTED
            assert len(api.calls) == 2  # cached


async def test_a_contact_event_and_a_thread_resolve_too() -> None:
    config = SourceConfig(types={"contact.creation": "contact.created"})
    body = DOCS_V1_BODY.replace(b'"objectId":123', f'"objectId":{CONTACT_ID}'.encode())
    [contact_event] = events(vendor(), body, config)
    [thread_event] = events(vendor(), json.dumps([THREAD_CLOSED]).encode())
    assert isinstance(contact_event, CloudEvent) and isinstance(thread_event, CloudEvent)
    assert contact_event.data.customer.id == CONTACT_ID
    with hubspot_api() as api:
        r = resolver(api)
        async with httpx.AsyncClient(timeout=5) as http:
            assert await r.resolve(contact_event, http) == EXPECTED
            assert [c.path for c in api.calls] == [f"/crm/v3/objects/contacts/{CONTACT_ID}"]
            assert await r.resolve(thread_event, http) == EXPECTED
            assert api.calls[1].path == "/conversations/v3/conversations/threads/7120331"
            assert len(api.calls) == 2  # the contact itself came from the cache


async def test_unknown_tickets_contacts_or_tickets_without_contacts_are_none() -> None:
    with hubspot_api(contact=[(404, NOT_FOUND, {})]) as api:
        async with httpx.AsyncClient(timeout=5) as http:
            assert await resolver(api).resolve(ticket_event(9999), http) is None  # 404 ticket
            assert await resolver(api).resolve(ticket_event(), http) is None  # 404 contact
    with hubspot_api(associations={"results": []}) as api:
        async with httpx.AsyncClient(timeout=5) as http:
            assert await resolver(api).resolve(ticket_event(), http) is None
            assert len(api.calls) == 1


async def test_rate_limited_then_found() -> None:
    limited = (429, {"status": "error", "policyName": "SECONDLY"}, {"Retry-After": "0"})
    with hubspot_api(contact=[limited, (200, CONTACT, {})]) as api:
        async with httpx.AsyncClient(timeout=5) as http:
            assert await resolver(api).resolve(ticket_event(), http) == EXPECTED
        assert [c.path for c in api.calls][1:] == [f"/crm/v3/objects/contacts/{CONTACT_ID}"] * 2


async def test_a_failing_api_raises_lookup_failed_without_secrets() -> None:
    failing = (500, {"status": "error", "message": "internal error"}, {})
    with hubspot_api(contact=[failing] * 4) as api:
        async with httpx.AsyncClient(timeout=5) as http:
            with pytest.raises(LookupFailed) as failed:
                await resolver(api).resolve(ticket_event(), http)
        assert len(api.calls) == 1 + 3  # the association, then three attempts
    assert "500" in str(failed.value)
    assert TOKEN not in str(failed.value)
    with hubspot_api() as api:  # a refused token is not retried
        bad = HubspotResolver(settings(api_url=api.url, access_token="pat-wrong"))
        async with httpx.AsyncClient(timeout=5) as http:
            with pytest.raises(LookupFailed) as refused:
                await bad.resolve(ticket_event(), http)
        assert len(api.calls) == 1
    assert "401" in str(refused.value) and "pat-wrong" not in str(refused.value)


def test_from_env_needs_the_secret_and_the_resolver_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.trigger.ingress import hubspot

    for name in ("WEBHOOK_SECRET", "ACCESS_TOKEN", "PORTAL_ID", "SOURCE", "API_URL"):
        monkeypatch.delenv(f"KAIKU_HUBSPOT_{name}", raising=False)
    assert hubspot.from_env() is None
    assert hubspot.resolver_from_env() is None
    monkeypatch.setenv("KAIKU_HUBSPOT_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("KAIKU_HUBSPOT_PORTAL_ID", "62515")
    monkeypatch.setenv("KAIKU_HUBSPOT_ACCESS_TOKEN", TOKEN)
    configured = hubspot.from_env()
    assert configured is not None and configured.source() == "hubspot://62515"
    assert configured.settings.tolerance_seconds == 300
    resolver_ = hubspot.resolver_from_env()
    assert resolver_ is not None and resolver_.api == "https://api.hubapi.com"
    assert TOKEN not in repr(configured.settings)

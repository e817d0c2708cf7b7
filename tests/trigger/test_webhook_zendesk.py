"""The zendesk source: Zendesk's webhook signature, both payload shapes, and the user look-up."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.events import CloudEvent
from services.trigger.ingress import Contact, LookupFailed, WebhookError, WebhookRequest
from services.trigger.ingress import zendesk as zendesk_module
from services.trigger.ingress.mapping import Ignored, Unmappable, to_event
from services.trigger.ingress.zendesk import (
    Zendesk,
    ZendeskResolver,
    ZendeskSettings,
    sign,
)
from tests.trigger.webhook_support import app_with, error, post
from tests.vendor_api import LocalApi

SECRET = "dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ=="  # the secret of Zendesk's Node example
PATH = "/v1/webhooks/zendesk"
INVOCATION_ID = "8350205582"

# A webhook subscribed to zen:event-type:ticket.status_changed, in the shape of the "Status changed"
# example of https://developer.zendesk.com/api-reference/webhooks/event-types/ticket-events/.
EVENT: dict[str, Any] = {
    "account_id": 22129848,
    "detail": {
        "actor_id": "8447388090494",
        "assignee_id": "8447388090494",
        "brand_id": "8447346621310",
        "created_at": "2025-01-08T10:12:07Z",
        "custom_status": "8447388090494",
        "description": "ticket_description",
        "external_id": None,
        "form_id": "8646151517822",
        "group_id": "8447320466430",
        "id": "5158",
        "is_public": True,
        "organization_id": "8447346622462",
        "priority": "LOW",
        "requester_id": "8447388090500",
        "status": "SOLVED",
        "subject": "ticket_subject",
        "submitter_id": "8447388090500",
        "tags": ["tag1"],
        "type": "TASK",
        "updated_at": "2025-01-08T10:12:07Z",
        "via": {"channel": "web_service"},
    },
    "event": {"current": "SOLVED", "previous": "OPEN"},
    "id": "cbe4028c-7239-495d-b020-f22348516046",
    "subject": "zen:ticket:5158",
    "time": "2025-01-08T10:12:07.672717030Z",
    "type": "zen:event-type:ticket.status_changed",
    "zendesk_event_version": "2022-11-06",
}
BODY = json.dumps(EVENT).encode()

# The recommended trigger body (docs/webhooks/zendesk.md) as Zendesk renders it.
TRIGGER_BODY = json.dumps(
    {
        "type": "zen:event-type:ticket.status_changed",
        "time": "2026-03-02T09:15Z",
        "subject": "zen:ticket:35436",
        "detail": {
            "id": "35436",
            "requester_id": "20978392",
            "organization_id": "509974",
            "assignee_id": "235323",
            "priority": "Normal",
            "via": {"channel": "Mail"},
        },
        "requester": {"email": "aino@example.fi", "phone": "+358 40 1234567", "locale": "fi"},
        "event": {"current": "SOLVED"},
    }
).encode()


def settings(**changes: Any) -> ZendeskSettings:
    values: dict[str, Any] = {
        "webhook_secret": SECRET,
        "tolerance_seconds": 300,
        "subdomain": "acme",
    }
    return ZendeskSettings(**(values | changes))


def vendor(**changes: Any) -> Zendesk:
    return Zendesk(settings(**changes))


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expected_signature(secret: str, timestamp: str, body: bytes) -> str:
    """The documented recipe, computed here independently: base64(HMACSHA256(TIMESTAMP + BODY))."""
    digest = hmac.new(secret.encode(), timestamp.encode() + body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def headers(body: bytes = BODY, at: datetime | None = None, secret: str = SECRET) -> dict[str, str]:
    timestamp = stamp(at or datetime.now(UTC))
    return {
        "content-type": "application/json",
        "user-agent": "Zendesk Webhook",
        "x-zendesk-account-id": "22129848",
        "x-zendesk-webhook-id": "01F1KRFQ6BG29CNWFR60NK5FNY",
        "x-zendesk-webhook-invocation-id": INVOCATION_ID,
        "x-zendesk-webhook-signature-timestamp": timestamp,
        "x-zendesk-webhook-signature": expected_signature(secret, timestamp, body),
    }


def example_request(
    secret: str = SECRET, now: datetime | None = None
) -> tuple[str, dict[str, str], bytes]:
    """A valid, signed ``ticket.status_changed`` delivery for
    ``KAIKU_ZENDESK_WEBHOOK_SECRET=secret`` at ``now`` (default: the current time):
    (path with query, headers, body)."""
    return PATH, headers(BODY, now, secret), BODY


def request(
    body: bytes = BODY, hdrs: dict[str, str] | None = None, received_at: datetime | None = None
) -> WebhookRequest:
    return WebhookRequest(
        "POST",
        "https://kaiku.test" + PATH,
        hdrs if hdrs is not None else headers(body),
        body,
        received_at or datetime.now(UTC),
    )


def event_of(v: Zendesk, req: WebhookRequest) -> CloudEvent:
    [item] = v.items(req)
    result = to_event(v, item, None)
    assert isinstance(result, CloudEvent), result
    return result


# --- the signature --------------------------------------------------------------------------


def test_sign_follows_the_documented_recipe() -> None:
    timestamp = "2021-07-25T10:00:00Z"
    body = b'{"say": "hello"}'
    assert sign(SECRET, timestamp, body) == expected_signature(SECRET, timestamp, body)


async def test_the_documented_payload_signed_as_documented_gets_to_publishing() -> None:
    # No broker in this app: getting as far as publishing shows up as 503.
    _, hdrs, body = example_request()
    r = await post(app_with({"zendesk": vendor()}), PATH, body, hdrs)
    assert r.status_code == 503
    assert error(r)["code"] == "unavailable"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda h, b: (h, b.replace(b"5158", b"5159")), id="one-byte-changed"),
        pytest.param(
            lambda h, b: (h | {"x-zendesk-webhook-signature": "A" * 43 + "="}, b), id="forged"
        ),
        pytest.param(lambda h, b: (headers(b, secret="another-secret"), b), id="wrong-secret"),
        pytest.param(
            lambda h, b: ({k: v for k, v in h.items() if k != "x-zendesk-webhook-signature"}, b),
            id="unsigned",
        ),
        pytest.param(
            lambda h, b: (
                {k: v for k, v in h.items() if k != "x-zendesk-webhook-signature-timestamp"},
                b,
            ),
            id="no-timestamp",
        ),
        pytest.param(
            lambda h, b: (h | {"x-zendesk-webhook-signature-timestamp": "yesterday"}, b),
            id="bad-timestamp",
        ),
        pytest.param(
            lambda h, b: (
                headers(b, at=datetime.now(UTC) - timedelta(seconds=330)),
                b,
            ),
            id="stale",
        ),
    ],
)
async def test_changed_forged_unsigned_or_stale_requests_are_401(change) -> None:  # type: ignore[no-untyped-def]
    h, b = change(headers(), BODY)
    r = await post(app_with({"zendesk": vendor()}), PATH, b, h)
    assert r.status_code == 401
    assert error(r)["code"] == "bad_signature"


def test_the_tolerance_is_exact_and_a_setting() -> None:
    signed_at = datetime(2026, 3, 2, 9, 15, tzinfo=UTC)
    hdrs = headers(BODY, at=signed_at)
    v = vendor()
    v.verify(request(BODY, hdrs, signed_at + timedelta(seconds=300)))  # just inside
    v.verify(request(BODY, hdrs, signed_at - timedelta(seconds=300)))  # clock skew the other way
    with pytest.raises(WebhookError) as caught:
        v.verify(request(BODY, hdrs, signed_at + timedelta(seconds=301)))  # just outside
    assert caught.value.status == 401
    assert "301s old" in caught.value.message
    with pytest.raises(WebhookError):
        v.verify(request(BODY, hdrs, signed_at - timedelta(seconds=301)))
    vendor(tolerance_seconds=900).verify(request(BODY, hdrs, signed_at + timedelta(seconds=899)))


def test_several_secrets_one_per_webhook() -> None:
    v = vendor(webhook_secret=f"trigger-webhook-secret, {SECRET}")
    v.verify(request(BODY, headers(BODY, secret="trigger-webhook-secret")))
    v.verify(request(BODY, headers(BODY, secret=SECRET)))
    with pytest.raises(WebhookError):
        v.verify(request(BODY, headers(BODY, secret="someone-else")))


async def test_malformed_oversize_and_wrong_content_type() -> None:
    app = app_with({"zendesk": vendor()}, max_body=4096)
    for bad in (b'{"type": "zen:event-type:ticket.status_changed", ', b"[1, 2]", b"\xff\xfe"):
        r = await post(app, PATH, bad, headers(bad))
        assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    big = json.dumps(EVENT | {"pad": "y" * 5000}).encode()
    r = await post(app, PATH, big, headers(big))
    assert (r.status_code, error(r)["code"]) == (413, "too_large")
    form = b"ticket_id=5158"
    r = await post(
        app,
        PATH,
        form,
        headers(form) | {"content-type": "application/x-www-form-urlencoded"},
    )
    assert (r.status_code, error(r)["code"]) == (415, "unsupported_media_type")


# --- the mapping ----------------------------------------------------------------------------


def test_a_status_changed_event_maps_to_ticket_solved() -> None:
    event = event_of(vendor(), request())
    assert event.id == "zendesk-cbe4028c-7239-495d-b020-f22348516046"
    assert event.source == "zendesk://acme"
    assert event.type == "ticket.solved"
    assert event.time == datetime(2025, 1, 8, 10, 12, 7, 672717, tzinfo=UTC)
    assert event.subject == "8447388090500"
    assert event.data.customer.id == "8447388090500"
    assert event.data.customer.email is None  # event payloads carry no contact details
    assert event.data.customer.account_id == "8447346622462"
    assert event.data.case_id == "5158"
    assert event.data.channel == "web_service"
    assert event.data.team == "8447320466430"
    assert event.data.agent == "8447388090494"
    assert event.data.attributes == {"priority": "LOW"}


def test_the_recommended_trigger_body_maps_with_contact_details() -> None:
    event = event_of(vendor(), request(TRIGGER_BODY))
    assert event.id == f"zendesk-{INVOCATION_ID}"  # X-Zendesk-Webhook-Invocation-Id
    assert event.type == "ticket.solved"
    assert event.time == datetime(2026, 3, 2, 9, 15, tzinfo=UTC)
    assert event.data.customer.id == "20978392"
    assert event.data.customer.email == "aino@example.fi"
    assert event.data.customer.phone == "+358401234567"
    assert event.data.customer.locale == "fi"
    assert event.data.case_id == "35436"


@pytest.mark.parametrize(
    ("transition", "expected"),
    [
        ({"current": "SOLVED", "previous": "OPEN"}, "ticket.solved"),
        ({"current": "CLOSED", "previous": "SOLVED"}, "ticket.closed"),
        ({"current": "OPEN", "previous": "SOLVED"}, "ticket.reopened"),
        ({"current": "PENDING", "previous": "CLOSED"}, "ticket.reopened"),
        ({"current": "Solved"}, "ticket.solved"),  # title case, no previous (a trigger body)
    ],
)
def test_status_transitions(transition: dict[str, str], expected: str) -> None:
    event = to_event(vendor(), EVENT | {"event": transition}, None)
    assert isinstance(event, CloudEvent)
    assert event.type == expected


def test_other_statuses_and_event_types_are_ignored() -> None:
    v = vendor()
    pending = to_event(v, EVENT | {"event": {"current": "PENDING", "previous": "OPEN"}}, None)
    assert pending == Ignored("pending")
    created = to_event(v, EVENT | {"type": "zen:event-type:ticket.created"}, None)
    assert created == Ignored("zen:event-type:ticket.created")


def test_the_program_can_change_the_mapping_and_types() -> None:
    from services.common.program import SourceConfig

    config = SourceConfig(
        mapping={"team": "detail.brand_id", "attributes.form": "detail.form_id"},
        types={"pending": "ticket.pending", "solved": ""},
    )
    v = vendor()
    pending = to_event(v, EVENT | {"event": {"current": "PENDING"}}, config)
    assert isinstance(pending, CloudEvent)
    assert pending.type == "ticket.pending"
    assert pending.data.team == "8447346621310"
    assert pending.data.attributes == {"priority": "LOW", "form": "8646151517822"}
    assert isinstance(to_event(v, EVENT, config), Ignored)  # "solved" switched off


def test_no_requester_is_unmappable() -> None:
    detail = {k: v for k, v in EVENT["detail"].items() if k != "requester_id"}
    result = to_event(vendor(), EVENT | {"detail": detail}, None)
    assert isinstance(result, Unmappable)
    assert result.event_id == "cbe4028c-7239-495d-b020-f22348516046"


def test_delivered_twice_gives_the_same_event_id() -> None:
    v = vendor()
    first = event_of(v, request(BODY, headers(BODY)))
    # A retry is signed again, at a later time: same payload, same id.
    again = headers(BODY, at=datetime.now(UTC) + timedelta(seconds=60))
    second = event_of(v, request(BODY, again, datetime.now(UTC) + timedelta(seconds=60)))
    assert first.id == second.id == "zendesk-cbe4028c-7239-495d-b020-f22348516046"
    trigger_first = event_of(v, request(TRIGGER_BODY, headers(TRIGGER_BODY)))
    trigger_again = event_of(v, request(TRIGGER_BODY, headers(TRIGGER_BODY)))
    assert trigger_first.id == trigger_again.id == f"zendesk-{INVOCATION_ID}"


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAIKU_ZENDESK_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("KAIKU_ZENDESK_SUBDOMAIN", raising=False)
    monkeypatch.delenv("KAIKU_ZENDESK_API_BASE_URL", raising=False)
    monkeypatch.delenv("KAIKU_ZENDESK_OAUTH_TOKEN", raising=False)
    assert zendesk_module.from_env() is None
    assert zendesk_module.resolver_from_env() is None
    monkeypatch.setenv("KAIKU_ZENDESK_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("KAIKU_ZENDESK_SUBDOMAIN", "acme")
    monkeypatch.setenv("KAIKU_ZENDESK_API_EMAIL", "kaiku@acme.test")
    monkeypatch.setenv("KAIKU_ZENDESK_API_TOKEN", "tok")
    configured = zendesk_module.from_env()
    assert configured is not None and configured.source() == "zendesk://acme"
    assert isinstance(zendesk_module.resolver_from_env(), ZendeskResolver)


# --- the user look-up -----------------------------------------------------------------------

API_EMAIL = "kaiku@acme.test"
API_TOKEN = "6wiIBWbGkBMo1mRDMuVwkw1EPsNkeUj95PIz2akv"  # the token format of Zendesk's docs
USER = {
    "user": {
        "id": 8447388090500,
        "url": "https://acme.zendesk.com/api/v2/users/8447388090500.json",
        "name": "Aino Virtanen",
        "email": "aino.virtanen@example.fi",
        "created_at": "2024-05-20T22:55:29Z",
        "updated_at": "2025-01-08T10:12:07Z",
        "time_zone": "Helsinki",
        "iana_time_zone": "Europe/Helsinki",
        "phone": "+358401234567",
        "shared_phone_number": False,
        "locale_id": 1181,
        "locale": "fi",
        "organization_id": 8447346622462,
        "role": "end-user",
        "verified": True,
        "active": True,
    }
}


def user_event(user_id: str = "8447388090500") -> CloudEvent:
    result = to_event(
        vendor(), EVENT | {"detail": EVENT["detail"] | {"requester_id": user_id}}, None
    )
    assert isinstance(result, CloudEvent)
    return result


def zendesk_api(answers: list[int], retry_after: str = "1") -> LocalApi:
    """Show User as documented, answering the given statuses in turn (then 200)."""
    api = LocalApi()
    expected_auth = "Basic " + base64.b64encode(f"{API_EMAIL}/token:{API_TOKEN}".encode()).decode()

    @api.route("GET", "/api/v2/users/{user_id}")
    def show_user(request: Request) -> Response:
        if request.headers.get("authorization") != expected_auth:
            return JSONResponse({"error": "Couldn't authenticate you"}, status_code=401)
        status = answers.pop(0) if answers else 200
        if status == 429:
            return Response("Rate limit exceeded", 429, headers={"Retry-After": retry_after})
        if status != 200:
            return JSONResponse({"error": "InternalError"}, status_code=status)
        if request.path_params["user_id"] != "8447388090500":
            return JSONResponse(
                {"error": "RecordNotFound", "description": "Not found"}, status_code=404
            )
        return JSONResponse(USER)

    return api


def resolver(api: LocalApi, **changes: Any) -> ZendeskResolver:
    values: dict[str, Any] = {
        "api_base_url": api.url,
        "api_email": API_EMAIL,
        "api_token": API_TOKEN,
    }
    return ZendeskResolver(settings(**(values | changes)))


async def test_the_resolver_finds_the_requester_and_caches() -> None:
    with zendesk_api([]) as api:
        r = resolver(api)
        async with httpx.AsyncClient() as http:
            contact = await r.resolve(user_event(), http)
            assert contact == Contact(
                email="aino.virtanen@example.fi",
                phone="+358401234567",
                locale="fi",
                timezone="Europe/Helsinki",
                account_id="8447346622462",
            )
            assert await r.resolve(user_event(), http) == contact
    assert len(api.calls) == 1  # the second answer came from the cache
    [call] = api.calls
    assert (call.method, call.path) == ("GET", "/api/v2/users/8447388090500")
    assert call.headers["authorization"].startswith("Basic ")
    assert ZendeskResolver.name == "zendesk"


async def test_the_resolver_with_an_oauth_token() -> None:
    api = LocalApi()

    @api.route("GET", "/api/v2/users/{user_id}")
    def show_user(request: Request) -> Response:
        if request.headers.get("authorization") != "Bearer oauth-access-token":
            return JSONResponse({"error": "Couldn't authenticate you"}, status_code=401)
        return JSONResponse(USER)

    with api:
        r = resolver(api, api_email=None, api_token=None, oauth_token="oauth-access-token")
        async with httpx.AsyncClient() as http:
            contact = await r.resolve(user_event(), http)
    assert contact is not None and contact.email == "aino.virtanen@example.fi"


async def test_an_unknown_user_is_none() -> None:
    with zendesk_api([]) as api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(user_event("404404"), http) is None
    assert [c.path for c in api.calls] == ["/api/v2/users/404404"]


async def test_429_with_retry_after_then_200() -> None:
    with zendesk_api([429]) as api:
        async with httpx.AsyncClient() as http:
            contact = await resolver(api).resolve(user_event(), http)
    assert contact is not None and contact.timezone == "Europe/Helsinki"
    assert len(api.calls) == 2


async def test_500_three_times_fails_without_leaking_credentials() -> None:
    with zendesk_api([500, 500, 500]) as api:
        async with httpx.AsyncClient() as http:
            with pytest.raises(LookupFailed) as caught:
                await resolver(api).resolve(user_event(), http)
    assert len(api.calls) == 3
    assert "500" in str(caught.value)
    assert API_TOKEN not in str(caught.value) and API_EMAIL not in str(caught.value)


async def test_refused_credentials_fail_at_once() -> None:
    with zendesk_api([]) as api:
        async with httpx.AsyncClient() as http:
            with pytest.raises(LookupFailed):
                await resolver(api, api_token="wrong").resolve(user_event(), http)
    assert len(api.calls) == 1

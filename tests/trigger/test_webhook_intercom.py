"""The intercom source: X-Hub-Signature, freshness of created_at, topics, the contact look-up."""

from __future__ import annotations

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
from services.trigger.ingress import intercom as intercom_module
from services.trigger.ingress.intercom import (
    Intercom,
    IntercomResolver,
    IntercomSettings,
    sign,
)
from services.trigger.ingress.mapping import Ignored, Unmappable, to_event
from tests.trigger.webhook_support import app_with, error, post
from tests.vendor_api import LocalApi

SECRET = "5b6a1a6e-9c7d-4a4f-8e2b-1f0c3d9e7a42"  # an app's client_secret
PATH = "/v1/webhooks/intercom"
CREATED_AT = 1_772_442_900  # 2026-03-02T09:15:00Z


def notification(created_at: int = CREATED_AT, attempts: int = 1) -> dict[str, Any]:
    """A conversation.admin.closed notification: the notification object of Intercom's webhook
    models page around an API 2.x Conversation (its contacts list, source and assignees)."""
    return {
        "type": "notification_event",
        "app_id": "ecahpwf5",
        "data": {
            "type": "notification_event_data",
            "item": {
                "type": "conversation",
                "id": "1295",
                "title": None,
                "created_at": created_at - 3600,
                "updated_at": created_at,
                "waiting_since": None,
                "snoozed_until": None,
                "open": False,
                "state": "closed",
                "read": True,
                "priority": "not_priority",
                "admin_assignee_id": 991267883,
                "team_assignee_id": "5017691",
                "tags": {"type": "tag.list", "tags": []},
                "conversation_rating": None,
                "source": {
                    "type": "conversation",
                    "id": "403918330",
                    "delivered_as": "customer_initiated",
                    "subject": "",
                    "body": "<p>Where is my parcel?</p>",
                    "author": {
                        "type": "user",
                        "id": "5ba682d23d7cf92bef87bfd4",
                        "name": "Aino Virtanen",
                        "email": "aino@example.fi",
                    },
                    "attachments": [],
                    "url": None,
                    "redacted": False,
                },
                "contacts": {
                    "type": "contact.list",
                    "contacts": [
                        {
                            "type": "contact",
                            "id": "5ba682d23d7cf92bef87bfd4",
                            "external_id": "f3b87a2e09d514c6c2e79b9a",
                        }
                    ],
                },
                "teammates": {
                    "type": "admin.list",
                    "teammates": [{"type": "admin", "id": "991267883"}],
                },
            },
        },
        "links": {},
        "id": "notif_2a8995f8-92cb-4edd-a38c-041f4cdbf659",
        "topic": "conversation.admin.closed",
        "delivery_status": "pending",
        "delivery_attempts": attempts,
        "delivered_at": 0,
        "first_sent_at": created_at,
        "created_at": created_at,
        "self": None,
    }


def body_of(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def settings(**changes: Any) -> IntercomSettings:
    values: dict[str, Any] = {"webhook_secret": SECRET, "workspace": "ecahpwf5"}
    return IntercomSettings(**(values | changes))


def vendor(**changes: Any) -> Intercom:
    return Intercom(settings(**changes))


def expected_signature(secret: str, body: bytes) -> str:
    """The documented recipe, computed here independently: sha1= + hex HMAC-SHA1 of the body."""
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def headers(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "accept": "application/json",
        "user-agent": "intercom-parrot-service-client/1.0",
        "x-hub-signature": expected_signature(secret, body),
    }


def example_request(
    secret: str = SECRET, now: datetime | None = None
) -> tuple[str, dict[str, str], bytes]:
    """A valid, signed ``conversation.admin.closed`` notification for
    ``KAIKU_INTERCOM_WEBHOOK_SECRET=secret`` created at ``now`` (default: the current time):
    (path with query, headers, body)."""
    created = int((now or datetime.now(UTC)).timestamp())
    body = body_of(notification(created))
    return PATH, headers(body, secret), body


def request(
    body: bytes, received_at: datetime, hdrs: dict[str, str] | None = None
) -> WebhookRequest:
    return WebhookRequest(
        "POST", "https://kaiku.test" + PATH, hdrs or headers(body), body, received_at
    )


def created(at: int = CREATED_AT) -> datetime:
    return datetime.fromtimestamp(at, UTC)


def event_of(v: Intercom, req: WebhookRequest) -> CloudEvent:
    v.verify(req)
    [item] = v.items(req)
    result = to_event(v, item, None)
    assert isinstance(result, CloudEvent), result
    return result


# --- the signature --------------------------------------------------------------------------


def test_sign_follows_the_documented_recipe() -> None:
    body = body_of(notification())
    assert sign(SECRET, body) == expected_signature(SECRET, body)
    assert (
        len(sign(SECRET, body)) == len("sha1=") + 40
    )  # "the hexadecimal (40-byte) representation"


async def test_the_documented_payload_signed_as_documented_gets_to_publishing() -> None:
    # No broker in this app: getting as far as publishing shows up as 503.
    _, hdrs, body = example_request()
    r = await post(app_with({"intercom": vendor()}), PATH, body, hdrs)
    assert r.status_code == 503
    assert error(r)["code"] == "unavailable"


def fresh_body() -> bytes:
    return body_of(notification(int(time.time())))


def stale() -> tuple[dict[str, str], bytes]:
    """Correctly signed, but created 7300 s ago (the tolerance is 7200 s)."""
    body = body_of(notification(int(time.time()) - 7300))
    return headers(body), body


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda h, b: (h, b.replace(b'"1295"', b'"1296"')), id="one-byte-changed"),
        pytest.param(lambda h, b: (h | {"x-hub-signature": "sha1=" + "0" * 40}, b), id="forged"),
        pytest.param(lambda h, b: (headers(b, "another-apps-secret"), b), id="wrong-secret"),
        pytest.param(
            lambda h, b: (h | {"x-hub-signature": h["x-hub-signature"].replace("sha1=", "")}, b),
            id="no-prefix",
        ),
        pytest.param(
            lambda h, b: ({k: v for k, v in h.items() if k != "x-hub-signature"}, b), id="unsigned"
        ),
        pytest.param(lambda h, b: stale(), id="stale"),
    ],
)
async def test_changed_forged_unsigned_or_stale_requests_are_401(change) -> None:  # type: ignore[no-untyped-def]
    body = fresh_body()
    h, b = change(headers(body), body)
    r = await post(app_with({"intercom": vendor()}), PATH, b, h)
    assert r.status_code == 401
    assert error(r)["code"] == "bad_signature"


def test_uppercase_hex_is_accepted() -> None:
    body = body_of(notification())
    upper = {"x-hub-signature": "sha1=" + expected_signature(SECRET, body)[5:].upper()}
    vendor().verify(request(body, created(), headers(body) | upper))


def test_freshness_of_created_at_is_exact_and_a_setting() -> None:
    body = body_of(notification())
    v = vendor()
    v.verify(request(body, created() + timedelta(seconds=7200)))  # just inside (2 hours)
    with pytest.raises(WebhookError) as caught:
        v.verify(request(body, created() + timedelta(seconds=7201)))  # just outside
    assert caught.value.status == 401
    assert "7201s old" in caught.value.message
    with pytest.raises(WebhookError):
        v.verify(request(body, created() - timedelta(seconds=7201)))  # from the future
    strict = vendor(tolerance_seconds=300)
    strict.verify(request(body, created() + timedelta(seconds=300)))
    with pytest.raises(WebhookError):
        strict.verify(request(body, created() + timedelta(seconds=301)))


def test_several_client_secrets() -> None:
    body = body_of(notification())
    v = vendor(webhook_secret=f"{SECRET},second-apps-secret")
    v.verify(request(body, created(), headers(body, "second-apps-secret")))
    v.verify(request(body, created(), headers(body, SECRET)))


async def test_malformed_oversize_and_wrong_content_type() -> None:
    app = app_with({"intercom": vendor()}, max_body=8192)
    for bad in (
        b'{"type": "notification_event", ',
        b'["notification_event"]',
        b'{"type": "notification_event", "data": {}}',  # no topic
        b'{"type": "notification_event", "topic": "ping", "data": "x"}',
    ):
        r = await post(app, PATH, bad, headers(bad))
        assert (r.status_code, error(r)["code"]) == (400, "malformed_payload"), bad
    big = body_of(notification(int(time.time())) | {"pad": "y" * 9000})
    r = await post(app, PATH, big, headers(big))
    assert (r.status_code, error(r)["code"]) == (413, "too_large")
    body = fresh_body()
    r = await post(app, PATH, body, headers(body) | {"content-type": "text/plain"})
    assert (r.status_code, error(r)["code"]) == (415, "unsupported_media_type")


# --- the mapping ----------------------------------------------------------------------------


def test_a_closed_conversation_maps_to_chat_ended() -> None:
    body = body_of(notification())
    event = event_of(vendor(), request(body, created()))
    assert event.id == "intercom-notif_2a8995f8-92cb-4edd-a38c-041f4cdbf659"
    assert event.source == "intercom://ecahpwf5"
    assert event.type == "chat.ended"
    assert event.time == created()
    assert event.data.customer.id == "5ba682d23d7cf92bef87bfd4"
    assert event.data.customer.email is None  # looked up: the author may be a teammate
    assert event.data.case_id == "1295"
    assert event.data.channel == "conversation"
    assert event.data.agent == "991267883"
    assert event.data.team == "5017691"
    assert event.data.attributes == {
        "external_id": "f3b87a2e09d514c6c2e79b9a",
        "priority": "not_priority",
    }


def test_reopened_and_other_topics() -> None:
    v = vendor()
    opened = to_event(v, notification() | {"topic": "conversation.admin.opened"}, None)
    assert isinstance(opened, CloudEvent) and opened.type == "chat.reopened"
    replied = to_event(v, notification() | {"topic": "conversation.admin.replied"}, None)
    assert replied == Ignored("conversation.admin.replied")
    ping = {"type": "notification_event", "topic": "ping", "data": {"item": {"type": "ping"}}}
    assert to_event(v, ping, None) == Ignored("ping")


def test_the_program_can_change_the_mapping_and_types() -> None:
    config = SourceConfig(
        mapping={"email": "data.item.source.author.email", "touchpoint": "=messenger"},
        types={"conversation.admin.closed": "ticket.solved"},
    )
    event = to_event(vendor(), notification(), config)
    assert isinstance(event, CloudEvent)
    assert event.type == "ticket.solved"
    assert event.data.customer.email == "aino@example.fi"
    assert event.data.touchpoint == "messenger"


def test_a_conversation_without_contacts_is_unmappable() -> None:
    payload = notification()
    payload["data"]["item"]["contacts"] = {"type": "contact.list", "contacts": []}
    result = to_event(vendor(), payload, None)
    assert isinstance(result, Unmappable)
    assert result.event_id == "notif_2a8995f8-92cb-4edd-a38c-041f4cdbf659"


def test_delivered_twice_gives_the_same_event_id() -> None:
    v = vendor()
    first = body_of(notification(attempts=1))
    resent = body_of(notification(attempts=2))  # a resend: new attempt count, new signature
    one = event_of(v, request(first, created() + timedelta(seconds=5)))
    two = event_of(v, request(resent, created() + timedelta(seconds=65)))
    assert one.id == two.id == "intercom-notif_2a8995f8-92cb-4edd-a38c-041f4cdbf659"


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAIKU_INTERCOM_WEBHOOK_SECRET", raising=False)
    monkeypatch.delenv("KAIKU_INTERCOM_ACCESS_TOKEN", raising=False)
    monkeypatch.delenv("KAIKU_INTERCOM_WORKSPACE", raising=False)
    monkeypatch.delenv("KAIKU_INTERCOM_SOURCE", raising=False)
    assert intercom_module.from_env() is None
    assert intercom_module.resolver_from_env() is None
    monkeypatch.setenv("KAIKU_INTERCOM_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("KAIKU_INTERCOM_ACCESS_TOKEN", "dG9rOmFiYw==")
    configured = intercom_module.from_env()
    assert configured is not None and configured.source() == "intercom://default"
    assert configured.settings.tolerance_seconds == 7200
    assert isinstance(intercom_module.resolver_from_env(), IntercomResolver)


# --- the contact look-up --------------------------------------------------------------------

ACCESS_TOKEN = "dG9rOjU4ZmY0ZjFlXzM0NWJfNDE5Nl9hNzUxXzJmZjhlYjQ2NzdlYzoxOjA="
CONTACT = {
    "type": "contact",
    "id": "5ba682d23d7cf92bef87bfd4",
    "workspace_id": "ecahpwf5",
    "external_id": "f3b87a2e09d514c6c2e79b9a",
    "role": "user",
    "email": "aino.virtanen@example.fi",
    "email_domain": "example.fi",
    "phone": "+358401234567",
    "formatted_phone": "+358401234567",
    "name": "Aino Virtanen",
    "owner_id": None,
    "has_hard_bounced": False,
    "marked_email_as_spam": False,
    "unsubscribed_from_emails": False,
    "created_at": 1571672154,
    "updated_at": 1571672158,
    "signed_up_at": 1571069751,
    "last_seen_at": 1571069751,
    "language_override": None,
    "browser": "chrome",
    "browser_version": "77.0.3865.90",
    "browser_language": "fi",
    "os": "OS X 10.14.6",
    "location": {"type": "location", "country": "Finland", "region": "Uusimaa", "city": "Helsinki"},
    "custom_attributes": {},
    "tags": {"type": "list", "data": [], "url": "/contacts/5ba682d23d7cf92bef87bfd4/tags"},
    "companies": {
        "type": "list",
        "data": [
            {
                "type": "company",
                "id": "531ee472cce572a6ec000006",
                "url": "/companies/531ee472cce572a6ec000006",
            }
        ],
        "url": "/contacts/5ba682d23d7cf92bef87bfd4/companies",
        "total_count": 1,
        "has_more": False,
    },
}


def contact_event(contact_id: str = "5ba682d23d7cf92bef87bfd4") -> CloudEvent:
    payload = notification()
    payload["data"]["item"]["contacts"]["contacts"][0]["id"] = contact_id
    result = to_event(vendor(), payload, None)
    assert isinstance(result, CloudEvent)
    return result


def intercom_api(answers: list[int]) -> LocalApi:
    """Retrieve a contact as documented, answering the given statuses in turn (then 200)."""
    api = LocalApi()

    @api.route("GET", "/contacts/{contact_id}")
    def show_contact(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
            errors = [{"code": "unauthorized", "message": "Access Token Invalid"}]
            return JSONResponse({"type": "error.list", "errors": errors}, status_code=401)
        if not request.headers.get("intercom-version"):
            return JSONResponse({"type": "error.list", "errors": []}, status_code=400)
        status = answers.pop(0) if answers else 200
        if status == 429:
            return JSONResponse(
                {"type": "error.list", "errors": [{"code": "rate_limit_exceeded"}]},
                status_code=429,
                headers={"Retry-After": "1", "X-RateLimit-Remaining": "0"},
            )
        if status != 200:
            return JSONResponse({"type": "error.list", "errors": []}, status_code=status)
        if request.path_params["contact_id"] != CONTACT["id"]:
            errors = [{"code": "not_found", "message": "User Not Found"}]
            return JSONResponse({"type": "error.list", "errors": errors}, status_code=404)
        return JSONResponse(CONTACT)

    return api


def resolver(api: LocalApi, **changes: Any) -> IntercomResolver:
    values: dict[str, Any] = {"api_base_url": api.url, "access_token": ACCESS_TOKEN}
    return IntercomResolver(settings(**(values | changes)))


async def test_the_resolver_finds_the_contact_and_caches() -> None:
    with intercom_api([]) as api:
        r = resolver(api)
        async with httpx.AsyncClient() as http:
            contact = await r.resolve(contact_event(), http)
            assert contact == Contact(
                email="aino.virtanen@example.fi",
                phone="+358401234567",
                locale="fi",
                timezone=None,
                account_id="531ee472cce572a6ec000006",
            )
            assert await r.resolve(contact_event(), http) == contact
    assert len(api.calls) == 1  # the second answer came from the cache
    [call] = api.calls
    assert (call.method, call.path) == ("GET", "/contacts/5ba682d23d7cf92bef87bfd4")
    assert call.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert call.headers["intercom-version"] == "2.11"
    assert IntercomResolver.name == "intercom"


async def test_language_override_wins_and_the_version_is_a_setting() -> None:
    api = LocalApi()

    @api.route("GET", "/contacts/{contact_id}")
    def show_contact(request: Request) -> Response:
        assert request.headers["intercom-version"] == "2.14"
        return JSONResponse(CONTACT | {"language_override": "sv", "companies": {"data": []}})

    with api:
        async with httpx.AsyncClient() as http:
            contact = await resolver(api, api_version="2.14").resolve(contact_event(), http)
    assert contact is not None
    assert (contact.locale, contact.account_id) == ("sv", None)


async def test_an_unknown_contact_is_none() -> None:
    with intercom_api([]) as api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(contact_event("nobody"), http) is None
    assert [c.path for c in api.calls] == ["/contacts/nobody"]


async def test_429_with_retry_after_then_200() -> None:
    with intercom_api([429]) as api:
        async with httpx.AsyncClient() as http:
            contact = await resolver(api).resolve(contact_event(), http)
    assert contact is not None and contact.email == "aino.virtanen@example.fi"
    assert len(api.calls) == 2


async def test_500_three_times_fails_without_leaking_the_token() -> None:
    with intercom_api([500, 500, 500]) as api:
        async with httpx.AsyncClient() as http:
            with pytest.raises(LookupFailed) as caught:
                await resolver(api).resolve(contact_event(), http)
    assert len(api.calls) == 3
    assert "500" in str(caught.value) and ACCESS_TOKEN not in str(caught.value)


async def test_a_refused_token_fails_at_once() -> None:
    with intercom_api([]) as api:
        async with httpx.AsyncClient() as http:
            with pytest.raises(LookupFailed):
                await resolver(api, access_token="revoked").resolve(contact_event(), http)
    assert len(api.calls) == 1

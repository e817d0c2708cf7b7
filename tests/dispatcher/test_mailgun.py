"""The mailgun provider against a local Messages API that enforces Mailgun's documented
contract, and Mailgun's signed webhooks: HMAC signatures, the documented payloads, refusals.

Docs: https://documentation.mailgun.com/docs/mailgun/api-reference/send/mailgun/messages/
post-v3--domain-name--messages, https://documentation.mailgun.com/docs/mailgun/quickstart-guide/
responses, https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks,
https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/webhook-payloads.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from services.common.webhooks import WebhookError, WebhookRequest
from services.dispatcher.channels import OutboundEmail, Receipt, SendResult
from services.dispatcher.channels.mailgun import MailgunEmail, MailgunReceipts
from services.dispatcher.config import MailgunSettings
from services.embedded import free_port
from tests.dispatcher.mailgun_api import (
    API_KEY,
    DOMAIN,
    SIGNING_KEY,
    Accepted,
    MailgunApi,
    event_data,
    signature,
    webhook,
)
from tests.vendor_api import LocalApi

SENDER = "Kaiku Surveys <surveys@kaiku.example>"
TO = "maija.virtanen@example.com"
SUBJECT = "How did we do?"
TEXT = "Tell us how we did: https://surveys.kaiku.example/s/tok"
HTML = '<p>Tell us <a href="https://surveys.kaiku.example/s/tok">how we did</a>.</p>'
UNSUBSCRIBE = (
    "<https://surveys.kaiku.example/u/tok>, <mailto:unsubscribe@kaiku.example?subject=unsubscribe>"
)


def outbound(to: str = TO, invitation_id: str | None = None) -> OutboundEmail:
    """An invitation as the dispatcher renders it: the MIME message and its headers."""
    invitation = invitation_id or str(uuid.uuid4())
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = SUBJECT
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = f"<{invitation}@kaiku.example>"
    msg["List-Unsubscribe"] = UNSUBSCRIBE
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Kaiku-Invitation"] = invitation
    msg.set_content(TEXT)
    msg.add_alternative(HTML, subtype="html")
    headers = {name: str(value) for name, value in msg.items()}
    # As a long header is folded on the wire: the provider sends it on one line.
    headers["List-Unsubscribe"] = UNSUBSCRIBE.replace(", ", ",\r\n ")
    return OutboundEmail(
        invitation_id=invitation,
        sender=SENDER,
        to=to,
        subject=SUBJECT,
        text=TEXT,
        html=HTML,
        headers=headers,
        message=msg,
    )


def settings(base_url: str, **values: Any) -> MailgunSettings:
    given: dict[str, Any] = {"api_key": SecretStr(API_KEY), "domain": DOMAIN, "base_url": base_url}
    return MailgunSettings(**({"timeout_seconds": 5} | given | values))


@pytest.fixture
def api() -> Iterator[MailgunApi]:
    with MailgunApi() as running:
        yield running


@pytest.fixture
async def provider(api: MailgunApi) -> AsyncIterator[MailgunEmail]:
    mailgun = MailgunEmail(settings(api.url))
    yield mailgun
    await mailgun.aclose()


# --- sending -------------------------------------------------------------------------------------


async def test_an_invitation_arrives_as_mailgun_documents_it(
    api: MailgunApi, provider: MailgunEmail
) -> None:
    email = outbound()
    result = await provider.send(email)

    [accepted] = api.accepted
    assert result == SendResult("sent", provider_message_id=accepted.id.strip("<>"))
    [call] = api.calls
    assert (call.method, call.path) == ("POST", f"/v3/{DOMAIN}/messages")
    assert call.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert accepted.fields == [
        ("from", SENDER),
        ("to", TO),
        ("subject", SUBJECT),
        ("text", TEXT),
        ("html", HTML),
        ("h:Message-ID", f"<{email.invitation_id}@kaiku.example>"),
        ("h:List-Unsubscribe", UNSUBSCRIBE),
        ("h:List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ("h:Auto-Submitted", "auto-generated"),
        ("h:X-Kaiku-Invitation", email.invitation_id),
        ("v:invitation_id", email.invitation_id),
    ]


async def test_the_local_api_refuses_what_mailgun_refuses(api: MailgunApi) -> None:
    good = {"from": SENDER, "to": TO, "subject": SUBJECT, "text": TEXT}
    auth = httpx.BasicAuth("api", API_KEY)
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as http:

        async def post(
            fields: dict[str, str], key: httpx.BasicAuth = auth, domain: str = DOMAIN
        ) -> httpx.Response:
            files = [(k, (None, v)) for k, v in fields.items()]
            return await http.post(f"/v3/{domain}/messages", files=files, auth=key)

        assert (await post(good)).json()["message"] == "Queued. Thank you."
        wrong_key = await post(good, httpx.BasicAuth("api", "key-wrong"))
        assert (wrong_key.status_code, wrong_key.text) == (401, "Forbidden")
        missing_from = await post({k: v for k, v in good.items() if k != "from"})
        assert (missing_from.status_code, missing_from.json()) == (
            400,
            {"message": "from parameter is missing. "},
        )
        bad_to = await post(good | {"to": "maija"})
        assert bad_to.json()["message"].startswith("to parameter is not a valid address")
        no_body = await post({k: v for k, v in good.items() if k != "text"})
        assert no_body.status_code == 400
        too_many_options = await post(good | {"h:X-Padding": "x" * 17_000})
        assert too_many_options.status_code == 400
        urlencoded = await http.post(f"/v3/{DOMAIN}/messages", data=good, auth=auth)
        assert urlencoded.status_code == 400
    assert len(api.accepted) == 1


# status, the documented body (None: the contract server's default), outcome, suppress
ERRORS: list[tuple[int, Any, str, str | None]] = [
    (
        400,
        {"message": "to parameter is not a valid address. please check documentation."},
        "permanent",
        "invalid_recipient",
    ),
    (400, {"message": "from parameter is missing. "}, "permanent", None),
    (
        400,
        {"message": "Send options (parameters starting with o:, h:, or v:) are limited to 16KB"},
        "permanent",
        None,
    ),
    (401, None, "permanent", None),  # the bare "Forbidden"
    (402, None, "permanent", None),
    (403, None, "permanent", None),
    (404, None, "transient", None),  # with JSON: "can be temporal"
    (413, None, "permanent", None),
    (429, None, "transient", None),
    (500, None, "transient", None),
    (502, None, "transient", None),
    (503, None, "transient", None),
    (504, None, "transient", None),
]


@pytest.mark.parametrize(("status", "body", "outcome", "suppress"), ERRORS)
async def test_each_documented_answer_is_classified(
    api: MailgunApi,
    provider: MailgunEmail,
    status: int,
    body: Any,
    outcome: str,
    suppress: str | None,
) -> None:
    api.fail_next(status, body=body)
    result = await provider.send(outbound())
    assert (result.outcome, result.suppress) == (outcome, suppress)
    assert result.provider_message_id is None
    assert result.reason is not None and f"mailgun {status}" in result.reason
    assert API_KEY not in result.reason
    assert api.accepted == []
    assert (await provider.send(outbound())).outcome == "sent"


async def test_a_404_without_json_is_a_wrong_endpoint_for_good() -> None:
    nowhere = LocalApi()  # answers 404 (Starlette's plain text) to every path
    with nowhere:
        mailgun = MailgunEmail(settings(nowhere.url))
        result = await mailgun.send(outbound())
        await mailgun.aclose()
    assert (result.outcome, result.reason) == ("permanent", "mailgun 404: Not Found")


async def test_a_wrong_domain_is_refused_by_the_api(api: MailgunApi) -> None:
    mailgun = MailgunEmail(settings(api.url, domain="other.kaiku.test"))
    result = await mailgun.send(outbound())
    await mailgun.aclose()
    assert result.outcome == "transient"  # Mailgun: a 404 with JSON "can be temporal"
    assert result.reason is not None and "Domain not found" in result.reason
    assert api.calls[0].path == "/v3/other.kaiku.test/messages"
    assert api.accepted == []


async def test_429_waits_as_long_as_mailgun_says(api: MailgunApi, provider: MailgunEmail) -> None:
    api.fail_next(429)  # "... limit exceeded, try again after 120 seconds"
    assert (await provider.send(outbound())).retry_after == 120.0
    api.fail_next(429, headers={"Retry-After": "9"})
    assert (await provider.send(outbound())).retry_after == 9.0
    api.fail_next(429, body={"message": "Too many requests"})
    assert (await provider.send(outbound())).retry_after is None
    api.fail_next(503, headers={"Retry-After": "60"})
    assert (await provider.send(outbound())).retry_after == 60.0


async def test_no_connection_or_no_answer_in_time_is_transient() -> None:
    refused = MailgunEmail(settings(f"http://127.0.0.1:{free_port()}"))
    result = await refused.send(outbound())
    await refused.aclose()
    assert result.outcome == "transient"
    assert result.reason is not None and result.reason.startswith("mailgun: ")
    assert API_KEY not in result.reason and TO not in result.reason

    slow = LocalApi()

    @slow.route("POST", "/v3/{domain_name}/messages")
    async def hang(request: Request) -> Response:
        await asyncio.sleep(1)
        return Response(status_code=200)

    with slow:
        late = MailgunEmail(settings(slow.url, timeout_seconds=0.2))
        result = await late.send(outbound())
        await late.aclose()
    assert (result.outcome, result.reason) == ("transient", "mailgun: timed out")


async def test_a_client_handed_in_is_used_and_left_open(api: MailgunApi) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        mailgun = MailgunEmail(settings(api.url), http)
        assert (await mailgun.send(outbound())).outcome == "sent"
        await mailgun.aclose()
        assert not http.is_closed


def test_missing_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="KAIKU_MAILGUN_API_KEY"):
        MailgunEmail(MailgunSettings(api_key=None, domain=DOMAIN))
    with pytest.raises(ValueError, match="KAIKU_MAILGUN_DOMAIN"):
        MailgunEmail(MailgunSettings(api_key=SecretStr(API_KEY), domain=None))
    with pytest.raises(ValueError, match="KAIKU_MAILGUN_WEBHOOK_SIGNING_KEY"):
        MailgunReceipts(MailgunSettings(webhook_signing_key=None))
    with pytest.raises(ValueError, match="KAIKU_MAILGUN_WEBHOOK_SIGNING_KEY"):
        MailgunReceipts(MailgunSettings(webhook_signing_key=SecretStr(" , ")))


# --- receipts: signed webhooks -------------------------------------------------------------------


def receipts_source(key: str = SIGNING_KEY, tolerance: float = 600) -> MailgunReceipts:
    return MailgunReceipts(
        MailgunSettings(webhook_signing_key=SecretStr(key), tolerance_seconds=tolerance)
    )


def request(body: bytes, received_at: datetime | None = None) -> WebhookRequest:
    return WebhookRequest(
        "POST",
        "https://kaiku.example/v1/provider-events/mailgun",
        Headers(headers={"Content-Type": "application/json"}),
        body,
        received_at or datetime.now(UTC),
    )


def received(source: MailgunReceipts, body: bytes) -> list[Receipt]:
    incoming = request(body)
    source.verify(incoming)
    return source.receipts(incoming)


def refusal(source: MailgunReceipts, body: bytes) -> WebhookError:
    with pytest.raises(WebhookError) as refused:
        source.verify(request(body))
    return refused.value


async def sent_message(api: MailgunApi, provider: MailgunEmail) -> tuple[Accepted, SendResult]:
    result = await provider.send(outbound())
    return api.accepted[-1], result


async def test_signed_events_become_receipts_of_the_message_sent(
    api: MailgunApi, provider: MailgunEmail
) -> None:
    sent, result = await sent_message(api, provider)
    invitation = sent.user_variables["invitation_id"]
    status_550 = {"code": 550, "message": "5.1.1 The email account does not exist."}
    cases: list[tuple[dict[str, Any], str | None, str | None]] = [
        (event_data("accepted", sent), None, None),
        (event_data("delivered", sent, **{"delivery-status": {"code": 250}}), "delivered", None),
        (
            event_data(
                "failed",
                sent,
                severity="permanent",
                reason="bounce",
                **{"delivery-status": status_550},
            ),
            "bounced",
            "hard_bounce",
        ),
        (
            event_data("failed", sent, severity="permanent", reason="suppress-bounce"),
            "failed",
            "hard_bounce",
        ),
        (
            event_data("failed", sent, severity="permanent", reason="suppress-unsubscribe"),
            "failed",
            "unsubscribed",
        ),
        (
            event_data("failed", sent, severity="permanent", reason="suppress-complaint"),
            "failed",
            "spam_report",
        ),
        (event_data("failed", sent, severity="permanent", reason="old"), "failed", None),
        (event_data("failed", sent, severity="permanent", reason="espblock"), "failed", None),
        (event_data("failed", sent, severity="temporary", reason="generic"), None, None),
        (event_data("opened", sent), None, None),
        (event_data("clicked", sent, url="https://surveys.kaiku.example/s/tok"), None, None),
        (event_data("complained", sent), "complained", "spam_report"),
        (event_data("unsubscribed", sent), "opted_out", "unsubscribed"),
    ]
    source = receipts_source()
    for data, status, suppress in cases:
        found = received(source, webhook(data))
        if status is None:
            assert found == [], data["event"]
            continue
        [receipt] = found
        assert (receipt.status, receipt.suppress) == (status, suppress)
        assert receipt.event_id == data["id"]
        # The message as the send named it, and the invitation by its user variable.
        assert receipt.provider_message_id == result.provider_message_id
        assert receipt.invitation_id == invitation
        assert receipt.occurred_at == datetime.fromtimestamp(data["timestamp"], UTC)
    bounce = received(source, webhook(cases[2][0]))[0]
    assert bounce.reason == "failed: bounce 550 5.1.1 The email account does not exist."


# The "Failed" event of Mailgun's events documentation (mailgun/documentation,
# source/api-events.rst) as the webhook carries it (with the event ``id`` every current payload
# has; the old example predates it), and the "Accepted" event of "Webhook Payloads".
DOCS_FAILED: dict[str, Any] = {
    "severity": "permanent",
    "tags": [],
    "envelope": {
        "transport": "smtp",
        "sender": "postmaster@samples.mailgun.org",
        "sending-ip": "184.173.153.199",
    },
    "delivery-status": {"message": "Relay Not Permitted", "code": 550, "description": None},
    "campaigns": [],
    "reason": "bounce",
    "user-variables": {},
    "flags": {"is-authenticated": True, "is-test-mode": False},
    "timestamp": 1377198389.769129,
    "message": {
        "headers": {
            "to": "recipient@example.com",
            "message-id": "20130822185902.31528.73196@samples.mailgun.org",
            "from": "John Doe <sender@example.com>",
            "subject": "Test Subject",
        },
        "attachments": [],
        "recipients": ["recipient@example.com"],
        "size": 557,
    },
    "recipient": "recipient@example.com",
    "event": "failed",
    "id": "G9Bn5sl1TC6nu79C8C0bwg",
}
DOCS_ACCEPTED: dict[str, Any] = {
    "account": {"id": "1234567890303a4bd1f33898"},
    "api-key-id": "12345678-87654321",
    "domain": {"name": "sample.mailgun.com"},
    "envelope": {
        "sender": "sender@sample.mailgun.com",
        "targets": "recipient@sample.mailgun.com",
        "transport": "smtp",
    },
    "event": "accepted",
    "flags": {"is-authenticated": True, "is-test-mode": False},
    "id": "CCXMjJ7nQi2N3BPigGOdgQ",
    "log-level": "info",
    "message": {
        "headers": {
            "from": "Sample Sender <sender@sample.mailgun.com>",
            "message-id": "20260203192638.000be97f99f8cea1@sample.mailgun.com",
            "subject": "Sample webhook payload",
            "to": "recipient@sample.mailgun.com",
        },
        "size": 341,
    },
    "method": "HTTP",
    "recipient": "recipient@sample.mailgun.com",
    "recipient-domain": "sample.mailgun.com",
    "tags": ["webhook_payload"],
    "timestamp": 1770146798.372891,
    "user-variables": [],
}


def test_the_documented_payloads_map_to_receipts() -> None:
    source = receipts_source()
    assert received(source, webhook(DOCS_FAILED)) == [
        Receipt(
            "G9Bn5sl1TC6nu79C8C0bwg",
            "bounced",
            "20130822185902.31528.73196@samples.mailgun.org",
            reason="failed: bounce 550 Relay Not Permitted",
            suppress="hard_bounce",
            occurred_at=datetime.fromtimestamp(1377198389.769129, UTC),
        )
    ]
    assert received(source, webhook(DOCS_ACCEPTED)) == []


def test_the_documented_signature_recipe_and_a_parent_signature_verify() -> None:
    source = receipts_source("key-primary, key-rotated")
    ts, token = str(int(time.time())), "e0b5477167110d68991efc6b9f89f0a11066af27834600e123"
    digest = hmac.new(b"key-rotated", (ts + token).encode(), hashlib.sha256).hexdigest()
    body = {"signature": {"timestamp": ts, "token": token, "signature": digest}}
    source.verify(request(json.dumps(body | {"event-data": DOCS_FAILED}).encode()))
    # A subaccount's domain: its own signature, and one with the primary account's key.
    parent = signature("key-primary", timestamp=int(ts), token=token)["signature"]
    signed = {"timestamp": ts, "token": token, "signature": "00" * 32, "parent-signature": parent}
    source.verify(request(json.dumps({"signature": signed, "event-data": DOCS_FAILED}).encode()))
    # An integer timestamp is read as the same time.
    as_int = {"timestamp": int(ts), "token": token, "signature": digest}
    source.verify(request(json.dumps({"signature": as_int, "event-data": DOCS_FAILED}).encode()))


def test_forged_changed_or_stale_requests_are_refused() -> None:
    source = receipts_source()
    data = DOCS_FAILED
    forged = refusal(source, webhook(data, key="someone-elses-key"))
    assert (forged.status, forged.code) == (401, "bad_signature")

    genuine = json.loads(webhook(data))
    changed = genuine | {"signature": genuine["signature"] | {"token": "x" * 50}}
    assert refusal(source, json.dumps(changed).encode()).status == 401
    later = genuine["signature"] | {"timestamp": str(int(genuine["signature"]["timestamp"]) + 1)}
    assert refusal(source, json.dumps(genuine | {"signature": later}).encode()).status == 401

    stale = refusal(source, webhook(data, timestamp=int(time.time()) - 3600))
    assert stale.status == 401 and "old" in stale.message
    ahead = refusal(source, webhook(data, timestamp=int(time.time()) + 3600))
    assert ahead.status == 401 and "future" in ahead.message

    for body in (
        b"not json",
        json.dumps({"event-data": data}).encode(),
        json.dumps({"signature": "abc", "event-data": data}).encode(),
        json.dumps({"signature": {"timestamp": "soon", "token": "t", "signature": "s"}}).encode(),
        json.dumps({"signature": {"timestamp": "1", "token": "", "signature": "s"}}).encode(),
    ):
        assert refusal(source, body).status == 401


@pytest.mark.parametrize(
    "event",
    [None, "not an object", {"id": "x"}, {"event": 7}],
)
def test_signed_but_malformed_bodies_are_400(event: Any) -> None:
    source = receipts_source()
    body = json.dumps({"signature": signature(SIGNING_KEY), "event-data": event}).encode()
    incoming = request(body)
    source.verify(incoming)
    with pytest.raises(WebhookError) as refused:
        source.receipts(incoming)
    assert (refused.value.status, refused.value.code) == (400, "malformed_payload")
    with pytest.raises(WebhookError) as not_json:
        source.receipts(request(b"\xff not json"))
    assert not_json.value.status == 400


async def test_no_address_reaches_a_log_line_a_reason_or_a_refusal(
    api: MailgunApi, provider: MailgunEmail, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.fail_next(400, body={"message": f"to parameter is not a valid address: {TO}"})
    refused_send = await provider.send(outbound())
    sent, _ = await sent_message(api, provider)
    status = {"code": 550, "message": f"5.1.1 <{TO}>: Recipient address rejected"}
    bounced = event_data(
        "failed", sent, severity="permanent", reason="bounce", **{"delivery-status": status}
    )
    no_id = {k: v for k, v in event_data("delivered", sent).items() if k != "id"}
    source = receipts_source()
    [receipt] = received(source, webhook(bounced))
    assert received(source, webhook(no_id)) == []
    forged = refusal(source, webhook(bounced, key="wrong"))

    assert refused_send.suppress == "invalid_recipient"
    assert refused_send.reason == "mailgun 400: to parameter is not a valid address: <address>"
    assert receipt.reason == "failed: bounce 550 5.1.1 <<address>>: Recipient address rejected"
    assert "without an id" in caplog.text  # the skipped event was logged
    texts = [caplog.text, refused_send.reason, forged.message, repr(receipt)]
    assert not any(TO in text for text in texts)

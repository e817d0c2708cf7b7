"""The sendgrid provider against a local Mail Send that enforces SendGrid's documented contract,
and the Signed Event Webhook: real ECDSA signatures, SendGrid's SDK test vector, the documented
event examples, refusals.

Docs: https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send,
https://www.twilio.com/docs/sendgrid/api-reference/mail-send/errors,
https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event,
https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features.
Test vector: sendgrid-python, test/unit/test_eventwebhook.py.
"""

from __future__ import annotations

import asyncio
import base64
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
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from services.common.webhooks import WebhookError, WebhookRequest
from services.dispatcher.channels import OutboundEmail, Receipt, SendResult
from services.dispatcher.channels.sendgrid import SendGridEmail, SendGridReceipts
from services.dispatcher.config import SendGridSettings
from services.embedded import free_port
from tests.dispatcher.sendgrid_api import (
    API_KEY,
    TO_INVALID,
    Accepted,
    SendGridApi,
    errors,
    event,
    public_key_b64,
    signed_headers,
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


def settings(base_url: str, **values: Any) -> SendGridSettings:
    given: dict[str, Any] = {"api_key": SecretStr(API_KEY), "base_url": base_url}
    return SendGridSettings(**({"timeout_seconds": 5} | given | values))


@pytest.fixture
def api() -> Iterator[SendGridApi]:
    with SendGridApi() as running:
        yield running


@pytest.fixture
async def provider(api: SendGridApi) -> AsyncIterator[SendGridEmail]:
    sendgrid = SendGridEmail(settings(api.url))
    yield sendgrid
    await sendgrid.aclose()


# --- sending -------------------------------------------------------------------------------------


async def test_an_invitation_arrives_as_sendgrid_documents_it(
    api: SendGridApi, provider: SendGridEmail
) -> None:
    email = outbound()
    result = await provider.send(email)

    [accepted] = api.accepted
    assert result == SendResult("sent", provider_message_id=accepted.message_id)
    [call] = api.calls
    assert (call.method, call.path) == ("POST", "/v3/mail/send")
    assert call.headers["authorization"] == f"Bearer {API_KEY}"
    body = accepted.body
    assert body["personalizations"] == [
        {"to": [{"email": TO}], "custom_args": {"invitation_id": email.invitation_id}}
    ]
    assert body["from"] == {"email": "surveys@kaiku.example", "name": "Kaiku Surveys"}
    assert body["subject"] == SUBJECT
    assert body["content"] == [
        {"type": "text/plain", "value": TEXT},
        {"type": "text/html", "value": HTML},
    ]
    # The list headers travel; To, From, Subject, Content-Type (reserved) and Date do not.
    assert body["headers"] == {
        "Message-ID": f"<{email.invitation_id}@kaiku.example>",
        "List-Unsubscribe": UNSUBSCRIBE,
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Auto-Submitted": "auto-generated",
        "X-Kaiku-Invitation": email.invitation_id,
    }


async def test_the_local_api_refuses_what_sendgrid_refuses(api: SendGridApi) -> None:
    good = {
        "personalizations": [{"to": [{"email": TO}]}],
        "from": {"email": "surveys@kaiku.example"},
        "subject": SUBJECT,
        "content": [{"type": "text/plain", "value": TEXT}],
    }
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=api.url, timeout=5) as http:

        async def post(body: Any, headers: dict[str, str] = auth) -> httpx.Response:
            return await http.post("/v3/mail/send", json=body, headers=headers)

        assert (await post(good)).status_code == 202
        assert (await post(good, {"Authorization": "Bearer SG.wrong"})).status_code == 401
        reserved = await post(good | {"headers": {"Reply-To": "x@kaiku.example"}})
        assert reserved.status_code == 400
        assert reserved.json()["errors"][0]["field"] == "headers"
        html_first = good | {
            "content": [{"type": "text/html", "value": HTML}, {"type": "text/plain", "value": TEXT}]
        }
        assert (await post(html_first)).status_code == 400
        assert (await post(good | {"personalizations": [{"to": [{"email": "x"}]}]})).json()[
            "errors"
        ][0]["field"] == "personalizations.to"
        not_utf8 = await http.post(
            "/v3/mail/send",
            content=b'{"subject": "\xff"}',
            headers=auth | {"Content-Type": "application/json"},
        )
        assert not_utf8.status_code == 415
        assert (await post({k: v for k, v in good.items() if k != "from"})).status_code == 400
    assert len(api.accepted) == 1


# status, the documented body (None: the default of the contract server), outcome, suppress
ERRORS: list[tuple[int, dict[str, Any] | None, str, str | None]] = [
    (200, {}, "permanent", None),  # sandbox mode: valid, not queued
    (400, errors(TO_INVALID, "personalizations.to"), "permanent", "invalid_recipient"),
    (
        400,
        errors(
            "The To email exceeds the maximum total length of 320 characters", "personalizations.to"
        ),
        "permanent",
        "invalid_recipient",
    ),
    (400, None, "permanent", None),
    (
        400,
        errors("The from object must be provided for every email send.", "from"),
        "permanent",
        None,
    ),
    (401, None, "permanent", None),
    (403, None, "permanent", None),
    (404, None, "permanent", None),
    (405, None, "permanent", None),
    (406, None, "permanent", None),
    (413, None, "permanent", None),
    (415, None, "permanent", None),
    (429, None, "transient", None),
    (451, None, "permanent", None),
    (500, None, "transient", None),
    (502, errors("bad gateway", None), "transient", None),
    (503, None, "transient", None),
]


@pytest.mark.parametrize(("status", "body", "outcome", "suppress"), ERRORS)
async def test_each_documented_answer_is_classified(
    api: SendGridApi,
    provider: SendGridEmail,
    status: int,
    body: dict[str, Any] | None,
    outcome: str,
    suppress: str | None,
) -> None:
    api.fail_next(status, body=body)
    result = await provider.send(outbound())
    assert (result.outcome, result.suppress) == (outcome, suppress)
    assert result.provider_message_id is None
    assert result.reason is not None and f"sendgrid {status}" in result.reason
    assert API_KEY not in result.reason
    # Nothing was taken, and the next send goes through.
    assert api.accepted == []
    assert (await provider.send(outbound())).outcome == "sent"


async def test_a_refused_request_explains_itself_by_field(
    api: SendGridApi, provider: SendGridEmail
) -> None:
    api.fail_next(400, body=errors(TO_INVALID, "personalizations.to"))
    result = await provider.send(outbound())
    assert result.reason is not None
    assert result.reason.startswith("sendgrid 400: personalizations.to: The to array must")


async def test_429_waits_as_long_as_sendgrid_says(
    api: SendGridApi, provider: SendGridEmail
) -> None:
    api.fail_next(429, headers={"Retry-After": "7"})
    assert (await provider.send(outbound())).retry_after == 7.0
    reset = int(time.time()) + 30
    api.fail_next(
        429,
        headers={
            "X-RateLimit-Limit": "150",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset),
        },
    )
    limited = await provider.send(outbound())
    assert limited.outcome == "transient"
    assert limited.retry_after is not None and 25 < limited.retry_after <= 30
    api.fail_next(503, headers={"Retry-After": "120"})
    assert (await provider.send(outbound())).retry_after == 120.0


async def test_no_connection_or_no_answer_in_time_is_transient() -> None:
    refused = SendGridEmail(settings(f"http://127.0.0.1:{free_port()}"))
    result = await refused.send(outbound())
    await refused.aclose()
    assert result.outcome == "transient"
    assert result.reason is not None and result.reason.startswith("sendgrid: ")
    assert API_KEY not in result.reason and TO not in result.reason

    slow = LocalApi()

    @slow.route("POST", "/v3/mail/send")
    async def hang(request: Request) -> Response:
        await asyncio.sleep(1)
        return Response(status_code=202)

    with slow:
        late = SendGridEmail(settings(slow.url, timeout_seconds=0.2))
        result = await late.send(outbound())
        await late.aclose()
    assert (result.outcome, result.reason) == ("transient", "sendgrid: timed out")


async def test_a_client_handed_in_is_used_and_left_open(api: SendGridApi) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        sendgrid = SendGridEmail(settings(api.url), http)
        assert (await sendgrid.send(outbound())).outcome == "sent"
        await sendgrid.aclose()
        assert not http.is_closed


def test_missing_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="KAIKU_SENDGRID_API_KEY"):
        SendGridEmail(SendGridSettings(api_key=None))
    with pytest.raises(ValueError, match="KAIKU_SENDGRID_API_KEY"):
        SendGridEmail(SendGridSettings(api_key=SecretStr(" ")))
    with pytest.raises(ValueError, match="KAIKU_SENDGRID_EVENT_PUBLIC_KEY"):
        SendGridReceipts(SendGridSettings(event_public_key=None))
    with pytest.raises(ValueError, match="KAIKU_SENDGRID_EVENT_PUBLIC_KEY is not a public key"):
        SendGridReceipts(SendGridSettings(event_public_key="not a key"))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    from cryptography.hazmat.primitives import serialization

    der = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match="not an ECDSA"):
        SendGridReceipts(SendGridSettings(event_public_key=base64.b64encode(der).decode()))


# --- receipts: the Signed Event Webhook ----------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def receipts_source(key: ec.EllipticCurvePrivateKey, tolerance: float = 600) -> SendGridReceipts:
    return SendGridReceipts(
        SendGridSettings(event_public_key=public_key_b64(key), tolerance_seconds=tolerance)
    )


def webhook(
    body: bytes, headers: dict[str, str], received_at: datetime | None = None
) -> WebhookRequest:
    return WebhookRequest(
        "POST",
        "https://kaiku.example/v1/provider-events/sendgrid",
        Headers(headers=headers),
        body,
        received_at or datetime.now(UTC),
    )


def signed(
    key: ec.EllipticCurvePrivateKey, events: list[dict[str, Any]], timestamp: int | None = None
) -> WebhookRequest:
    body = json.dumps(events).encode() + b"\r\n"
    return webhook(body, signed_headers(key, body, timestamp))


def refusal(source: SendGridReceipts, request: WebhookRequest) -> WebhookError:
    with pytest.raises(WebhookError) as refused:
        source.verify(request)
    return refused.value


async def sent_message(api: SendGridApi, provider: SendGridEmail) -> tuple[Accepted, SendResult]:
    result = await provider.send(outbound())
    return api.accepted[-1], result


async def test_signed_events_become_receipts_of_the_message_sent(
    api: SendGridApi, provider: SendGridEmail, key: ec.EllipticCurvePrivateKey
) -> None:
    sent, result = await sent_message(api, provider)
    invitation = sent.custom_args["invitation_id"]
    events = [
        event("processed", sent),
        event("deferred", sent, response="400 try again later", attempt="5"),
        event("delivered", sent, response="250 OK"),
        event("open", sent, useragent="Mozilla/5.0", ip="255.255.255.255"),
        event("click", sent, url="https://surveys.kaiku.example/s/tok"),
        event("bounce", sent, reason="500 unknown recipient", status="5.0.0", type="bounce"),
        event("bounce", sent, reason="421 try later", status="4.0.0", type="blocked"),
        event("dropped", sent, reason="Bounced Address", status="5.0.0"),
        event("spamreport", sent),
        event("unsubscribe", sent),
        event("group_unsubscribe", sent, asm_group_id=10),
        event("group_resubscribe", sent, asm_group_id=10),
    ]
    source = receipts_source(key)
    request = signed(key, events)
    source.verify(request)
    receipts = source.receipts(request)

    expected = [
        (events[2], "delivered", None),
        (events[5], "bounced", "hard_bounce"),
        (events[6], "failed", None),
        (events[7], "failed", "hard_bounce"),
        (events[8], "complained", "spam_report"),
        (events[9], "opted_out", "unsubscribed"),
        (events[10], "opted_out", "unsubscribed"),
    ]
    assert [(r.event_id, r.status, r.suppress) for r in receipts] == [
        (e["sg_event_id"], status, suppress) for e, status, suppress in expected
    ]
    # Each names the message as the send did, and the invitation by its custom argument.
    assert {r.provider_message_id for r in receipts} == {result.provider_message_id}
    assert {r.invitation_id for r in receipts} == {invitation}
    assert all(
        r.occurred_at == datetime.fromtimestamp(e["timestamp"], UTC)
        for r, (e, _, _) in zip(receipts, expected, strict=True)
    )
    assert receipts[1].reason == "bounce: bounce 5.0.0 500 unknown recipient"


# The examples of the Event Webhook Reference's delivery and engagement tables.
DOCS_MESSAGE = "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0"
DOCS_COMMON = {
    "email": "example@test.com",
    "timestamp": 1513299569,
    "smtp-id": "<14c5d75ce93.dfd.64b469@ismtpd-555>",
    "category": "cat facts",
    "sg_message_id": DOCS_MESSAGE,
}
DOCS_EVENTS: list[dict[str, Any]] = [
    DOCS_COMMON | {"event": "processed", "sg_event_id": "rbtnWrG1DVDGGGFHFyun0A=="},
    DOCS_COMMON
    | {
        "event": "dropped",
        "sg_event_id": "zmzJhfJgAfUSOW80yEbPyw==",
        "reason": "Bounced Address",
        "status": "5.0.0",
    },
    DOCS_COMMON
    | {"event": "delivered", "sg_event_id": "rWVYmVk90MjZJ9iohOBa3w==", "response": "250 OK"},
    DOCS_COMMON
    | {
        "event": "deferred",
        "sg_event_id": "t7LEShmowp86DTdUW8M-GQ==",
        "response": "400 try again later",
        "attempt": "5",
    },
    DOCS_COMMON
    | {
        "event": "bounce",
        "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw==",
        "reason": "500 unknown recipient",
        "status": "5.0.0",
        "type": "bounce",
    },
    DOCS_COMMON
    | {
        "event": "bounce",
        "sg_event_id": "6g4ZI7SA-xmRDv57GoPIPw==",
        "reason": "500 unknown recipient",
        "status": "5.0.0",
        "type": "blocked",
    },
    DOCS_COMMON | {"event": "open", "sg_event_id": "FOTFFO0ecsBE-zxFXfs6WA=="},
    DOCS_COMMON | {"event": "click", "sg_event_id": "kCAi1KttyQdEKHhdC-nuEA=="},
    DOCS_COMMON | {"event": "spamreport", "sg_event_id": "37nvH5QBz858KGVYCM4uOA=="},
    DOCS_COMMON | {"event": "unsubscribe", "sg_event_id": "zz_BjPgU_5pS-J8vlfB1sg=="},
    DOCS_COMMON
    | {"event": "group_unsubscribe", "sg_event_id": "ahSCB7xYcXFb-hEaawsPRw==", "asm_group_id": 10},
    DOCS_COMMON
    | {"event": "group_resubscribe", "sg_event_id": "w_u0vJhLT-OFfprar5N93g==", "asm_group_id": 10},
]


def test_the_documented_examples_map_to_receipts(key: ec.EllipticCurvePrivateKey) -> None:
    source = receipts_source(key)
    request = signed(key, DOCS_EVENTS)
    source.verify(request)
    at = datetime.fromtimestamp(1513299569, UTC)
    assert source.receipts(request) == [
        Receipt(
            "zmzJhfJgAfUSOW80yEbPyw==",
            "failed",
            "14c5d75ce93",
            reason="dropped: 5.0.0 Bounced Address",
            suppress="hard_bounce",
            occurred_at=at,
        ),
        Receipt("rWVYmVk90MjZJ9iohOBa3w==", "delivered", "14c5d75ce93", occurred_at=at),
        Receipt(
            "6g4ZI7SA-xmRDv57GoPIPw==",
            "bounced",
            "14c5d75ce93",
            reason="bounce: bounce 5.0.0 500 unknown recipient",
            suppress="hard_bounce",
            occurred_at=at,
        ),
        Receipt(
            "6g4ZI7SA-xmRDv57GoPIPw==",
            "failed",
            "14c5d75ce93",
            reason="bounce: blocked 5.0.0 500 unknown recipient",
            occurred_at=at,
        ),
        Receipt(
            "37nvH5QBz858KGVYCM4uOA==",
            "complained",
            "14c5d75ce93",
            suppress="spam_report",
            occurred_at=at,
        ),
        Receipt(
            "zz_BjPgU_5pS-J8vlfB1sg==",
            "opted_out",
            "14c5d75ce93",
            suppress="unsubscribed",
            occurred_at=at,
        ),
        Receipt(
            "ahSCB7xYcXFb-hEaawsPRw==",
            "opted_out",
            "14c5d75ce93",
            suppress="unsubscribed",
            occurred_at=at,
        ),
    ]


@pytest.mark.parametrize(
    ("reason", "suppress"),
    [
        ("Bounced Address", "hard_bounce"),
        ("Unsubscribed Address", "unsubscribed"),
        ("Spam Reporting Address", "spam_report"),
        ("Invalid", "invalid_recipient"),
        ("Invalid SMTPAPI header", None),
        ("Spam Content", None),
        ("Recipient List over Package Quota", None),
    ],
)
def test_a_drop_suppresses_only_when_the_address_is_on_a_list(
    key: ec.EllipticCurvePrivateKey, reason: str, suppress: str | None
) -> None:
    source = receipts_source(key)
    request = signed(key, [DOCS_EVENTS[1] | {"reason": reason}])
    [dropped] = source.receipts(request)
    assert (dropped.status, dropped.suppress) == ("failed", suppress)


# SendGrid's SDK test vector (sendgrid-python, test/unit/test_eventwebhook.py).
SDK_PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE83T4O/n84iotIvIW4mdBgQ/7dAfSmpqIM8kF9mN1flpVKS3GRqe62g"
    "w+2fNNRaINXvVpiglSI8eNEc6wEA3F+g=="
)
SDK_SIGNATURE = (
    "MEUCIGHQVtGj+Y3LkG9fLcxf3qfI10QysgDWmMOVmxG0u6ZUAiEAyBiXDWzM+uOe5W0JuG+luQAbPIqHh89M15TluLt"
    "EZtM="
)
SDK_TIMESTAMP = "1600112502"
SDK_PAYLOAD = (
    json.dumps(
        [
            {
                "email": "hello@world.com",
                "event": "dropped",
                "reason": "Bounced Address",
                "sg_event_id": "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA",
                "sg_message_id": "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-"
                "5F5FC76C-9.0",
                "smtp-id": "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>",
                "timestamp": 1600112492,
            }
        ],
        sort_keys=True,
        separators=(",", ":"),
    )
    + "\r\n"
).encode()


def sdk_request(signature: str = SDK_SIGNATURE, body: bytes = SDK_PAYLOAD) -> WebhookRequest:
    headers = {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": signature,
        "X-Twilio-Email-Event-Webhook-Timestamp": SDK_TIMESTAMP,
    }
    return webhook(body, headers, datetime.fromtimestamp(int(SDK_TIMESTAMP) + 30, UTC))


def test_sendgrids_own_test_vector_verifies() -> None:
    source = SendGridReceipts(SendGridSettings(event_public_key=SDK_PUBLIC_KEY))
    source.verify(sdk_request())
    [dropped] = source.receipts(sdk_request())
    assert dropped.provider_message_id == "LRzXl_NHStOGhQ4kofSm_A"
    assert (dropped.status, dropped.suppress) == ("failed", "hard_bounce")
    # The SDK's "bad signature" and "bad payload" vectors.
    bad = (
        "MEUCIQCtIHJeH93Y+qpYeWrySphQgpNGNr/U+UyUlBkU6n7RAwIgJTz2C+8a8xonZGi6BpSzoQsbVRamr2nlxFDW"
        "YNH3j/0="
    )
    assert refusal(source, sdk_request(signature=bad)).status == 401
    assert refusal(source, sdk_request(body=b"payload")).status == 401


def test_forged_changed_or_stale_requests_are_refused(key: ec.EllipticCurvePrivateKey) -> None:
    source = receipts_source(key)
    events = [DOCS_EVENTS[2]]
    body = json.dumps(events).encode()

    other = ec.generate_private_key(ec.SECP256R1())
    forged = refusal(source, webhook(body, signed_headers(other, body)))
    assert (forged.status, forged.code) == (401, "bad_signature")

    changed = body.replace(b"delivered", b"spamreport")
    assert refusal(source, webhook(changed, signed_headers(key, body))).status == 401

    headers = signed_headers(key, body)
    headers["X-Twilio-Email-Event-Webhook-Timestamp"] = str(int(time.time()) - 1)
    assert refusal(source, webhook(body, headers)).status == 401

    stale = refusal(source, signed(key, events, timestamp=int(time.time()) - 3600))
    assert stale.status == 401 and "old" in stale.message
    ahead = refusal(source, signed(key, events, timestamp=int(time.time()) + 3600))
    assert ahead.status == 401 and "future" in ahead.message

    unsigned = refusal(source, webhook(body, {"Content-Type": "application/json"}))
    assert unsigned.status == 401 and "X-Twilio-Email-Event-Webhook-Signature" in unsigned.message
    for garbage in ("not base64!", base64.b64encode(b"not DER").decode()):
        headers = signed_headers(key, body) | {"X-Twilio-Email-Event-Webhook-Signature": garbage}
        assert refusal(source, webhook(body, headers)).status == 401
    not_a_time = signed_headers(key, body) | {"X-Twilio-Email-Event-Webhook-Timestamp": "soon"}
    assert refusal(source, webhook(body, not_a_time)).status == 401


@pytest.mark.parametrize(
    "body", [b"not json", b'{"event": "delivered"}', b'["delivered"]', b"[1, 2]", b"\xff\xfe"]
)
def test_signed_but_malformed_bodies_are_400(key: ec.EllipticCurvePrivateKey, body: bytes) -> None:
    source = receipts_source(key)
    request = webhook(body, signed_headers(key, body))
    source.verify(request)
    with pytest.raises(WebhookError) as refused:
        source.receipts(request)
    assert (refused.value.status, refused.value.code) == (400, "malformed_payload")


async def test_no_address_reaches_a_log_line_a_reason_or_a_refusal(
    api: SendGridApi,
    provider: SendGridEmail,
    key: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    quoting = errors(
        "Each unique email address in the `personalizations` array should only be included "
        f"once. You have included {TO} more than once.",
        "personalizations",
    )
    api.fail_next(400, body=quoting)
    refused_send = await provider.send(outbound())
    sent, _ = await sent_message(api, provider)
    bounced = event(
        "bounce", sent, reason=f"550 5.1.1 <{TO}>: Recipient address rejected", type="bounce"
    )
    no_id = {k: v for k, v in event("delivered", sent).items() if k != "sg_event_id"}
    source = receipts_source(key)
    request = signed(key, [bounced, no_id])
    source.verify(request)
    receipts = source.receipts(request)
    forged = refusal(source, webhook(request.body, signed_headers(key, b"other")))

    assert refused_send.reason is not None and "<address>" in refused_send.reason
    assert [r.reason for r in receipts] == [
        "bounce: bounce 550 5.1.1 <<address>>: Recipient address rejected"
    ]
    assert "without sg_event_id" in caplog.text  # the skipped event was logged
    texts = [caplog.text, refused_send.reason, forged.message, *(repr(r) for r in receipts)]
    assert not any(TO in text for text in texts)

"""The webhook channel against a real local receiver that checks the Standard Webhooks signature
as a customer's system would."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.webhooks import (
    WebhookError,
    WebhookRequest,
    standard_secret_key,
    verify_standard,
)
from services.dispatcher.channels import (
    EmailProvider,
    OutboundEmail,
    OutboundSms,
    SendResult,
    SmsProvider,
)
from services.dispatcher.channels.webhook import WebhookChannel
from services.dispatcher.config import WebhookChannelSettings
from services.embedded import free_port
from tests.vendor_api import LocalApi

SENDER = "kaiku surveys <surveys@kaiku.test>"
ADDRESS = "maija.meikalainen@example.com"
PHONE = "+358401234567"
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
PATH = "/hooks/kaiku-invitations"


def outbound_email() -> OutboundEmail:
    invitation_id = str(uuid.uuid4())
    headers = {
        "Message-ID": f"<{invitation_id}@kaiku.test>",
        "Date": "Sat, 01 Mar 2025 12:00:00 GMT",
        "List-Unsubscribe": "<https://surveys.example.com/u/0abcdefghijklmnop>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Auto-Submitted": "auto-generated",
    }
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = ADDRESS
    msg["Subject"] = "Miten onnistuimme?"
    msg.set_content("Vastaa: https://x.test/s/1")
    return OutboundEmail(
        invitation_id=invitation_id,
        sender=SENDER,
        to=ADDRESS,
        subject="Miten onnistuimme?",
        text="Vastaa: https://x.test/s/1",
        html="<p>Vastaa: <a href='https://x.test/s/1'>kysely</a></p>",
        headers=headers,
        message=msg,
        locale="fi",
        survey_id="nps-delivery",
        customer_id="cust-1",
    )


def outbound_sms() -> OutboundSms:
    return OutboundSms(
        invitation_id=str(uuid.uuid4()),
        to=PHONE,
        body="Miten onnistuimme? https://x.test/s/1",
        encoding="GSM-7",
        segments=1,
        sender="Kaiku",
        locale="fi",
        survey_id="nps-delivery",
        customer_id="cust-1",
    )


@dataclass
class Receiver:
    """A customer's endpoint: refuses unsigned or wrongly signed calls (401), keeps the
    verified ones, and otherwise answers ``answer``."""

    api: LocalApi
    key: bytes
    answer: Response = field(default_factory=lambda: JSONResponse({}, status_code=200))
    delay: float = 0.0
    verified: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.api.url + PATH

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        incoming = WebhookRequest(
            method=request.method,
            url=str(request.url),
            headers=request.headers,
            body=body,
            received_at=datetime.now(UTC),
        )
        try:
            verify_standard(incoming, self.key, tolerance=300)
        except WebhookError as exc:
            return JSONResponse({"error": exc.code}, status_code=exc.status)
        self.verified.append((dict(request.headers), json.loads(body)))
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answer


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    api = LocalApi()
    receiver = Receiver(api, standard_secret_key(SECRET))
    api.route("POST", PATH)(receiver.handle)
    with api:
        yield receiver


def channel_for(url: str, secret: str = SECRET, timeout: float = 10.0) -> WebhookChannel:
    return WebhookChannel(
        WebhookChannelSettings(url=url, secret=SecretStr(secret), timeout_seconds=timeout)
    )


async def send(channel: WebhookChannel, message: OutboundEmail | OutboundSms) -> SendResult:
    try:
        return await channel.send(message)
    finally:
        await channel.aclose()


# -- what the receiver gets -----------------------------------------------------------------------


async def test_an_email_arrives_signed_with_the_documented_body(receiver: Receiver) -> None:
    message = outbound_email()
    channel: EmailProvider = channel_for(receiver.url)
    try:
        result = await channel.send(message)
    finally:
        await channel.aclose()

    assert result.outcome == "sent", result.reason
    assert result.provider_message_id == message.invitation_id
    [(headers, body)] = receiver.verified
    assert headers["webhook-id"] == message.invitation_id
    assert headers["content-type"] == "application/json"
    assert body == {
        "type": "invitation.email",
        "invitation_id": message.invitation_id,
        "survey_id": "nps-delivery",
        "customer_id": "cust-1",
        "locale": "fi",
        "to": ADDRESS,
        "subject": "Miten onnistuimme?",
        "text": "Vastaa: https://x.test/s/1",
        "html": "<p>Vastaa: <a href='https://x.test/s/1'>kysely</a></p>",
        "headers": message.headers,
    }


async def test_an_sms_arrives_signed_with_the_documented_body(receiver: Receiver) -> None:
    message = outbound_sms()
    channel: SmsProvider = channel_for(receiver.url)
    try:
        result = await channel.send(message)
    finally:
        await channel.aclose()

    assert result.outcome == "sent", result.reason
    [(headers, body)] = receiver.verified
    assert headers["webhook-id"] == message.invitation_id
    assert body == {
        "type": "invitation.sms",
        "invitation_id": message.invitation_id,
        "survey_id": "nps-delivery",
        "customer_id": "cust-1",
        "locale": "fi",
        "to": PHONE,
        "body": "Miten onnistuimme? https://x.test/s/1",
        "encoding": "GSM-7",
        "segments": 1,
    }


async def test_a_retry_carries_the_same_webhook_id(receiver: Receiver) -> None:
    message = outbound_sms()
    channel = channel_for(receiver.url)
    try:
        first = await channel.send(message)
        second = await channel.send(message)
    finally:
        await channel.aclose()

    assert (first.outcome, second.outcome) == ("sent", "sent")
    ids = {headers["webhook-id"] for headers, _ in receiver.verified}
    assert ids == {message.invitation_id}


async def test_a_receiver_with_another_secret_refuses_the_call(receiver: Receiver) -> None:
    other = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()

    result = await send(channel_for(receiver.url, secret=other), outbound_sms())

    assert result.outcome == "permanent"
    assert result.reason == "webhook 401"
    assert receiver.verified == []


async def test_while_rotating_both_secrets_sign(receiver: Receiver) -> None:
    old = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()

    result = await send(channel_for(receiver.url, secret=f"{old},{SECRET}"), outbound_sms())

    assert result.outcome == "sent", result.reason
    [(headers, _)] = receiver.verified
    assert len(headers["webhook-signature"].split()) == 2


# -- how the answer is classified -----------------------------------------------------------------

ANSWERS: list[tuple[Response, str, str | None, float | None]] = [
    # (answer, outcome, suppress, retry_after)
    (JSONResponse({}, status_code=200), "sent", None, None),
    (Response(status_code=204), "sent", None, None),
    (Response("ok", status_code=200, media_type="text/plain"), "sent", None, None),
    (JSONResponse({"id": "msg-123"}, status_code=202), "sent", None, None),
    (Response(status_code=408), "transient", None, None),
    (Response(status_code=429, headers={"retry-after": "7"}), "transient", None, 7.0),
    (JSONResponse({"suppress": "unsubscribed"}, status_code=429), "transient", None, None),
    (Response(status_code=500), "transient", None, None),
    (Response(status_code=503, headers={"retry-after": "30"}), "transient", None, 30.0),
    (Response(status_code=400), "permanent", None, None),
    (Response(status_code=403), "permanent", None, None),
    (Response(status_code=404), "permanent", None, None),
    (
        Response(status_code=301, headers={"location": "https://elsewhere.test/"}),
        "permanent",
        None,
        None,
    ),
    # 410: the endpoint is gone, not the recipient; even a body naming a suppression is ignored.
    (Response(status_code=410), "permanent", None, None),
    (JSONResponse({"suppress": "unsubscribed"}, status_code=410), "permanent", None, None),
    # The receiver names a suppression explicitly.
    (
        JSONResponse({"suppress": "unsubscribed"}, status_code=422),
        "permanent",
        "unsubscribed",
        None,
    ),
    (JSONResponse({"suppress": "hard_bounce"}, status_code=400), "permanent", "hard_bounce", None),
    (JSONResponse({"suppress": "whatever"}, status_code=422), "permanent", None, None),
]


@pytest.mark.parametrize(
    ("answer", "outcome", "suppress", "retry_after"),
    ANSWERS,
    ids=[f"{a.status_code}-{i}" for i, (a, *_) in enumerate(ANSWERS)],
)
async def test_answers_are_classified(
    receiver: Receiver,
    answer: Response,
    outcome: str,
    suppress: str | None,
    retry_after: float | None,
) -> None:
    receiver.answer = answer
    message = outbound_email()

    result = await send(channel_for(receiver.url), message)

    assert (result.outcome, result.suppress) == (outcome, suppress), result.reason
    assert result.retry_after == retry_after
    if outcome == "sent":
        expected = "msg-123" if answer.status_code == 202 else message.invitation_id
        assert result.provider_message_id == expected
    else:
        assert result.reason is not None
        assert result.reason.startswith(f"webhook {answer.status_code}"), result.reason
    assert len(receiver.verified) == 1


async def test_no_receiver_is_transient() -> None:
    result = await send(channel_for(f"http://127.0.0.1:{free_port()}{PATH}"), outbound_sms())

    assert result.outcome == "transient"
    assert result.reason is not None and result.reason.startswith("webhook:")


async def test_a_slow_receiver_times_out_as_transient(receiver: Receiver) -> None:
    receiver.delay = 1.0

    result = await send(channel_for(receiver.url, timeout=0.2), outbound_sms())

    assert result.outcome == "transient"
    assert result.reason == "webhook: timed out"


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "names"),
    [
        (WebhookChannelSettings(secret=SecretStr(SECRET)), "KAIKU_SEND_WEBHOOK_URL"),
        (WebhookChannelSettings(url="https://hooks.example.com/x"), "KAIKU_SEND_WEBHOOK_SECRET"),
        (
            WebhookChannelSettings(url="https://hooks.example.com/x", secret=SecretStr(" ")),
            "KAIKU_SEND_WEBHOOK_SECRET",
        ),
        (
            WebhookChannelSettings(url="hooks.example.com/x", secret=SecretStr(SECRET)),
            "KAIKU_SEND_WEBHOOK_URL",
        ),
    ],
)
def test_missing_settings_are_named(settings: WebhookChannelSettings, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        WebhookChannel(settings)


def test_a_malformed_whsec_secret_is_refused_without_quoting_it() -> None:
    bad = "whsec_not*base64!"
    settings = WebhookChannelSettings(url="https://hooks.example.com/x", secret=SecretStr(bad))

    with pytest.raises(ValueError, match="KAIKU_SEND_WEBHOOK_SECRET") as raised:
        WebhookChannel(settings)

    assert bad not in str(raised.value)


# -- logging --------------------------------------------------------------------------------------


async def test_no_address_phone_or_secret_in_any_log_line(
    caplog: pytest.LogCaptureFixture, receiver: Receiver
) -> None:
    caplog.set_level(logging.DEBUG)
    channel = channel_for(receiver.url)
    try:
        outcomes = [(await channel.send(outbound_email())).outcome]
        outcomes.append((await channel.send(outbound_sms())).outcome)
        receiver.answer = JSONResponse({"error": f"no such {ADDRESS} / {PHONE}"}, status_code=422)
        outcomes.append((await channel.send(outbound_email())).outcome)
        receiver.answer = Response(status_code=503)
        outcomes.append((await channel.send(outbound_sms())).outcome)
    finally:
        await channel.aclose()
    outcomes.append((await send(channel_for(receiver.url, secret="wrong"), outbound_sms())).outcome)

    assert outcomes == ["sent", "sent", "permanent", "transient", "permanent"]
    assert any(r.name == "services.dispatcher.channels.webhook" for r in caplog.records)
    for record in caplog.records:
        line = record.getMessage()
        for private in (ADDRESS, PHONE, SECRET, SECRET.removeprefix("whsec_")):
            assert private not in line, line

"""46elks: sends against a local API that enforces 46elks' documented contract, the failure
classification, and the delivery reports and inbound STOPs 46elks posts back with the callback
secret in the URL's Basic credentials.

Contract: https://46elks.com/docs/send-sms, https://46elks.com/docs/sms-delivery-reports,
https://46elks.com/docs/receive-sms.
"""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime

import pytest
from pydantic import SecretStr
from starlette.datastructures import Headers

from services.common.webhooks import WebhookError, WebhookRequest
from services.dispatcher.channels import OutboundSms, Receipt, SendResult
from services.dispatcher.channels.elks import ElksReceipts, ElksSms, callback_url
from services.dispatcher.config import ElksSettings
from tests.dispatcher.elks_api import PASSWORD, USERNAME, ElksApi, Receiver, post_as_46elks
from tests.support import free_port

TO = "+46701234567"
SENDER = "Kaiku"
SECRET = "3f9a1c7e5b2d4068a1b2c3d4e5f60718"
CALLBACK_PATH = "/v1/provider-events/46elks"
PHONE_DIGITS = ("46701234567", "358401234567", "46766861004")


def settings(api_url: str = "http://127.0.0.1:9", **overrides: object) -> ElksSettings:
    values: dict[str, object] = {
        "username": USERNAME,
        "password": SecretStr(PASSWORD),
        "base_url": api_url,
        "callback_secret": SecretStr(SECRET),
        "timeout_seconds": 5.0,
        **overrides,
    }
    return ElksSettings(**values)  # type: ignore[arg-type]


def sms(to: str = TO, **kw: object) -> OutboundSms:
    return OutboundSms(
        invitation_id="inv-1", to=to, body="Kiitos! Arvioi: https://kaiku.test/s/x", **kw
    )  # type: ignore[arg-type]


async def send_once(
    api: ElksApi,
    message: OutboundSms | None = None,
    report_url: str | None = f"https://kaiku.test{CALLBACK_PATH}",
    **overrides: object,
) -> SendResult:
    provider = ElksSms(
        settings(api.url, **overrides), sender=SENDER, delivery_report_url=report_url
    )
    try:
        return await provider.send(message or sms())
    finally:
        await provider.aclose()


# -- sending ---------------------------------------------------------------------------------------


async def test_a_send_arrives_with_the_documented_fields_and_answers_the_id() -> None:
    with ElksApi() as api:
        result = await send_once(api)
    assert result.outcome == "sent"
    assert [m["id"] for m in api.messages] == [result.provider_message_id]
    arrived = {k: v for k, v in api.messages[0].items() if k != "id"}
    assert arrived == {
        "from": SENDER,
        "to": TO,
        "message": "Kiitos! Arvioi: https://kaiku.test/s/x",
        "whendelivered": f"https://kaiku:{SECRET}@kaiku.test{CALLBACK_PATH}",
    }
    (call,) = api.api.calls
    assert call.path == "/a1/sms"


async def test_without_a_report_url_there_is_no_whendelivered_and_the_message_sender_wins() -> None:
    with ElksApi() as api:
        result = await send_once(api, sms(sender="+46766861004"), report_url=None)
    assert result.outcome == "sent"
    assert "whendelivered" not in api.messages[0]
    assert api.messages[0]["from"] == "+46766861004"


@pytest.mark.parametrize(
    ("status", "text", "outcome"),
    [
        (400, "Invalid to number: {to}", "permanent"),
        (403, "Not enough credits", "permanent"),
        (402, "", "permanent"),
        (404, "Not found", "permanent"),
        (429, "Too many requests", "transient"),
        (500, "Internal error", "transient"),
        (503, "", "transient"),
    ],
)
async def test_failures_are_classified_by_status(status: int, text: str, outcome: str) -> None:
    with ElksApi() as api:
        api.fail_next(status, text)
        result = await send_once(api)
    assert api.refusals[-1][0] == status
    assert (result.outcome, result.suppress) == (outcome, None)
    assert str(status) in (result.reason or "")
    assert not any(digits in (result.reason or "") for digits in PHONE_DIGITS)


async def test_a_number_that_breaks_the_contract_is_refused_and_not_repeated() -> None:
    with ElksApi() as api:
        result = await send_once(api, sms(to="0701234567"))
    assert api.refusals[-1][0] == 400
    assert result.outcome == "permanent"
    assert "0701234567" not in (result.reason or "")
    assert "<number>" in (result.reason or "")


async def test_wrong_credentials_fail_for_good_without_the_password() -> None:
    with ElksApi() as api:
        result = await send_once(api, password=SecretStr("not-the-password"))
    assert api.refusals[-1][0] == 401
    assert result.outcome == "permanent"
    assert "not-the-password" not in (result.reason or "")


async def test_429_honours_retry_after() -> None:
    with ElksApi() as api:
        api.fail_next(429, "Too many requests", headers={"Retry-After": "12"})
        result = await send_once(api)
    assert (result.outcome, result.retry_after) == ("transient", 12.0)


async def test_connection_refused_and_timeouts_are_transient() -> None:
    refused = ElksSms(
        settings(f"http://127.0.0.1:{free_port()}"), sender=SENDER, delivery_report_url=None
    )
    assert (await refused.send(sms())).outcome == "transient"
    await refused.aclose()
    with ElksApi(delay=1.0) as api:
        result = await send_once(api, timeout_seconds=0.2)
    assert result.outcome == "transient"


@pytest.mark.parametrize(
    ("overrides", "sender", "report_url", "missing"),
    [
        ({"username": None}, SENDER, None, "KAIKU_46ELKS_USERNAME"),
        ({"password": None}, SENDER, None, "KAIKU_46ELKS_PASSWORD"),
        ({}, None, None, "KAIKU_SMS_FROM"),
        ({"callback_secret": None}, SENDER, "https://kaiku.test/x", "KAIKU_46ELKS_CALLBACK_SECRET"),
        ({"callback_secret": SecretStr("has space")}, SENDER, None, "KAIKU_46ELKS_CALLBACK_SECRET"),
        ({}, SENDER, "kaiku.test/no-scheme", "absolute"),
    ],
)
def test_missing_settings_fail_clearly(
    overrides: dict[str, object], sender: str | None, report_url: str | None, missing: str
) -> None:
    with pytest.raises(ValueError, match=missing) as failed:
        ElksSms(settings(**overrides), sender=sender, delivery_report_url=report_url)
    assert PASSWORD not in str(failed.value)
    assert "has space" not in str(failed.value)


def test_receipts_need_the_callback_secret() -> None:
    with pytest.raises(ValueError, match="KAIKU_46ELKS_CALLBACK_SECRET"):
        ElksReceipts(settings(callback_secret=None))


def test_callback_url_replaces_any_userinfo() -> None:
    assert (
        callback_url("https://old:creds@kaiku.test:8443/v1/provider-events/46elks", "abc")
        == "https://kaiku:abc@kaiku.test:8443/v1/provider-events/46elks"
    )


# -- callbacks -------------------------------------------------------------------------------------


async def sent_through(api: ElksApi, receiver: Receiver) -> str:
    provider = ElksSms(settings(api.url), sender=SENDER, delivery_report_url=receiver.url)
    try:
        result = await provider.send(sms())
    finally:
        await provider.aclose()
    assert result.outcome == "sent" and result.provider_message_id
    return result.provider_message_id


def with_userinfo(url: str, user: str = "kaiku", secret: str = SECRET) -> str:
    return url.replace("http://", f"http://{user}:{secret}@", 1)


async def test_delivery_reports_carry_the_secret_and_match_the_send() -> None:
    source = ElksReceipts(settings())
    delivered_at = datetime(2026, 3, 4, 10, 15, 30, 250000, tzinfo=UTC)
    with ElksApi() as api, Receiver(CALLBACK_PATH) as receiver:
        first = await sent_through(api, receiver)
        second = await sent_through(api, receiver)
        for sms_id, status in ((first, "sent"), (first, "delivered"), (second, "failed")):
            answer = await api.report(sms_id, status, delivered_at)
            assert answer.status_code == 204
    found: list[Receipt] = []
    for request in receiver.requests():
        source.verify(request)  # the Basic credentials 46elks builds from the URL
        found += source.receipts(request)
    assert found == [
        Receipt(f"{first}:delivered", "delivered", first, occurred_at=delivered_at),
        Receipt(f"{second}:failed", "failed", second, reason="46elks: failed"),
    ]
    assert "?" not in receiver.requests()[0].url  # the secret is not in the URL


@pytest.mark.parametrize(
    "credentials",
    [None, ("kaiku", "wrong-secret"), ("admin", SECRET), ("kaiku", "")],
)
async def test_a_report_without_the_secret_is_refused(credentials: tuple[str, str] | None) -> None:
    with Receiver(CALLBACK_PATH) as receiver:
        url = receiver.url if credentials is None else with_userinfo(receiver.url, *credentials)
        await post_as_46elks(url, {"id": "s" + "0" * 32, "status": "delivered"})
    (request,) = receiver.requests()
    with pytest.raises(WebhookError) as refused:
        ElksReceipts(settings()).verify(request)
    assert refused.value.status == 401


@pytest.mark.parametrize(
    ("message", "keywords", "opted_out"),
    [
        ("STOP", "STOP", True),
        ("stop ", "STOP", True),
        ("Stop!", "STOP", True),
        ("stop sending", "STOP", False),
        ("LOPETA", "STOP", False),
        ("lopeta", "STOP,LOPETA", True),
        ("Tack, bra service", "STOP", False),
    ],
)
async def test_an_incoming_stop_is_an_opt_out(message: str, keywords: str, opted_out: bool) -> None:
    source = ElksReceipts(settings(opt_out_keywords=keywords))
    with ElksApi() as api, Receiver(CALLBACK_PATH) as receiver:
        await api.incoming(with_userinfo(receiver.url), "+358401234567", message)
    (request,) = receiver.requests()
    source.verify(request)
    found = source.receipts(request)
    if not opted_out:
        assert found == []
        return
    (receipt,) = found
    assert (receipt.status, receipt.suppress, receipt.contact) == (
        "opted_out",
        "stop",
        "+358401234567",
    )
    assert receipt.event_id.startswith("s")
    assert receipt.occurred_at is not None and receipt.occurred_at.tzinfo is not None


def form_request(body: bytes) -> WebhookRequest:
    token = base64.b64encode(f"kaiku:{SECRET}".encode()).decode()
    return WebhookRequest(
        "POST",
        f"https://kaiku.test{CALLBACK_PATH}",
        Headers(headers={"authorization": f"Basic {token}"}),
        body,
        datetime.now(UTC),
    )


@pytest.mark.parametrize(
    "body", [b"status=delivered", b"id=s1", b"direction=incoming&id=s1&message=STOP", b"id=%FF"]
)
def test_malformed_callbacks_are_refused(body: bytes) -> None:
    source = ElksReceipts(settings())
    request = form_request(body)
    source.verify(request)
    with pytest.raises(WebhookError) as refused:
        source.receipts(request)
    assert refused.value.status == 400


def test_the_acknowledgement_sends_no_reply_sms() -> None:
    answer = ElksReceipts(settings()).acknowledge()
    assert answer is not None
    assert answer.status_code == 204
    assert answer.body == b""


# -- privacy ---------------------------------------------------------------------------------------


async def test_no_phone_number_or_secret_reaches_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    source = ElksReceipts(settings())
    with ElksApi() as api, Receiver(CALLBACK_PATH) as receiver:
        sms_id = await sent_through(api, receiver)
        api.fail_next(400, "Invalid to number: {to}")
        provider = ElksSms(settings(api.url), sender=SENDER, delivery_report_url=receiver.url)
        await provider.send(sms())
        await provider.aclose()
        await api.report(sms_id, "failed")
        await api.incoming(with_userinfo(receiver.url), "+358401234567", "STOP")
    for request in receiver.requests():
        source.verify(request)
        source.receipts(request)
    logged = caplog.text
    assert "opt-out" in logged  # the log did capture kaiku's lines
    for secret in (*PHONE_DIGITS, SECRET, PASSWORD):
        assert secret not in logged

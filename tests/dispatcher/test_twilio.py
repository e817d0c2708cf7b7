"""Twilio: sends against a local API that enforces Twilio's documented contract, the error table,
and the signed status callbacks and inbound STOPs Twilio posts back.

Contract: https://www.twilio.com/docs/messaging/api/message-resource; errors:
https://www.twilio.com/docs/api/errors; signatures:
https://www.twilio.com/docs/usage/webhooks/webhooks-security (the worked example with auth token
``12345``) and twilio-python's tests/unit/test_request_validator.py (port and repeated-name
vectors).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from urllib.parse import urlencode

import pytest
from pydantic import SecretStr
from starlette.datastructures import Headers

from services.common.webhooks import WebhookError, WebhookRequest
from services.dispatcher.channels import OutboundSms, Receipt, SendResult
from services.dispatcher.channels.twilio import (
    TwilioReceipts,
    TwilioSms,
    signature,
    url_variants,
)
from services.dispatcher.config import TwilioSettings
from tests.dispatcher.twilio_api import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    MESSAGING_SERVICE_SID,
    Receiver,
    TwilioApi,
    twilio_signature,
)
from tests.support import free_port

TO = "+358401234567"
SENDER = "+15005550006"
CALLBACK_PATH = "/v1/provider-events/twilio"
PHONE_DIGITS = ("358401234567", "15005550006", "46701234567", "4915112345678")


def settings(api_url: str, **overrides: object) -> TwilioSettings:
    values: dict[str, object] = {
        "account_sid": ACCOUNT_SID,
        "auth_token": SecretStr(AUTH_TOKEN),
        "base_url": api_url,
        "timeout_seconds": 5.0,
        **overrides,
    }
    return TwilioSettings(**values)  # type: ignore[arg-type]


def sms(
    to: str = TO, body: str = "How did we do? https://kaiku.test/s/abc", **kw: object
) -> OutboundSms:
    return OutboundSms(invitation_id="inv-1", to=to, body=body, **kw)  # type: ignore[arg-type]


async def send_once(
    api: TwilioApi,
    message: OutboundSms | None = None,
    *,
    sender: str | None = SENDER,
    status_callback: str | None = f"https://kaiku.test{CALLBACK_PATH}",
    **overrides: object,
) -> SendResult:
    provider = TwilioSms(
        settings(api.url, **overrides), sender=sender, status_callback=status_callback
    )
    try:
        return await provider.send(message or sms())
    finally:
        await provider.aclose()


# -- sending ---------------------------------------------------------------------------------------


async def test_a_send_arrives_with_the_documented_fields_and_answers_the_sid() -> None:
    with TwilioApi() as api:
        result = await send_once(api)
    assert result.outcome == "sent"
    assert [m["sid"] for m in api.messages] == [result.provider_message_id]
    arrived = {k: v for k, v in api.messages[0].items() if k != "sid"}
    assert arrived == {
        "To": TO,
        "From": SENDER,
        "Body": "How did we do? https://kaiku.test/s/abc",
        "StatusCallback": f"https://kaiku.test{CALLBACK_PATH}",
    }
    (call,) = api.api.calls
    assert call.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert call.headers["content-type"].startswith("application/x-www-form-urlencoded")


async def test_a_messaging_service_replaces_from() -> None:
    with TwilioApi() as api:
        result = await send_once(api, messaging_service_sid=MESSAGING_SERVICE_SID)
    assert result.outcome == "sent"
    assert api.messages[0]["MessagingServiceSid"] == MESSAGING_SERVICE_SID
    assert "From" not in api.messages[0]


async def test_the_message_sender_overrides_the_default_and_no_callback_is_not_sent() -> None:
    with TwilioApi() as api:
        result = await send_once(api, sms(sender="Kaiku"), status_callback=None)
    assert result.outcome == "sent"
    assert api.messages[0]["From"] == "Kaiku"
    assert "StatusCallback" not in api.messages[0]


@pytest.mark.parametrize(
    ("code", "outcome", "suppress"),
    [
        (21211, "permanent", "invalid_recipient"),
        (21614, "permanent", "invalid_recipient"),
        (21635, "permanent", "invalid_recipient"),
        (21265, "permanent", "invalid_recipient"),
        (21610, "permanent", "stop"),
        (21612, "permanent", None),
        (21408, "permanent", None),
        (21606, "permanent", None),
        (21608, "permanent", None),
        (21659, "permanent", None),
        (21266, "permanent", None),
        (20003, "permanent", None),
        (20429, "transient", None),
        (21611, "transient", None),
        (20500, "transient", None),
    ],
)
async def test_each_documented_error_is_classified(
    code: int, outcome: str, suppress: str | None
) -> None:
    with TwilioApi() as api:
        api.fail_next(code)
        result = await send_once(api)
    assert api.refusals[-1]["code"] == code  # the contract server answered that error
    assert (result.outcome, result.suppress) == (outcome, suppress)
    assert result.provider_message_id is None
    assert str(code) in (result.reason or "")
    assert not any(digits in (result.reason or "") for digits in PHONE_DIGITS)


async def test_an_invalid_number_is_refused_by_the_contract_and_suppressed() -> None:
    with TwilioApi() as api:
        result = await send_once(api, sms(to="0401234567"))
    assert api.refusals[-1]["code"] == 21211
    assert (result.outcome, result.suppress) == ("permanent", "invalid_recipient")
    assert "0401234567" not in (result.reason or "")


async def test_wrong_credentials_fail_for_good() -> None:
    with TwilioApi() as api:
        result = await send_once(api, auth_token=SecretStr("wrong" * 6))
    assert api.refusals[-1]["code"] == 20003
    assert (result.outcome, result.suppress) == ("permanent", None)
    assert "wrong" not in (result.reason or "")


async def test_429_honours_retry_after() -> None:
    with TwilioApi() as api:
        api.fail_next(20429, headers={"Retry-After": "7"})
        result = await send_once(api)
    assert result.outcome == "transient"
    assert result.retry_after == 7.0


async def test_an_unknown_code_falls_back_to_the_status_and_hides_the_number() -> None:
    with TwilioApi() as api:
        api.fail_next(21408, status=400)  # in the contract server, but not in kaiku's table
        permanent = await send_once(api)
        api.fail_next(status=502)
        transient = await send_once(api)
    assert (permanent.outcome, permanent.suppress) == ("permanent", None)
    assert "21408" in (permanent.reason or "")
    assert TO.lstrip("+") not in (permanent.reason or "")
    assert transient.outcome == "transient"


async def test_connection_refused_is_transient() -> None:
    provider = TwilioSms(
        settings(f"http://127.0.0.1:{free_port()}"), sender=SENDER, status_callback=None
    )
    result = await provider.send(sms())
    await provider.aclose()
    assert result.outcome == "transient"


async def test_a_timeout_is_transient() -> None:
    with TwilioApi(delay=1.0) as api:
        result = await send_once(api, timeout_seconds=0.2)
    assert result.outcome == "transient"
    assert "timed out" in (result.reason or "")


@pytest.mark.parametrize(
    ("overrides", "sender", "missing"),
    [
        ({"account_sid": None}, SENDER, "KAIKU_TWILIO_ACCOUNT_SID"),
        ({"auth_token": None}, SENDER, "KAIKU_TWILIO_AUTH_TOKEN"),
        ({}, None, "KAIKU_SMS_FROM"),
        ({}, None, "KAIKU_TWILIO_MESSAGING_SERVICE_SID"),
    ],
)
def test_missing_settings_fail_clearly(
    overrides: dict[str, object], sender: str | None, missing: str
) -> None:
    with pytest.raises(ValueError, match=missing):
        TwilioSms(settings("http://127.0.0.1:9", **overrides), sender=sender, status_callback=None)


def test_receipts_need_the_auth_token() -> None:
    with pytest.raises(ValueError, match="KAIKU_TWILIO_AUTH_TOKEN"):
        TwilioReceipts(settings("http://127.0.0.1:9", auth_token=None))


# -- signatures ------------------------------------------------------------------------------------

DOCS_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOCS_PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+14158675310"),
    ("Digits", "1234"),
    ("From", "+14158675310"),
    ("To", "+18005551212"),
]


def form_request(url: str, params: list[tuple[str, str]], sig: str | None) -> WebhookRequest:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    if sig is not None:
        headers["x-twilio-signature"] = sig
    return WebhookRequest(
        method="POST",
        url=url,
        headers=Headers(headers=headers),
        body=urlencode(params).encode(),
        received_at=datetime.now(UTC),
    )


def receipts_for(token: str = AUTH_TOKEN) -> TwilioReceipts:
    return TwilioReceipts(settings("http://127.0.0.1:9", auth_token=SecretStr(token)))


def test_the_documented_signature_example() -> None:
    assert signature("12345", DOCS_URL, DOCS_PARAMS) == "GvWf1cFY/Q7PnoempGyD5oXAezc="
    receipts_for("12345").verify(
        form_request(DOCS_URL, DOCS_PARAMS, "GvWf1cFY/Q7PnoempGyD5oXAezc=")
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # twilio-python's vectors: same parameters, From/Caller +14158675309
        ("https://mycompany.com/myapp.php?foo=1&bar=2", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        ("https://mycompany.com:1234/myapp.php?foo=1&bar=2", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        ("https://mycompany.com/myapp.php?foo=1&bar=2", "kvajT1Ptam85bY51eRf/AJRuM3w="),
        ("http://mycompany.com/myapp.php?foo=1&bar=2", "0ZXoZLH/DfblKGATFgpif+LLRf4="),
        ("http://mycompany.com:1234/myapp.php?foo=1&bar=2", "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="),
    ],
)
def test_the_sdk_vectors_with_and_without_ports(url: str, expected: str) -> None:
    params = [(k, v.replace("+14158675310", "+14158675309")) for k, v in DOCS_PARAMS]
    receipts_for("12345").verify(form_request(url, params, expected))


def test_repeated_parameters_are_signed_with_sorted_values() -> None:
    params = [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234")]
    assert signature("12345", DOCS_URL, params) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


def test_url_variants() -> None:
    assert url_variants("https://kaiku.test/x?a=1") == [
        "https://kaiku.test/x?a=1",
        "https://kaiku.test:443/x?a=1",
    ]
    assert url_variants("http://kaiku.test:8080/x") == [
        "http://kaiku.test:8080/x",
        "http://kaiku.test/x",
    ]


STATUS_URL = f"https://kaiku.example.com{CALLBACK_PATH}"
STATUS_PARAMS = [
    ("AccountSid", ACCOUNT_SID),
    ("ApiVersion", "2010-04-01"),
    ("ErrorCode", "30006"),
    ("From", SENDER),
    ("MessageSid", "SM" + "ab" * 16),
    ("MessageStatus", "undelivered"),
    ("SmsSid", "SM" + "ab" * 16),
    ("SmsStatus", "undelivered"),
    ("To", TO),
]


def test_a_signed_status_callback_verifies_and_is_read() -> None:
    sig = twilio_signature(AUTH_TOKEN, STATUS_URL, STATUS_PARAMS)
    request = form_request(STATUS_URL, STATUS_PARAMS, sig)
    source = receipts_for()
    source.verify(request)
    sid = "SM" + "ab" * 16
    assert source.receipts(request) == [
        Receipt(
            f"{sid}:undelivered",
            "failed",
            provider_message_id=sid,
            reason="twilio undelivered 30006: landline or unreachable carrier",
            suppress="invalid_recipient",
        )
    ]


@pytest.mark.parametrize(
    "forge",
    [
        "missing header",
        "another token",
        "changed status",
        "another url",
        "garbage",
    ],
)
def test_forged_or_changed_callbacks_are_refused(forge: str) -> None:
    sig: str | None = twilio_signature(AUTH_TOKEN, STATUS_URL, STATUS_PARAMS)
    url, params = STATUS_URL, list(STATUS_PARAMS)
    if forge == "missing header":
        sig = None
    elif forge == "another token":
        sig = twilio_signature("f" * 32, STATUS_URL, STATUS_PARAMS)
    elif forge == "changed status":
        params = [(k, "delivered" if k == "MessageStatus" else v) for k, v in params]
    elif forge == "another url":
        url = "https://evil.example.com" + CALLBACK_PATH
    else:
        sig = "bm90IGEgc2lnbmF0dXJl"
    with pytest.raises(WebhookError) as refused:
        receipts_for().verify(form_request(url, params, sig))
    assert refused.value.status == 401


# -- callbacks, end to end -------------------------------------------------------------------------


async def sent_through(api: TwilioApi, receiver: Receiver, **kw: object) -> str:
    provider = TwilioSms(settings(api.url, **kw), sender=SENDER, status_callback=receiver.url)
    try:
        result = await provider.send(sms())
    finally:
        await provider.aclose()
    assert result.outcome == "sent" and result.provider_message_id
    return result.provider_message_id


async def test_delivered_and_failed_callbacks_match_the_send() -> None:
    source = receipts_for()
    with TwilioApi() as api, Receiver(CALLBACK_PATH) as receiver:
        sid = await sent_through(api, receiver)
        for status in ("queued", "sent", "delivered"):
            assert (await api.status_callback(sid, status)).status_code == 204
        sid2 = await sent_through(api, receiver)
        await api.status_callback(sid2, "undelivered", error_code=30003)
        await api.status_callback(sid2, "failed", error_code=21610)
    found: list[Receipt] = []
    for request in receiver.requests():
        source.verify(request)
        found += source.receipts(request)
    assert [(r.event_id, r.status, r.provider_message_id, r.suppress) for r in found] == [
        (f"{sid}:delivered", "delivered", sid, None),
        (f"{sid2}:undelivered", "failed", sid2, None),
        (f"{sid2}:failed", "failed", sid2, "stop"),
    ]


async def test_a_retried_callback_has_the_same_event_id() -> None:
    source = receipts_for()
    with TwilioApi() as api, Receiver(CALLBACK_PATH) as receiver:
        sid = await sent_through(api, receiver)
        await api.status_callback(sid, "delivered")
        await api.status_callback(sid, "delivered")
    ids = [r.event_id for request in receiver.requests() for r in source.receipts(request)]
    assert ids == [f"{sid}:delivered", f"{sid}:delivered"]


async def test_a_callback_through_a_messaging_service() -> None:
    source = receipts_for()
    settings_ms = {"messaging_service_sid": MESSAGING_SERVICE_SID}
    with TwilioApi() as api, Receiver(CALLBACK_PATH) as receiver:
        sid = await sent_through(api, receiver, **settings_ms)
        await api.status_callback(sid, "failed", error_code=30005)
    (request,) = receiver.requests()
    source.verify(request)
    (receipt,) = source.receipts(request)
    assert (receipt.status, receipt.suppress) == ("failed", "invalid_recipient")


@pytest.mark.parametrize(
    ("body", "extra", "opted_out"),
    [
        ("STOP", {}, True),
        ("stop", {}, True),
        (" Unsubscribe\n", {}, True),
        ("Stop.", {}, True),
        ("quit", {}, True),
        ("OPTOUT", {}, True),
        ("REVOKE", {}, True),
        ("START", {}, False),
        ("please stop", {}, False),
        ("Great service, thanks!", {}, False),
        ("ARRET", {"OptOutType": "STOP"}, True),  # Advanced Opt-Out: a custom keyword
        ("STOP", {"OptOutType": "START"}, False),
        ("HELP", {"OptOutType": "HELP"}, False),
    ],
)
async def test_inbound_stop_is_an_opt_out(
    body: str, extra: dict[str, str], opted_out: bool
) -> None:
    source = receipts_for()
    with TwilioApi() as api, Receiver(CALLBACK_PATH) as receiver:
        await api.incoming(receiver.url, "+46701234567", body, **extra)
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
        "+46701234567",
    )
    assert receipt.event_id.startswith("SM")
    assert "+46701234567" not in repr(receipt)


def test_a_body_without_a_message_sid_is_malformed() -> None:
    params = [("AccountSid", ACCOUNT_SID), ("MessageStatus", "delivered")]
    request = form_request(STATUS_URL, params, twilio_signature(AUTH_TOKEN, STATUS_URL, params))
    source = receipts_for()
    source.verify(request)
    with pytest.raises(WebhookError) as refused:
        source.receipts(request)
    assert refused.value.status == 400


def test_a_body_that_is_not_utf8_is_malformed() -> None:
    request = WebhookRequest(
        "POST",
        STATUS_URL,
        Headers(headers={"x-twilio-signature": "x"}),
        b"Body=%FF%FE",
        datetime.now(UTC),
    )
    with pytest.raises(WebhookError) as refused:
        receipts_for().receipts(request)
    assert refused.value.status == 400


def test_the_acknowledgement_is_empty_twiml() -> None:
    answer = receipts_for().acknowledge()
    assert answer is not None
    assert answer.media_type == "text/xml"
    assert answer.body.decode().endswith("<Response></Response>")


# -- privacy ---------------------------------------------------------------------------------------


async def test_no_phone_number_or_secret_reaches_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    source = receipts_for()
    with TwilioApi() as api, Receiver(CALLBACK_PATH) as receiver:
        sid = await sent_through(api, receiver)
        api.fail_next(21211)
        provider = TwilioSms(settings(api.url), sender=SENDER, status_callback=receiver.url)
        await provider.send(sms())
        await provider.aclose()
        await api.status_callback(sid, "undelivered", error_code=30005)
        await api.incoming(receiver.url, "+4915112345678", "STOP")
    for request in receiver.requests():
        source.verify(request)
        source.receipts(request)
    logged = caplog.text
    assert "opt-out" in logged  # the log did capture kaiku's lines
    for secret in (*PHONE_DIGITS, AUTH_TOKEN):
        assert secret not in logged

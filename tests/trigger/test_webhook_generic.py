"""The generic source: Standard Webhooks signatures, freshness, and refusals."""

from __future__ import annotations

import base64
import json
import re
import time

import pytest

from services.trigger.ingress import WebhookRequest
from services.trigger.ingress.generic import Generic, GenericSettings, sign
from services.trigger.ingress.mapping import to_event
from tests.trigger.webhook_support import app_with, error, post

SECRET = "whsec_" + base64.b64encode(b"kaiku-generic-test-secret-32byte").decode()
PATH = "/v1/webhooks/generic"
BODY = json.dumps(
    {
        "id": "crm-7781",
        "type": "order.delivered",
        "time": "2026-11-20T14:03:00Z",
        "customer": {"id": "cust-1", "email": "aino@example.fi", "locale": "fi"},
        "touchpoint": "delivery",
        "team": "logistics",
    }
).encode()


def vendor() -> Generic:
    return Generic(GenericSettings(webhook_secret=SECRET, tolerance_seconds=300))


def headers(
    body: bytes = BODY, ts: int | None = None, msg_id: str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(SECRET, msg_id, ts, body),
    }


def test_the_standard_webhooks_reference_vector() -> None:
    # From the Standard Webhooks spec's reference implementations (test suite vector).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


async def test_a_signed_request_is_accepted_until_it_tries_to_publish() -> None:
    # No broker in this app: getting as far as publishing shows up as 503.
    r = await post(app_with({"generic": vendor()}), PATH, BODY, headers())
    assert r.status_code == 503
    assert r.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    "change",
    [
        lambda h, b: (h | {"webhook-signature": "v1," + "A" * 44}, b),  # forged
        lambda h, b: (h, b.replace(b"cust-1", b"cust-2")),  # one byte changed
        lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b),  # unsigned
        lambda h, b: (h | {"webhook-timestamp": str(int(h["webhook-timestamp"]) - 301)}, b),
    ],
)
async def test_forged_changed_unsigned_or_stale_requests_are_401(change) -> None:  # type: ignore[no-untyped-def]
    h, b = change(headers(), BODY)
    r = await post(app_with({"generic": vendor()}), PATH, b, h)
    assert r.status_code == 401
    assert error(r)["code"] == "bad_signature"


async def test_the_tolerance_window_is_a_setting() -> None:
    old = int(time.time()) - 1000
    r = await post(app_with({"generic": vendor()}), PATH, BODY, headers(ts=old))
    assert r.status_code == 401
    assert re.search(r"\b10\d\ds old; the tolerance is 300s", error(r)["message"])
    lenient = Generic(GenericSettings(webhook_secret=SECRET, tolerance_seconds=1200))
    r = await post(app_with({"generic": lenient}), PATH, BODY, headers(ts=old))
    assert r.status_code == 503  # past the signature check: it tried to publish


async def test_malformed_oversize_wrong_type_and_unknown_source() -> None:
    app = app_with({"generic": vendor()}, max_body=2048)
    bad = b'{"id": "x", '
    r = await post(app, PATH, bad, headers(bad))
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    big = json.dumps({"id": "x", "pad": "y" * 4000}).encode()
    r = await post(app, PATH, big, headers(big))
    assert (r.status_code, error(r)["code"]) == (413, "too_large")
    r = await post(app, PATH, BODY, headers() | {"content-type": "text/plain"})
    assert (r.status_code, error(r)["code"]) == (415, "unsupported_media_type")
    r = await post(app, "/v1/webhooks/zendesk", BODY, headers())
    assert (r.status_code, error(r)["code"]) == (404, "unknown_source")


def test_default_mapping_of_a_generic_item() -> None:
    v = vendor()
    req = WebhookRequest("POST", "http://x" + PATH, headers(), BODY, None)  # type: ignore[arg-type]
    [item] = v.items(req)
    event = to_event(v, item, None)
    assert not isinstance(event, Exception)
    assert event.id == "generic-crm-7781"  # type: ignore[union-attr]
    assert event.source == "generic://default"  # type: ignore[union-attr]
    assert event.type == "order.delivered"  # type: ignore[union-attr]
    assert event.data.customer.email == "aino@example.fi"  # type: ignore[union-attr]
    assert event.data.team == "logistics"  # type: ignore[union-attr]

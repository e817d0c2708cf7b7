"""Security: what an attacker sends is refused with the documented status, and nothing is stored.

Forged and replayed webhooks (every source of the trigger, every provider of the dispatcher);
tampered, unknown, expired and cancelled link tokens, and another invitation's token; markup in
answers shown on the dashboard and in the exports; SQL metacharacters in every filter; oversized
bodies on every route that takes one; clients that trickle their body.

One stack for the whole module, to stay within a minute: the three services — the trigger with all
seven webhook sources, the dispatcher with the receipts of all four providers and the ``file``
channel, the collector — on the real broker and PostgreSQL, with the shipped program. "Nothing
stored" is a snapshot taken on a quiet stack before the requests and again after them: the row
count of every table of the three services, the end offset of every topic and the files in the
outbox. (Counts cannot see an update; where a refused request could change a row, the row itself is
compared.)
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
import pytest_asyncio
import uvicorn
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from services.collector.app import create_app as collector_app
from services.collector.config import CollectorSettings
from services.collector.models import Invitation as CollectorInvitation
from services.collector.models import OptOut as CollectorOptOut
from services.collector.models import Response as CollectorResponse
from services.common import events
from services.common.config import DatabaseSettings, HttpSettings, KafkaSettings, LinkSettings
from services.common.events import InvitationCancelled, InvitationRequested, SurveyContext
from services.common.kafka import Outgoing
from services.common.program import load_program
from services.common.settings import CommonSettings
from services.common.tokens import LinkKeys
from services.dispatcher import providers
from services.dispatcher.app import create_app as dispatcher_app
from services.dispatcher.channels import ReceiptSource
from services.dispatcher.channels.elks import ElksReceipts
from services.dispatcher.channels.mailgun import MailgunReceipts
from services.dispatcher.channels.sendgrid import SendGridReceipts
from services.dispatcher.channels.twilio import TwilioReceipts
from services.dispatcher.config import (
    DispatcherSettings,
    ElksSettings,
    MailgunSettings,
    SendGridSettings,
    TwilioSettings,
)
from services.dispatcher.models import Send
from services.embedded import EmbeddedApp, free_port
from services.trigger.app import create_app as trigger_app
from services.trigger.config import TriggerSettings
from services.trigger.ingress import Vendor
from services.trigger.ingress.generic import sign as standard_sign
from services.trigger.models import Decision
from tests.conftest import PG_URL, ROOT
from tests.dispatcher import mailgun_api
from tests.dispatcher.sendgrid_api import public_key_b64, signed_headers
from tests.dispatcher.test_elks import SECRET as ELKS_SECRET
from tests.dispatcher.twilio_api import ACCOUNT_SID, AUTH_TOKEN, twilio_signature
from tests.support import email_invitation, eventually, running
from tests.trigger import test_webhook_freshdesk as freshdesk
from tests.trigger import test_webhook_generic as generic
from tests.trigger import test_webhook_hubspot as hubspot
from tests.trigger import test_webhook_intercom as intercom
from tests.trigger import test_webhook_salesforce as salesforce
from tests.trigger import test_webhook_servicenow as servicenow
from tests.trigger import test_webhook_zendesk as zendesk

pytestmark = pytest.mark.asyncio(loop_scope="module")

BASE_URL = "http://kaiku.test"  # HubSpot and Twilio sign the URL they call
API_TOKEN = "security-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
LINK_KEYS = "s:security-test-link-key-0123456789"
MAX_BODY = HttpSettings().max_body_bytes  # KAIKU_MAX_BODY_BYTES, the default
BODY_TIMEOUT = 1.0  # KAIKU_BODY_TIMEOUT_SECONDS of the stack: short, for the slow clients
PARTITIONS = 3
SETTLE = 0.3  # time for a wrongly accepted request to reach a table or a topic
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
OTHER_SECRET = "not-the-configured-secret-0123456789"
SENDGRID_KEY = ec.generate_private_key(ec.SECP256R1())
SECRET_HEADER = "X-Kaiku-Webhook-Secret"
XSS_SCRIPT = "<script>alert(1)</script>"
XSS_ATTRIBUTE = '"><img src=x onerror=alert(1)>'
FORMULA = "=cmd|' /C calc'!A0"

Req = tuple[str, dict[str, str], bytes]  # (path with query, headers, body)


# --- the stack ------------------------------------------------------------------------------------


def trigger_vendors() -> dict[str, Vendor]:
    """Every webhook source, configured as its unit tests configure it."""
    return {
        "zendesk": zendesk.vendor(),
        "hubspot": hubspot.vendor(),
        "freshdesk": freshdesk.vendor(),
        "intercom": intercom.vendor(),
        "salesforce": salesforce.vendor(),
        "servicenow": servicenow.vendor(),
        "generic": generic.vendor(),
    }


def receipt_sources(_settings: DispatcherSettings) -> dict[str, tuple[ReceiptSource, str]]:
    """Every provider's receipts at once (the settings choose one email and one SMS provider)."""
    return {
        "sendgrid": (
            SendGridReceipts(SendGridSettings(event_public_key=public_key_b64(SENDGRID_KEY))),
            "email",
        ),
        "mailgun": (
            MailgunReceipts(
                MailgunSettings(webhook_signing_key=SecretStr(mailgun_api.SIGNING_KEY))
            ),
            "email",
        ),
        "twilio": (
            TwilioReceipts(
                TwilioSettings(account_sid=ACCOUNT_SID, auth_token=SecretStr(AUTH_TOKEN))
            ),
            "sms",
        ),
        "46elks": (ElksReceipts(ElksSettings(callback_secret=SecretStr(ELKS_SECRET))), "sms"),
    }


@dataclass
class Stack:
    app: EmbeddedApp
    http: httpx.AsyncClient
    kafka: KafkaSettings
    outbox: Path
    offsets: AIOKafkaConsumer
    keys: LinkKeys

    def sessions(self, service: str) -> Any:
        return self.app.apps[service].state.runtime.sessions

    def partitions(self, name: str) -> list[TopicPartition]:
        return [TopicPartition(self.kafka.topic(name), p) for p in range(PARTITIONS)]

    async def snapshot(self) -> dict[str, int]:
        """Rows per table of every service, records per topic, files in the outbox."""
        counts: dict[str, int] = {}
        for app in self.app.apps.values():
            runtime = app.state.runtime
            async with runtime.sessions() as session:
                for table in runtime.metadata.sorted_tables:
                    query = select(func.count()).select_from(table)
                    counts[table.name] = (await session.execute(query)).scalar_one()
                    if "published_at" in table.c:  # an outbox: rows waiting for its relay
                        waiting = query.where(table.c.published_at.is_(None))
                        counts[f"{table.name} unpublished"] = (
                            await session.execute(waiting)
                        ).scalar_one()
        for name in events.ALL_TOPICS:
            ends = await self.offsets.end_offsets(self.partitions(name))
            counts[f"topic {name}"] = sum(ends.values())
        counts["outbox files"] = len(list(self.outbox.iterdir())) if self.outbox.exists() else 0
        return counts

    async def quiet(self, timeout: float = 30.0) -> dict[str, int]:
        """The snapshot once nothing has changed for a while and the outboxes are drained
        (earlier work has settled)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last, stable = await self.snapshot(), 0
        while stable < 3:
            await asyncio.sleep(0.25)
            current = await self.snapshot()
            # Settled: nothing changed, and no outbox holds a row its relay has yet to publish.
            drained = not any(v for k, v in current.items() if k.endswith(" unpublished"))
            stable = stable + 1 if current == last and drained else 0
            if loop.time() > deadline:
                changed = {
                    k: (last.get(k), v)
                    for k, v in current.items()
                    if last.get(k) != v or (k.endswith(" unpublished") and v)
                }
                raise AssertionError(f"the stack did not settle in {timeout:.0f}s: {changed}")
            last = current
        return last

    @asynccontextmanager
    async def nothing_stored(self, what: str) -> AsyncIterator[None]:
        before = await self.quiet()
        since_ms = int(time.time() * 1000)
        yield
        await asyncio.sleep(SETTLE)
        after = await self.snapshot()
        changed = {k: f"{before.get(k)} -> {v}" for k, v in after.items() if before.get(k) != v}
        for key in [k for k in changed if k.startswith("topic ")]:
            # Say what arrived, to tell which request (or which earlier work) it came from.
            new = await self.records_since(key.removeprefix("topic "), since_ms)
            changed[key] += f": {[json.loads(r.value) for r in new]}"
        assert not changed, f"{what}: something was stored: {changed}"

    async def records(self, name: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every message on a topic so far, decoded."""
        return [json.loads(r.value) for r in await self._read(name, timeout)]

    async def records_since(self, name: str, since_ms: int) -> list[ConsumerRecord[Any, Any]]:
        """The records on a topic produced since ``since_ms`` (Unix milliseconds)."""
        return [r for r in await self._read(name) if r.timestamp >= since_ms]

    async def _read(self, name: str, timeout: float = 10.0) -> list[ConsumerRecord[Any, Any]]:
        """Every record on a topic so far."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap_servers, group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            parts = self.partitions(name)
            consumer.assign(parts)
            end = await consumer.end_offsets(parts)
            await consumer.seek_to_beginning(*parts)
            found: list[ConsumerRecord[Any, Any]] = []
            deadline = asyncio.get_running_loop().time() + timeout
            while [tp for tp in parts if await consumer.position(tp) < end[tp]]:
                assert asyncio.get_running_loop().time() < deadline, f"could not read {name}"
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    found.extend(batch)
            return found
        finally:
            await consumer.stop()

    async def invite(
        self,
        *,
        expired: bool = False,
        cancelled: bool = False,
        context: SurveyContext | None = None,
    ) -> InvitationRequested:
        """An NPS invitation as the trigger publishes it, once the collector has stored it. Its
        send is a week away (expired: its link expired yesterday), so no email goes out."""
        customer = f"sec-{uuid.uuid4().hex[:10]}"
        now = datetime.now(UTC)
        message = email_invitation(
            customer,
            send_at=now - timedelta(days=15) if expired else now + timedelta(days=7),
            expires_in=timedelta(days=14),
        ).model_copy(update={"token": self.keys.issue(), "context": context or SurveyContext()})
        out: list[Outgoing] = [Outgoing(events.INVITATIONS, customer, message)]
        if cancelled:  # a reopened ticket
            cancel = InvitationCancelled(
                invitation_id=message.invitation_id,
                customer_id=customer,
                survey_id=message.survey_id,
                reason="cancel_on:ticket.reopened",
                cancelled_at=now,
            )
            out.append(Outgoing(events.INVITATIONS, customer, cancel))
        await self.app.apps["trigger"].state.runtime.producer.publish(out)

        async def stored() -> bool:
            async with self.sessions("collector")() as session:
                row = (
                    await session.execute(
                        select(CollectorInvitation).where(
                            CollectorInvitation.invitation_id == message.invitation_id
                        )
                    )
                ).scalar_one_or_none()
            return row is not None and (row.cancelled_at is not None or not cancelled)

        await eventually(stored, what="the invitation in the collector's database")
        return message

    async def response_of(self, invitation: InvitationRequested) -> CollectorResponse | None:
        async with self.sessions("collector")() as session:
            query = select(CollectorResponse).where(
                CollectorResponse.invitation_id == invitation.invitation_id
            )
            found: CollectorResponse | None = (await session.execute(query)).scalar_one_or_none()
        return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(broker: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    kafka = KafkaSettings(
        bootstrap_servers=broker,
        topic_prefix=f"test-{uuid.uuid4().hex[:12]}.",
        enable_idempotence=False,
        partitions=PARTITIONS,
        poll_timeout_ms=50,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_async_engine(PG_URL)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        await engine.dispose()
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL} (KAIKU_TEST_DATABASE_URL): {exc}")
    outbox = tmp_path_factory.mktemp("security") / "outbox"
    settings = CommonSettings(
        kafka=kafka,
        database=DatabaseSettings(url=PG_URL, schema_name=schema),
        http=HttpSettings(api_token=SecretStr(API_TOKEN), body_timeout_seconds=BODY_TIMEOUT),
        links=LinkSettings(public_url=BASE_URL, link_keys=SecretStr(LINK_KEYS)),
    )
    program = load_program(ROOT / "deploy/local/program.yaml")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(providers, "receipt_sources", receipt_sources)
        dispatcher = dispatcher_app(
            settings,
            DispatcherSettings(email_provider="file", outbox_dir=outbox, poll_seconds=0.1),
            program=program,
        )
    app = EmbeddedApp(
        trigger_app(
            settings,
            TriggerSettings(webhook_public_url=None),
            program=program,
            vendors=trigger_vendors(),
            resolvers={},
        ),
        dispatcher,
        collector_app(settings, CollectorSettings(bot_min_seconds=0), program=program),
    )
    offsets = AIOKafkaConsumer(bootstrap_servers=broker, group_id=None, enable_auto_commit=False)
    # A server error is an answer (500) to check, as a client would see it.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with (
            running(*app.apps.values()),
            httpx.AsyncClient(transport=transport, base_url=BASE_URL) as http,
        ):
            await offsets.start()
            try:
                yield Stack(app, http, kafka, outbox, offsets, LinkKeys.parse(LINK_KEYS))
            finally:
                await offsets.stop()
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await engine.dispose()


def refused(response: httpx.Response, status: int, code: str | None = None) -> str | None:
    """None when ``response`` is the expected refusal, else what it was instead."""
    if response.status_code != status:
        return f"{response.status_code} {response.text[:200]}"
    if code is not None:
        if not response.headers.get("content-type", "").startswith(JSON):
            return f"{status} but not a JSON error: {response.text[:200]}"
        if response.json().get("error", {}).get("code") != code:
            return f"{status} but {response.text[:200]}"
    return None


async def send(http: httpx.AsyncClient, request: Req, method: str = "POST") -> httpx.Response:
    path, headers, body = request
    return await http.request(method, path, content=body, headers=headers)


# --- webhooks: forged, stale, replayed ------------------------------------------------------------


def without(request: Req, header: str) -> Req:
    path, headers, body = request
    return path, {k: v for k, v in headers.items() if k.lower() != header.lower()}, body


def with_headers(request: Req, **extra: str) -> Req:
    path, headers, body = request
    return path, headers | {k.replace("_", "-"): v for k, v in extra.items()}, body


def changed_body(request: Req, old: bytes, new: bytes) -> Req:
    """The request with its body changed after it was signed."""
    path, headers, body = request
    assert old in body, f"{old!r} is not in the body"
    return path, headers, body.replace(old, new, 1)


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def ago(**delta: float) -> datetime:
    return datetime.now(UTC) - timedelta(**delta)


def generic_request(
    body: bytes = generic.BODY,
    secret: str = generic.SECRET,
    ts: int | None = None,
    msg_id: str = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
) -> Req:
    ts = int(time.time()) if ts is None else ts
    headers = {
        "content-type": JSON,
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": standard_sign(secret, msg_id, ts, body),
    }
    return generic.PATH, headers, body


OTHER_WHSEC = "whsec_" + base64.b64encode(b"another-secret-of-32-bytes-12345").decode()


def webhook_forgeries() -> dict[str, dict[str, Req]]:
    """Per trigger source (docs/webhooks/<vendor>.md): requests that must be refused with 401.
    Freshdesk, ServiceNow and Salesforce authenticate the sender with a shared secret that does
    not cover the body (as documented), so a changed body is no forgery there."""
    return {
        "zendesk": {
            "wrong secret": zendesk.example_request(secret=OTHER_SECRET),
            "no signature": without(zendesk.example_request(), "x-zendesk-webhook-signature"),
            "body changed": changed_body(zendesk.example_request(), b'"5158"', b'"5159"'),
            "stale: 1 h old, 5 min allowed": zendesk.example_request(now=ago(hours=1)),
        },
        "hubspot": {
            "wrong secret": hubspot.example_request(secret=OTHER_SECRET, base_url=BASE_URL),
            "no signature": without(
                hubspot.example_request(base_url=BASE_URL), "X-HubSpot-Signature-v3"
            ),
            "body changed": changed_body(
                hubspot.example_request(base_url=BASE_URL), b'"4"', b'"5"'
            ),
            "signed for another URL": hubspot.example_request(base_url="https://evil.example"),
            "stale: 10 min old, 5 min allowed": hubspot.example_request(
                base_url=BASE_URL, timestamp_ms=hubspot.now_ms() - 600_000
            ),
        },
        "intercom": {
            "wrong secret": intercom.example_request(secret=OTHER_SECRET),
            "no signature": without(intercom.example_request(), "x-hub-signature"),
            "body changed": changed_body(intercom.example_request(), b'"1295"', b'"1296"'),
            "stale: created 3 h ago, 2 h allowed": intercom.example_request(now=ago(hours=3)),
        },
        "freshdesk": {
            "wrong secret": freshdesk.example_request(
                freshdesk.settings(webhook_secret=OTHER_SECRET)
            ),
            "no credentials": without(freshdesk.example_request(), SECRET_HEADER),
            "wrong Basic password": with_headers(
                without(freshdesk.example_request(), SECRET_HEADER),
                authorization=basic("kaiku", OTHER_SECRET),
            ),
        },
        "servicenow": {
            "wrong secret": servicenow.example_request(
                servicenow.settings(webhook_secret=OTHER_SECRET)
            ),
            "no credentials": without(servicenow.example_request(), SECRET_HEADER),
            "wrong Basic user": with_headers(
                without(servicenow.example_request(), SECRET_HEADER),
                authorization=basic("admin", servicenow.SECRET),
            ),
        },
        "salesforce": {
            "wrong token": salesforce.example_request(
                salesforce.settings(webhook_secret=OTHER_SECRET)
            ),
            "no token": (salesforce.PATH, dict(salesforce.HEADERS), salesforce.BODY),
            "another organization": salesforce.example_request(
                salesforce.settings(organization_id="00D5e000000ZZZZEAG")
            ),
        },
        "generic": {
            "wrong secret": generic_request(secret=OTHER_WHSEC),
            "no signature": without(generic_request(), "webhook-signature"),
            "body changed": changed_body(generic_request(), b"cust-1", b"cust-2"),
            "stale: 10 min old, 5 min allowed": generic_request(ts=int(time.time()) - 600),
        },
    }


def genuine_webhooks() -> dict[str, Req]:
    return {
        "zendesk": zendesk.example_request(),
        "hubspot": hubspot.example_request(base_url=BASE_URL),
        "freshdesk": freshdesk.example_request(),
        "intercom": intercom.example_request(),
        "salesforce": salesforce.example_request(),
        "servicenow": servicenow.example_request(),
        "generic": generic_request(),
    }


SENDGRID_PATH = "/v1/provider-events/sendgrid"
MAILGUN_PATH = "/v1/provider-events/mailgun"
TWILIO_PATH = "/v1/provider-events/twilio"
ELKS_PATH = "/v1/provider-events/46elks"
VICTIM_EMAIL = "victim@example.com"
VICTIM_PHONE = "+358401234567"


def sendgrid_request(
    event: str = "bounce", key: ec.EllipticCurvePrivateKey = SENDGRID_KEY, at: int | None = None
) -> Req:
    body = json.dumps(
        [
            {
                "email": VICTIM_EMAIL,
                "timestamp": int(time.time()),
                "event": event,
                "type": "bounce",
                "reason": "550 5.1.1 no such user",
                "sg_event_id": uuid.uuid4().hex,
                "sg_message_id": f"{uuid.uuid4().hex}.filter0001",
            }
        ]
    ).encode()
    return SENDGRID_PATH, signed_headers(key, body, at), body


def mailgun_event(event: str = "failed") -> dict[str, Any]:
    return {
        "event": event,
        "severity": "permanent",
        "reason": "bounce",
        "id": uuid.uuid4().hex,
        "timestamp": time.time(),
        "recipient": VICTIM_EMAIL,
        "message": {"headers": {"message-id": f"{uuid.uuid4().hex}@kaiku.example"}},
        "delivery-status": {"code": 550, "message": "5.1.1 No such user"},
    }


def mailgun_request(body: bytes) -> Req:
    return MAILGUN_PATH, {"content-type": JSON}, body


def mailgun_changed_signature() -> Req:
    payload = json.loads(mailgun_api.webhook(mailgun_event()))
    digest = payload["signature"]["signature"]
    payload["signature"]["signature"] = ("0" if digest[0] != "0" else "1") + digest[1:]
    return mailgun_request(json.dumps(payload).encode())


def twilio_stop(sid: str | None = None) -> list[tuple[str, str]]:
    """An inbound STOP from the victim's phone: it would suppress the number."""
    return [
        ("AccountSid", ACCOUNT_SID),
        ("MessageSid", sid or "SM" + uuid.uuid4().hex),
        ("From", VICTIM_PHONE),
        ("To", "+15005550006"),
        ("Body", "STOP"),
    ]


def twilio_request(
    params: list[tuple[str, str]],
    token: str = AUTH_TOKEN,
    url: str = BASE_URL + TWILIO_PATH,
    sent: list[tuple[str, str]] | None = None,
) -> Req:
    """``params`` signed (as ``url`` with ``token``); ``sent`` instead of them in the body."""
    headers = {"content-type": FORM, "x-twilio-signature": twilio_signature(token, url, params)}
    return TWILIO_PATH, headers, urlencode(sent if sent is not None else params).encode()


def elks_request(auth: dict[str, str], status: str | None = None) -> Req:
    sms_id = "s" + uuid.uuid4().hex
    if status is None:  # an inbound STOP from the victim's phone
        params = {"direction": "incoming", "id": sms_id, "from": VICTIM_PHONE, "message": "STOP"}
    else:
        params = {"id": sms_id, "status": status, "delivered": "2026-11-20T14:03:00.000000"}
    return ELKS_PATH, {"content-type": FORM, **auth}, urlencode(params).encode()


def receipt_forgeries() -> dict[str, dict[str, Req]]:
    """Per provider of the dispatcher: refused with 401 (a bounce, a STOP: each would suppress
    the victim's address or number if it were taken). 46elks signs nothing: its secret is the
    Basic password of the callback URL (docs/sending.md), so a changed body is no forgery."""
    stop = twilio_stop()
    now = int(time.time())
    return {
        "sendgrid": {
            "signed with another key": sendgrid_request(
                key=ec.generate_private_key(ec.SECP256R1())
            ),
            "no signature": without(sendgrid_request(), "X-Twilio-Email-Event-Webhook-Signature"),
            "body changed": changed_body(sendgrid_request(), b'"bounce"', b'"spamreport"'),
            "stale: 1 h old, 10 min allowed": sendgrid_request(at=now - 3600),
        },
        "mailgun": {
            "wrong signing key": mailgun_request(
                mailgun_api.webhook(mailgun_event(), key=OTHER_SECRET)
            ),
            "no signature": mailgun_request(json.dumps({"event-data": mailgun_event()}).encode()),
            "signature changed": mailgun_changed_signature(),
            "stale: 1 h old, 10 min allowed": mailgun_request(
                mailgun_api.webhook(mailgun_event(), timestamp=now - 3600)
            ),
        },
        "twilio": {
            "wrong auth token": twilio_request(stop, token="f" * 32),
            "no signature": without(twilio_request(stop), "x-twilio-signature"),
            "body changed": twilio_request(
                twilio_stop(),
                sent=[(k, VICTIM_PHONE[:-1] + "8" if k == "From" else v) for k, v in stop],
            ),
            "signed for another URL": twilio_request(
                stop, url="https://evil.example" + TWILIO_PATH
            ),
        },
        "46elks": {
            "wrong secret": elks_request({"authorization": basic("kaiku", OTHER_SECRET)}),
            "no credentials": elks_request({}),
            "wrong user": elks_request({"authorization": basic("admin", ELKS_SECRET)}),
            "wrong secret header": elks_request({SECRET_HEADER: OTHER_SECRET}),
        },
    }


def genuine_receipts() -> dict[str, Req]:
    """Delivery reports about messages kaiku does not know: stored, nothing suppressed."""
    delivered = [
        ("AccountSid", ACCOUNT_SID),
        ("MessageSid", "SM" + uuid.uuid4().hex),
        ("MessageStatus", "delivered"),
        ("To", VICTIM_PHONE),
    ]
    return {
        "sendgrid": sendgrid_request(event="delivered"),
        "mailgun": mailgun_request(mailgun_api.webhook(mailgun_event("delivered"))),
        "twilio": twilio_request(delivered),
        "46elks": elks_request({"authorization": basic("kaiku", ELKS_SECRET)}, "delivered"),
    }


async def test_forged_webhooks_are_401_and_publish_or_store_nothing(stack: Stack) -> None:
    forgeries = {**webhook_forgeries(), **receipt_forgeries()}
    assert set(forgeries) == {*trigger_vendors(), "sendgrid", "mailgun", "twilio", "46elks"}
    wrong: dict[str, str] = {}
    async with stack.nothing_stored("forged webhooks"):
        for vendor, cases in forgeries.items():
            for case, request in cases.items():
                problem = refused(await send(stack.http, request), 401, "bad_signature")
                if problem:
                    wrong[f"{vendor}: {case}"] = problem
        for path in ("/v1/webhooks/nobody", "/v1/provider-events/nobody"):
            r = await stack.http.post(path, content=b"{}", headers={"content-type": JSON})
            if problem := refused(r, 404):
                wrong[path] = problem
    assert not wrong, wrong

    # The same requests, signed as the vendors sign them, are taken: the refusals above are the
    # forgeries', not the stack's. A vendor's retry of one is answered alike.
    before = await stack.snapshot()
    for vendor, request in genuine_webhooks().items():
        first, again = await send(stack.http, request), await send(stack.http, request)
        assert first.status_code in (200, 202), f"{vendor}: {first.status_code} {first.text}"
        assert (again.status_code, again.text) == (first.status_code, first.text), vendor
    for provider, request in genuine_receipts().items():
        first, again = await send(stack.http, request), await send(stack.http, request)
        assert first.status_code in (200, 204), f"{provider}: {first.status_code} {first.text}"
        assert again.status_code == first.status_code, provider
    after = await stack.snapshot()
    # Each genuine webhook and its retry are on kaiku.events (the trigger dedupes by event id:
    # see the replay test); each receipt is stored once.
    assert after["topic events"] - before["topic events"] == 2 * len(genuine_webhooks())
    assert after["dispatcher_receipts"] - before["dispatcher_receipts"] == len(genuine_receipts())
    await stack.quiet()


async def test_a_replayed_webhook_is_one_event_and_a_stale_one_is_refused(stack: Stack) -> None:
    # A Standard Webhooks delivery (the generic source) with an email: it becomes an invitation.
    customer = f"replay-{uuid.uuid4().hex[:10]}"
    body = json.dumps(
        {
            "id": f"order-{uuid.uuid4().hex[:10]}",
            "type": "order.delivered",
            "time": datetime.now(UTC).isoformat(),
            "customer": {"id": customer, "email": f"{customer}@example.com", "locale": "en"},
        }
    ).encode()
    request = generic_request(body, msg_id=f"msg_{uuid.uuid4().hex}")
    worker = next(
        loop for loop in stack.app.apps["trigger"].state.runtime.loops if loop.name == "trigger"
    )
    handled = worker.processed
    first = await send(stack.http, request)
    assert first.status_code == 202, first.text
    (event_id,) = first.json()["accepted"]
    # Replayed within the tolerance (the same webhook-id and body): taken again, the same event.
    replay = await send(stack.http, request)
    assert (replay.status_code, replay.json()["accepted"]) == (202, [event_id])
    await eventually(lambda: worker.processed >= handled + 2, what="the trigger to consume both")

    # Replayed after the tolerance (captured, re-sent later with its old timestamp): refused.
    _, headers, _ = generic_request(body, msg_id="msg_old", ts=int(time.time()) - 600)
    async with stack.nothing_stored("a stale replay"):
        r = await send(stack.http, (generic.PATH, headers, body))
        assert refused(r, 401, "bad_signature") is None, r.text

    # One decision, one invitation (a redelivered event publishes the same one again: its id is
    # the same), one email sent once.
    async with stack.sessions("trigger")() as session:
        decisions = (
            await session.execute(
                select(Decision.decision, Decision.invitation_id).where(
                    Decision.event_id == event_id
                )
            )
        ).all()
    assert len(decisions) == 1 and decisions[0][0] == "invited", decisions
    invitations = [
        m for m in await stack.records(events.INVITATIONS) if m.get("event_id") == event_id
    ]
    assert {m["invitation_id"] for m in invitations} == {str(decisions[0][1])}

    async def sent() -> list[tuple[str, int]] | None:
        async with stack.sessions("dispatcher")() as session:
            rows = (
                await session.execute(
                    select(Send.status, Send.attempts).where(Send.customer_id == customer)
                )
            ).all()
        return [(s, n) for s, n in rows] if rows and all(s == "sent" for s, _ in rows) else None

    assert await eventually(sent, what="the invitation email") == [("sent", 1)]

    # A provider's receipt, retried: stored once; re-signed later than the tolerance: refused.
    bounce = mailgun_event()
    request = mailgun_request(mailgun_api.webhook(bounce))
    first, again = await send(stack.http, request), await send(stack.http, request)
    assert (first.json(), again.json()) == ({"received": 1, "new": 1}, {"received": 1, "new": 0})
    stale = mailgun_request(mailgun_api.webhook(bounce, timestamp=int(time.time()) - 3600))
    async with stack.nothing_stored("a stale Mailgun receipt"):
        assert refused(await send(stack.http, stale), 401, "bad_signature") is None
    # Twilio signs no time: a replayed STOP is the same event, the number suppressed once.
    stop = twilio_request(twilio_stop())
    before = await stack.quiet()
    for _ in range(2):
        assert (await send(stack.http, stop)).status_code == 200
    after = await stack.quiet()
    assert after["dispatcher_receipts"] - before["dispatcher_receipts"] == 1
    assert after["dispatcher_optouts"] - before["dispatcher_optouts"] == 1


async def test_a_mailgun_signature_cannot_carry_another_event(stack: Stack) -> None:
    genuine = json.loads(mailgun_api.webhook(mailgun_event("delivered")))
    assert (
        await send(stack.http, mailgun_request(json.dumps(genuine).encode()))
    ).status_code == 200
    forged = {"signature": genuine["signature"], "event-data": mailgun_event("failed")}
    async with stack.nothing_stored("a Mailgun signature reused for a bounce"):
        r = await send(stack.http, mailgun_request(json.dumps(forged).encode()))
        assert refused(r, 401, "bad_signature") is None, r.text
        assert "used before" in r.json()["error"]["message"]
        # The same request again, word for word, is a retry: taken, its receipt stored once.
        r = await send(stack.http, mailgun_request(json.dumps(genuine).encode()))
        assert r.status_code == 200 and r.json()["new"] == 0, r.text
    # A new token (what Mailgun sends with a new request) is taken.
    fresh = json.loads(mailgun_api.webhook(mailgun_event("delivered")))
    assert fresh["signature"]["token"] != genuine["signature"]["token"]
    assert (await send(stack.http, mailgun_request(json.dumps(fresh).encode()))).status_code == 200


# --- survey and unsubscribe links -----------------------------------------------------------------


def tampered(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


LINK_ROUTES = ("GET /s", "POST /s", "GET /u", "POST /u")


async def link_statuses(
    http: httpx.AsyncClient, token: str, routes: tuple[str, ...] = LINK_ROUTES
) -> dict[str, int]:
    """What the link routes answer for ``token``: the survey page and its answer (a score that
    would be stored), the unsubscribe page and a one-click unsubscribe."""
    path = quote(token, safe="")
    requests = {
        "GET /s": lambda: http.get(f"/s/{path}"),
        "POST /s": lambda: http.post(f"/s/{path}", data={"score": "9"}),
        "GET /u": lambda: http.get(f"/u/{path}"),
        "POST /u": lambda: http.post(
            f"/u/{path}",
            content=b"List-Unsubscribe=One-Click",
            headers={"content-type": FORM},
        ),
    }
    return {route: (await requests[route]()).status_code for route in routes}


async def test_bad_tokens_get_400_404_410_and_store_nothing(stack: Stack) -> None:
    live = await stack.invite()
    expired = await stack.invite(expired=True)
    cancelled = await stack.invite(cancelled=True)
    other_deployment = LinkKeys.parse("s:another-deployment-key-0123456789")
    unknown_key = LinkKeys.parse("z:a-key-this-collector-does-not-have")
    cases = {
        # 400: damaged or forged, refused before any look-up.
        "one character changed": (tampered(live.token), 400),
        "signed with another key": (other_deployment.issue(), 400),
        "an unknown key id": (unknown_key.issue(), 400),
        "id of one, signature of another": (live.token[:17] + expired.token[17:], 400),
        "one character more": (live.token + "x", 400),
        "not a token": ("not-a-token", 400),
        # 404: well signed, never issued; or no token at all (a slash is no token character:
        # no route matches, the path goes nowhere).
        "unknown": (stack.keys.issue(), 404),
        "path traversal": ("../../v1/responses", 404),
        # 410 on the survey page; an unsubscribe link works as long as its invitation is kept
        # (README: "works after the survey link expired") so a GET of it is the page.
        "expired": (expired.token, 410),
        "cancelled": (cancelled.token, 410),
    }
    wrong = {}
    async with stack.nothing_stored("bad survey links"):
        for case, (token, status) in cases.items():
            routes: tuple[str, ...] = LINK_ROUTES
            if case in ("expired", "cancelled"):
                routes = ("GET /s", "POST /s")  # and the unsubscribe page below
            got = await link_statuses(stack.http, token, routes)
            if got != dict.fromkeys(routes, status):
                wrong[case] = got
        for token in (expired.token, cancelled.token):
            got = await link_statuses(stack.http, token, ("GET /u",))
            if got != {"GET /u": 200}:
                wrong[f"unsubscribe page of {token}"] = got
    assert not wrong, wrong
    assert await stack.response_of(live) is None

    # The pages say why, as HTML, never a server error.
    r = await stack.http.get(f"/s/{tampered(live.token)}", headers={"Accept-Language": "en"})
    assert "text/html" in r.headers["content-type"] and "damaged" in r.text
    r = await stack.http.get(f"/s/{expired.token}")  # in the invitation's language
    assert "text/html" in r.headers["content-type"] and "Kyselyyn ei voi enää vastata" in r.text

    # An expired invitation's one-click unsubscribe is honoured (RFC 8058, the README).
    r = await stack.http.post(
        f"/u/{expired.token}",
        content=b"List-Unsubscribe=One-Click",
        headers={"content-type": FORM},
    )
    assert r.status_code == 200
    await stack.quiet()


async def test_one_invitations_link_cannot_answer_or_unsubscribe_another(stack: Stack) -> None:
    mine, theirs = await stack.invite(), await stack.invite()
    r = await stack.http.post(f"/s/{theirs.token}", data={"score": "10", "comment": "their own"})
    assert r.status_code == 303, r.text
    await stack.quiet()

    # The form carries no token and no invitation id; fields that try to name another
    # invitation are ignored: the answer is the link's own.
    foreign = {
        "token": theirs.token,
        "invitation_id": str(theirs.invitation_id),
        "invitation": str(theirs.invitation_id),
        "response_id": str(uuid.uuid4()),
        "customer_id": theirs.customer.id,
    }
    r = await stack.http.post(f"/s/{mine.token}", data={"score": "1", "comment": "mine", **foreign})
    assert r.status_code == 303, r.text
    ours, their = await stack.response_of(mine), await stack.response_of(theirs)
    assert ours is not None and (ours.score, ours.comment) == (1, "mine")
    assert their is not None and (their.score, their.comment, their.revision) == (
        10,
        "their own",
        1,
    )

    # Splicing one token's id with the other's signature, or the other way round: refused.
    async with stack.nothing_stored("spliced tokens"):
        for spliced in (mine.token[:17] + theirs.token[17:], theirs.token[:17] + mine.token[17:]):
            for path in (f"/s/{spliced}", f"/u/{spliced}"):
                r = await stack.http.post(path, data={"score": "0", "comment": "spliced"})
                assert r.status_code == 400, (path, r.status_code)
    their = await stack.response_of(theirs)
    assert their is not None and (their.score, their.comment, their.revision) == (
        10,
        "their own",
        1,
    )

    # An unsubscribe through one link, naming the other in its form, opts out only its own.
    r = await stack.http.post(f"/u/{mine.token}", data={"token": theirs.token, **foreign})
    assert r.status_code == 200
    async with stack.sessions("collector")() as session:
        opted = (await session.execute(select(CollectorOptOut.invitation_id))).scalars().all()
    assert mine.invitation_id in opted and theirs.invitation_id not in opted
    # The thank-you page of one link shows its own answer only.
    thanks = await stack.http.get(f"/s/{mine.token}/thanks?lang=en")
    assert thanks.status_code == 200 and "their own" not in thanks.text
    await stack.quiet()


# --- markup and formulas in answers ---------------------------------------------------------------

SCRIPT_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
ATTRIBUTE_ESCAPED = "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"


def directives(policy: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as {directive: sources}."""
    found = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        found[name.lower()] = sources
    return found


async def test_markup_in_answers_is_shown_as_text_and_formulas_stay_text(stack: Stack) -> None:
    comment = f"{XSS_SCRIPT} {XSS_ATTRIBUTE}"
    hyperlink = '=HYPERLINK("http://evil.example","open me")'
    # The markup comes in the answer, and in the segments that come from the CRM's event.
    marked = await stack.invite(context=SurveyContext(team=XSS_SCRIPT, agent=XSS_ATTRIBUTE))
    formula = await stack.invite(context=SurveyContext(team=hyperlink, agent=FORMULA))
    for invitation, score, text_ in ((marked, 2, comment), (formula, 1, FORMULA)):
        r = await stack.http.post(
            f"/s/{invitation.token}", data={"score": str(score), "comment": text_}
        )
        assert r.status_code == 303, r.text
    answer = await stack.response_of(marked)
    assert answer is not None and answer.comment == comment  # stored as typed, not mangled
    r = await stack.http.patch(
        f"/v1/responses/{answer.response_id}", json={"note": XSS_ATTRIBUTE}, headers=AUTH
    )
    assert r.status_code == 200, r.text

    # The dashboard's detractor queue shows the comment, team, agent and note as text.
    page = await stack.http.get("/dashboard", headers=AUTH)
    assert page.status_code == 200, page.text
    html = page.text
    assert f'<td class="comment">{SCRIPT_ESCAPED} {ATTRIBUTE_ESCAPED}</td>' in html
    assert f"<td>{SCRIPT_ESCAPED} / {ATTRIBUTE_ESCAPED}</td>" in html
    assert XSS_SCRIPT not in html and "<img src=x" not in html and XSS_ATTRIBUTE not in html
    # Its one script carries the response's nonce; the policy runs no other.
    policy = directives(page.headers["content-security-policy"])
    scripts = policy.get("script-src", policy["default-src"])
    assert "'unsafe-inline'" not in scripts and "'unsafe-eval'" not in scripts, scripts
    nonces = [s for s in scripts if s.startswith("'nonce-")]
    assert len(nonces) == 1 and len(nonces[0]) > len("'nonce-'") + 16, scripts
    tags = re.findall(r"<script\b[^>]*>", html)
    assert tags and all(f'nonce="{nonces[0][7:-1]}"' in t for t in tags), tags
    again = directives(
        (await stack.http.get("/dashboard", headers=AUTH)).headers["content-security-policy"]
    )
    assert nonces[0] not in again["script-src"], "the nonce must be new for every response"

    # The survey page shows the previous answer in its text area, escaped; it runs no script.
    survey = await stack.http.get(
        f"/s/{marked.token}", params={"lang": f"{XSS_ATTRIBUTE}{XSS_SCRIPT}", "score": XSS_SCRIPT}
    )
    assert survey.status_code == 200
    assert f"{SCRIPT_ESCAPED} {ATTRIBUTE_ESCAPED}</textarea>" in survey.text
    assert "<script" not in survey.text and "<img src=x" not in survey.text
    policy = directives(survey.headers["content-security-policy"])
    assert "script-src" not in policy and policy["default-src"] == ["'none'"]

    # The CSV export: a download, never rendered; cells that a spreadsheet would take for a
    # formula start with a quote; the rest is the text as typed.
    export = await stack.http.get("/v1/responses.csv", headers=AUTH)
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    assert export.headers["x-content-type-options"] == "nosniff"
    assert export.headers["content-disposition"].startswith("attachment;")
    rows = {r["invitation_id"]: r for r in csv.DictReader(io.StringIO(export.text))}
    cells = rows[str(formula.invitation_id)]
    assert (cells["comment"], cells["agent"], cells["team"]) == (
        "'" + FORMULA,
        "'" + FORMULA,
        "'" + hyperlink,
    )
    cells = rows[str(marked.invitation_id)]
    assert (cells["comment"], cells["team"], cells["followup_note"]) == (
        comment,
        XSS_SCRIPT,
        XSS_ATTRIBUTE,
    )
    # The JSON API: JSON, the text as typed.
    listed = await stack.http.get("/v1/responses", params={"has_comment": "true"}, headers=AUTH)
    assert listed.headers["content-type"].startswith(JSON)
    by_id = {i["invitation_id"]: i for i in listed.json()["items"]}
    assert by_id[str(marked.invitation_id)]["comment"] == comment
    await stack.quiet()


# --- SQL metacharacters in every filter -----------------------------------------------------------

METACHARACTERS = (
    "' OR 1=1 --",
    "' OR '1'='1",
    '"; DROP TABLE collector_responses; --',
    "'; DROP TABLE trigger_decisions; --",
    "billing' --",
    "%",
    "_",
    "\\",
    "\x00",
    "billing\x00",
)
STRING_FILTERS = ("survey", "team", "agent", "channel", "touchpoint", "account")
TYPED_FILTERS = (
    "metric",
    "from",
    "to",
    "score_min",
    "score_max",
    "status",
    "alerted",
    "suspected_bot",
    "has_comment",
    "limit",
    "cursor",
)
SCORE_PARAMETERS = ("survey", "metric", "from", "to", "period", "group_by")


async def test_sql_metacharacters_in_every_filter_select_nothing_and_break_nothing(
    stack: Stack,
) -> None:
    segments = SurveyContext(
        touchpoint="delivery", channel="email", team="billing", agent="aino", account_id="acct-1"
    )
    seeded = await stack.invite(context=segments)
    r = await stack.http.post(f"/s/{seeded.token}", data={"score": "7", "comment": "seed"})
    assert r.status_code == 303, r.text
    customer = f"sql-{uuid.uuid4().hex[:10]}"
    event = {
        "specversion": "1.0",
        "id": f"sql-{uuid.uuid4().hex}",
        "source": "security://test",
        "type": "order.delivered",
        "data": {"customer": {"id": customer}},  # no contact point: a "skipped" decision
    }
    assert (await stack.http.post("/v1/events", json=event, headers=AUTH)).status_code == 202

    async def decided() -> list[Any]:
        r = await stack.http.get(f"/v1/customers/{customer}/decisions", headers=AUTH)
        return r.json()["decisions"]  # type: ignore[no-any-return]

    await eventually(decided, what="the trigger's decision about the seeded event")

    wrong: dict[str, str] = {}

    def check(what: str, r: httpx.Response, empty: Callable[[httpx.Response], bool]) -> None:
        if r.status_code >= 500:
            wrong[what] = f"{r.status_code} {r.text[:120]}"
        elif r.status_code < 300 and not empty(r):
            wrong[what] = f"{r.status_code}, not empty: {r.text[:300]}"

    def no_items(r: httpx.Response) -> bool:
        return bool(r.json()["items"] == [])

    def header_only(r: httpx.Response) -> bool:
        return len(r.text.splitlines()) == 1

    def refused_4xx(r: httpx.Response) -> bool:
        return False  # a typed parameter takes no such value: 4xx

    async with stack.nothing_stored("SQL metacharacters"):
        for value in METACHARACTERS:
            get = stack.http.get
            for name in STRING_FILTERS:
                params = {name: value, "suspected_bot": "include"}
                r = await get("/v1/responses", params=params, headers=AUTH)
                check(f"/v1/responses {name}={value!r}", r, no_items)
                r = await get("/v1/responses.csv", params=params, headers=AUTH)
                check(f"/v1/responses.csv {name}={value!r}", r, header_only)
            for name in TYPED_FILTERS:
                r = await get("/v1/responses", params={name: value}, headers=AUTH)
                check(f"/v1/responses {name}={value!r}", r, refused_4xx)
            for name in SCORE_PARAMETERS:
                r = await get("/v1/scores", params={name: value}, headers=AUTH)
                check(f"/v1/scores {name}={value!r}", r, refused_4xx)
            path = quote(value, safe="")
            r = await get(f"/v1/customers/{path}/decisions", headers=AUTH)
            check(f"/v1/customers/{value!r}/decisions", r, lambda r: r.json()["decisions"] == [])
            for name in ("limit", "before"):
                r = await get(
                    f"/v1/customers/{customer}/decisions", params={name: value}, headers=AUTH
                )
                check(f"/v1/customers/.../decisions {name}={value!r}", r, refused_4xx)
            r = await stack.http.patch(
                f"/v1/responses/{path}", json={"status": "resolved"}, headers=AUTH
            )
            check(f"PATCH /v1/responses/{value!r}", r, refused_4xx)
            for route in ("/s", "/u"):
                r = await get(f"{route}/{path}")
                check(f"{route}/{value!r}", r, refused_4xx)
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())

    # The tables are intact and the filters still find what is there (a wildcard above would
    # have found it too).
    found = await stack.http.get("/v1/responses", params={"team": "billing"}, headers=AUTH)
    assert [i["comment"] for i in found.json()["items"]] == ["seed"]
    assert await decided()

    # In the answer form: each is stored as typed; a NUL (PostgreSQL text holds none) is
    # refused with 400 before anything is stored.
    typed = await stack.invite()
    for value in METACHARACTERS:
        if "\x00" in value:
            async with stack.nothing_stored("a NUL in an answer"):
                r = await stack.http.post(
                    f"/s/{typed.token}", data={"score": "7", "comment": value}
                )
                assert refused(r, 400, "bad_form") is None, r.text
            continue
        r = await stack.http.post(f"/s/{typed.token}", data={"score": "7", "comment": value})
        assert r.status_code == 303, (value, r.status_code, r.text)
        answer = await stack.response_of(typed)
        assert answer is not None and answer.comment == value.strip()

    # Erasure takes the id as it is: a metacharacter erases nobody else.
    for value in METACHARACTERS:
        r = await stack.http.delete(f"/v1/customers/{quote(value, safe='')}", headers=AUTH)
        assert r.status_code < 500, (value, r.status_code, r.text)
    await stack.quiet()
    kept = await stack.response_of(seeded)
    assert kept is not None and (kept.customer_id, kept.comment) == (seeded.customer.id, "seed")
    assert await decided()


# --- oversized bodies -----------------------------------------------------------------------------


def padded(prefix: bytes, suffix: bytes = b"") -> bytes:
    """A body of KAIKU_MAX_BODY_BYTES + 1 bytes, one that would be taken were it smaller."""
    return prefix + b"x" * (MAX_BODY + 1 - len(prefix) - len(suffix)) + suffix


def oversized(token: str) -> dict[str, tuple[str, str, dict[str, str], bytes]]:
    """Every route that takes a body: (method, path, headers, body)."""
    event = (
        b'{"specversion": "1.0", "id": "big", "source": "security://test", '
        b'"type": "order.delivered", "data": {"customer": {"id": "big", "email": '
        b'"big@example.com"}, "attributes": {"padding": "',
        b'"}}}',
    )
    json_body = padded(b'{"padding": "', b'"}')
    form = padded(b"score=9&comment=")
    requests: dict[str, tuple[str, str, dict[str, str], bytes]] = {
        "/v1/events": ("POST", "/v1/events", {**AUTH, "content-type": JSON}, padded(*event)),
        "/s/{token}": ("POST", f"/s/{token}", {"content-type": FORM}, form),
        "/u/{token}": (
            "POST",
            f"/u/{token}",
            {"content-type": FORM},
            padded(b"List-Unsubscribe=One-Click&x="),
        ),
        "/dashboard/login": (
            "POST",
            "/dashboard/login",
            {"content-type": FORM},
            padded(f"token={API_TOKEN}&x=".encode()),
        ),
        "/dashboard/logout": ("POST", "/dashboard/logout", {"content-type": FORM}, padded(b"x=")),
        "/v1/responses/{response_id}": (
            "PATCH",
            f"/v1/responses/{uuid.uuid4()}",
            {**AUTH, "content-type": JSON},
            json_body,
        ),
    }
    for vendor in trigger_vendors():
        path, headers, _ = genuine_webhooks()[vendor]
        requests[f"/v1/webhooks/{vendor}"] = ("POST", path, headers, json_body)
    # Signed as Standard Webhooks signs it: only its size is wrong.
    big = padded(*event)
    requests["/v1/webhooks/generic"] = ("POST", *generic_request(big))
    requests["/v1/webhooks/salesforce"] = (
        "POST",
        genuine_webhooks()["salesforce"][0],
        dict(salesforce.HEADERS),
        padded(b"<x>", b"</x>"),
    )
    for provider, (path, headers, _) in genuine_receipts().items():
        ctype = {k.lower(): v for k, v in headers.items()}["content-type"]
        body = form if ctype == FORM else json_body
        requests[f"/v1/provider-events/{provider}"] = ("POST", path, headers, body)
    return requests


async def chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def routes_with_a_body(app: EmbeddedApp) -> set[str]:
    """Every POST, PUT and PATCH route of the three services, as ``/path/{param}``."""

    def walk(routes: list[Any]) -> Iterator[Any]:
        for route in routes:
            included = getattr(route, "original_router", None)  # FastAPI's include_router
            yield from walk(included.routes) if included is not None else (route,)

    found = set()
    for service in app.apps.values():
        for route in walk(service.routes):
            if (getattr(route, "methods", None) or set()) & {"POST", "PUT", "PATCH"}:
                found.add(route.path)
    assert found, "no route found: has FastAPI changed how it keeps included routers?"
    return found


async def test_oversized_bodies_are_413_on_every_route_with_or_without_a_length(
    stack: Stack,
) -> None:
    invitation = await stack.invite()
    requests = oversized(invitation.token)
    templates = {
        re.sub(
            r"/(nobody|zendesk|hubspot|freshdesk|intercom|salesforce|servicenow|generic)$",
            "/{source}",
            key,
        )
        for key in requests
    }
    templates = {
        re.sub(r"/(sendgrid|mailgun|twilio|46elks)$", "/{provider}", key) for key in templates
    }
    assert routes_with_a_body(stack.app) == templates, "a route that takes a body is not covered"
    wrong: dict[str, str] = {}
    async with stack.nothing_stored("oversized bodies"):
        for name, (method, path, headers, body) in requests.items():
            assert len(body) == MAX_BODY + 1
            sized = await stack.http.request(method, path, content=body, headers=headers)
            if problem := refused(sized, 413, "too_large"):
                wrong[f"{name} with Content-Length"] = problem
            chunked = await stack.http.request(method, path, content=chunks(body), headers=headers)
            if problem := refused(chunked, 413, "too_large"):
                wrong[f"{name} chunked"] = problem
    assert not wrong, "\n".join(f"{k}: {v}" for k, v in wrong.items())
    assert await stack.response_of(invitation) is None


# --- slow clients ---------------------------------------------------------------------------------


@asynccontextmanager
async def served(app: EmbeddedApp) -> AsyncIterator[int]:
    """The stack under uvicorn (the server ``python -m services.<name>`` runs) on a free port,
    in this event loop: the stack's lifespans already run."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, timeout=10, what="uvicorn serving the stack")
        yield port
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 15)


async def trickle(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    *,
    chunked: bool = False,
    length: int | None = None,
    every: float = 0.2,
) -> bytes:
    """Send the headers at once, then the body one byte every ``every`` seconds until the
    server answers (``length``: the Content-Length to announce instead of the body's);
    everything the server sent until it closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    size = len(body) if length is None else length
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: kaiku.test\r\n{head}{framing}\r\n\r\n".encode()
    )
    await writer.drain()
    received = bytearray()

    async def answer() -> bytes:
        """What the server sends until it closes the connection (read as it comes: a reset
        after the close, for a byte sent meanwhile, loses nothing already read)."""
        try:
            while chunk := await reader.read(65536):
                received.extend(chunk)
        except ConnectionResetError:
            pass
        return bytes(received)

    answered = asyncio.create_task(answer())
    try:
        for i in range(len(body)):
            if received or answered.done():
                break  # the server answered: stop sending
            piece = body[i : i + 1]
            try:
                writer.write(b"1\r\n" + piece + b"\r\n" if chunked else piece)
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(every)
        else:
            if chunked:
                writer.write(b"0\r\n\r\n")
        return await asyncio.wait_for(answered, 10)
    finally:
        writer.close()


async def test_a_client_trickling_its_body_is_cut_off_with_408_and_nothing_stored(
    stack: Stack,
) -> None:
    invitation = await stack.invite()
    customer = {"id": "slow", "email": "slow@example.com"}
    event = {
        "specversion": "1.0",
        "id": f"slow-{uuid.uuid4().hex}",
        "source": "security://test",
        "type": "order.delivered",
        "data": {"customer": customer},
    }
    hook_path, hook_headers, hook_body = generic_request(
        json.dumps({"id": event["id"], "type": event["type"], "customer": customer}).encode()
    )
    twilio_path, twilio_headers, twilio_body = twilio_request(twilio_stop())
    form = b"score=9&comment=typed+very+slowly"
    slow = {
        "survey answer": ("POST", f"/s/{invitation.token}", {"content-type": FORM}, form, False),
        "survey answer, chunked": (
            "POST", f"/s/{invitation.token}", {"content-type": FORM}, form, True
        ),
        "unsubscribe": (
            "POST", f"/u/{invitation.token}", {"content-type": FORM},
            b"List-Unsubscribe=One-Click", False,
        ),
        "event": ("POST", "/v1/events", {**AUTH, "content-type": JSON},
                  json.dumps(event).encode(), False),
        "webhook": ("POST", hook_path, hook_headers, hook_body, False),
        "provider event": ("POST", twilio_path, twilio_headers, twilio_body, True),
    }  # fmt: skip
    async with served(stack.app) as port, stack.nothing_stored("slow clients"):
        answers = [
            asyncio.create_task(trickle(port, method, path, headers, body, chunked=chunked))
            for method, path, headers, body, chunked in slow.values()
        ]
        # Meanwhile the server serves others.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
        raw = dict(zip(slow, await asyncio.gather(*answers), strict=True))
        # A body announced larger than the limit: refused before a byte of it is read.
        big = await trickle(
            port, "POST", "/v1/events", {**AUTH, "content-type": JSON}, b"", length=10 * MAX_BODY
        )
    wrong = {}
    for name, answer in raw.items():
        head, _, body = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 408 ") or b"connection: close" not in head.lower():
            wrong[name] = answer[:300]
        elif json.loads(body)["error"]["code"] != "timeout":
            wrong[name] = body
    assert not wrong, wrong
    assert big.startswith(b"HTTP/1.1 413 ") and b'"too_large"' in big, big[:300]

"""Every vendor's documented example webhook, signed as the vendor signs it, posted to a running
stack, becomes an invitation in the outbox; the vendor's retry of it adds nothing; the same request
with one byte changed is refused.

One stack for all seven vendors: trigger (every vendor configured with its unit tests' secret,
every contact resolver pointed at one local vendor API), dispatcher with the ``file`` channel,
collector; the real broker and PostgreSQL; the shipped program (deploy/local/program.yaml). The
examples, secrets and the vendors' documented API answers come from the vendors' unit-test modules
(tests/trigger/test_webhook_<vendor>.py); the API answers name a distinct email per vendor, so each
email in the outbox shows which look-up it came from.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
from pydantic import SecretStr
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.collector.app import create_app as collector_app
from services.collector.config import CollectorSettings
from services.common import events
from services.common.config import DatabaseSettings, HttpSettings, KafkaSettings, LinkSettings
from services.common.program import Program
from services.common.settings import CommonSettings
from services.dispatcher.app import create_app as dispatcher_app
from services.dispatcher.config import DispatcherSettings
from services.dispatcher.models import Send
from services.embedded import EmbeddedApp
from services.trigger.app import create_app as trigger_app
from services.trigger.config import TriggerSettings
from services.trigger.ingress import ContactResolver, Vendor
from services.trigger.ingress.freshdesk import FreshdeskResolver
from services.trigger.ingress.hubspot import HubspotResolver
from services.trigger.ingress.intercom import IntercomResolver
from services.trigger.ingress.salesforce import SalesforceResolver
from services.trigger.ingress.servicenow import ServiceNowResolver
from services.trigger.ingress.zendesk import ZendeskResolver
from services.trigger.models import Decision
from tests.conftest import read_topic
from tests.support import client, eventually, running
from tests.trigger import test_webhook_freshdesk as freshdesk_docs
from tests.trigger import test_webhook_generic as generic_docs
from tests.trigger import test_webhook_hubspot as hubspot_docs
from tests.trigger import test_webhook_intercom as intercom_docs
from tests.trigger import test_webhook_salesforce as salesforce_docs
from tests.trigger import test_webhook_servicenow as servicenow_docs
from tests.trigger import test_webhook_zendesk as zendesk_docs
from tests.vendor_api import LocalApi

# HubSpot signs the full URL it calls: the client's base URL is what its example signs.
BASE_URL = "http://kaiku.test"
TOKEN = "webhooks-" + uuid.uuid4().hex
# How long a retried or refused request gets to (wrongly) produce a second email.
SETTLE_SECONDS = 2.0
# The shared-secret header of Freshdesk's automation rule and ServiceNow's business rule.
SECRET_HEADER = "X-Kaiku-Webhook-Secret"
# Salesforce's acknowledgement: notificationsResponse/Ack in the outbound-messaging namespace.
ACK_PATH = ".//{http://soap.sforce.com/2005/09/outbound}Ack"

Req = tuple[str, dict[str, str], bytes]  # (path with query, headers, body)


# --- one byte changed -----------------------------------------------------------------------------


def _changed(text: str) -> str:
    """``text`` with its last character replaced: one byte changed."""
    return text[:-1] + ("0" if text[-1] != "0" else "1")


def body_byte(old: bytes, new: bytes) -> Callable[[Req], Req]:
    """For vendors that sign the body: change one byte of it (where a unit test does)."""
    assert len(old) == len(new) and sum(a != b for a, b in zip(old, new, strict=True)) == 1

    def tamper(request: Req) -> Req:
        path, headers, body = request
        assert old in body, f"{old!r} is not in the example body"
        return path, headers, body.replace(old, new, 1)

    return tamper


def header_byte(name: str) -> Callable[[Req], Req]:
    """For shared-secret vendors (the body is not signed): one byte of the secret header."""

    def tamper(request: Req) -> Req:
        path, headers, body = request
        return path, headers | {name: _changed(headers[name])}, body

    return tamper


def query_byte(param: str) -> Callable[[Req], Req]:
    """For a secret in the endpoint URL (Salesforce): one byte of the query token."""

    def tamper(request: Req) -> Req:
        path, headers, body = request
        before, found, rest = path.partition(f"{param}=")
        assert found, f"no {param}= in {path}"
        value, amp, tail = rest.partition("&")
        return before + found + _changed(value) + amp + tail, headers, body

    return tamper


# --- the vendors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    vendor: str
    # The address the invitation must go to: from the webhook itself, or from the look-up.
    email: str
    # True when the example carries only ids, so the contact comes from the vendor's API.
    looked_up: bool
    request: Callable[[], Req]
    tamper: Callable[[Req], Req]


EXAMPLES = [
    # A Zendesk event webhook (ticket.status_changed → SOLVED): the requester's id only.
    Example(
        "zendesk",
        "zendesk@example.com",
        True,
        zendesk_docs.example_request,
        body_byte(b'"5158"', b'"5159"'),
    ),
    # A HubSpot ticket moved to the Closed stage: ids only (ticket → associated contact).
    Example(
        "hubspot",
        "hubspot@example.com",
        True,
        lambda: hubspot_docs.example_request(base_url=BASE_URL),
        body_byte(b'"4"', b'"5"'),
    ),
    # Freshdesk's recommended automation-rule body carries the requester's email.
    Example(
        "freshdesk",
        "requester-bob@example.com",
        False,
        freshdesk_docs.example_request,
        header_byte(SECRET_HEADER),
    ),
    # An Intercom conversation.admin.closed notification: the contact's id only.
    Example(
        "intercom",
        "intercom@example.com",
        True,
        intercom_docs.example_request,
        body_byte(b'"1295"', b'"1296"'),
    ),
    # A Salesforce outbound message for a closed Case carries ContactEmail.
    Example(
        "salesforce",
        "aino.virtanen@example.fi",
        False,
        salesforce_docs.example_request,
        query_byte("token"),
    ),
    # The ServiceNow business rule's body: the caller's sys_id only.
    Example(
        "servicenow",
        "servicenow@example.com",
        True,
        servicenow_docs.example_request,
        header_byte(SECRET_HEADER),
    ),
    # A generic (Standard Webhooks) order.delivered with the customer's email.
    Example(
        "generic",
        "aino@example.fi",
        False,
        lambda: (generic_docs.PATH, generic_docs.headers(), generic_docs.BODY),
        body_byte(b"cust-1", b"cust-2"),
    ),
]


def vendors() -> dict[str, Vendor]:
    configured: dict[str, Vendor] = {
        "zendesk": zendesk_docs.vendor(),
        "hubspot": hubspot_docs.vendor(),
        "freshdesk": freshdesk_docs.vendor(),
        "intercom": intercom_docs.vendor(),
        "salesforce": salesforce_docs.vendor(),
        "servicenow": servicenow_docs.vendor(),
        "generic": generic_docs.vendor(),
    }
    assert sorted(configured) == sorted(e.vendor for e in EXAMPLES)
    return configured


def resolvers(api: LocalApi) -> dict[str, ContactResolver]:
    """Every vendor's contact resolver, with the unit tests' credentials, against ``api``."""
    found: list[ContactResolver] = [
        ZendeskResolver(
            zendesk_docs.settings(
                api_base_url=api.url,
                api_email=zendesk_docs.API_EMAIL,
                api_token=zendesk_docs.API_TOKEN,
            )
        ),
        HubspotResolver(hubspot_docs.settings(api_url=api.url, access_token=hubspot_docs.TOKEN)),
        FreshdeskResolver(
            freshdesk_docs.settings(api_base_url=api.url, api_key=freshdesk_docs.API_KEY)
        ),
        IntercomResolver(
            intercom_docs.settings(api_base_url=api.url, access_token=intercom_docs.ACCESS_TOKEN)
        ),
        SalesforceResolver(
            salesforce_docs.settings(
                api_base_url=api.url,
                client_id=salesforce_docs.CLIENT_ID,
                client_secret=salesforce_docs.CLIENT_SECRET,
            )
        ),
        ServiceNowResolver(
            servicenow_docs.settings(
                api_base_url=api.url,
                api_username=servicenow_docs.API_USER,
                api_password=servicenow_docs.API_PASSWORD,
            )
        ),
    ]
    return {r.name: r for r in found}


# --- the vendors' APIs, in one local server -------------------------------------------------------


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def serve(
    api: LocalApi,
    method: str,
    path: str,
    *,
    auth: str,
    known: str | None,
    body: Any,
    needs: Callable[[Request], bool] = lambda _: True,
) -> None:
    """``path`` answers ``body`` to requests with the documented ``auth`` (and whatever else
    ``needs`` checks) for the record ``known`` (the ``{id}`` path parameter); 401 and 404
    otherwise."""

    @api.route(method, path)
    def endpoint(request: Request) -> Response:
        if request.headers.get("authorization") != auth or not needs(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        if known is not None and request.path_params.get("id") != known:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(body)


def vendor_api() -> LocalApi:
    """The documented look-up answers of each vendor (from its unit tests), each naming a
    distinct email."""
    api = LocalApi()

    # HubSpot: the ticket's associated contact, then the contact's properties.
    hubspot_auth = f"Bearer {hubspot_docs.TOKEN}"
    serve(
        api,
        "GET",
        "/crm/v4/objects/tickets/{id}/associations/contacts",
        auth=hubspot_auth,
        known=str(hubspot_docs.TICKET_CLOSED["objectId"]),
        body=hubspot_docs.ASSOCIATIONS,
    )
    properties: dict[str, Any] = hubspot_docs.CONTACT["properties"]  # type: ignore[assignment]
    serve(
        api,
        "GET",
        "/crm/v3/objects/contacts/{id}",
        auth=hubspot_auth,
        known=hubspot_docs.CONTACT_ID,
        body=hubspot_docs.CONTACT | {"properties": properties | {"email": "hubspot@example.com"}},
        needs=lambda r: "email" in r.query_params.get("properties", "").split(","),
    )
    # Zendesk: Show User (API token authentication).
    serve(
        api,
        "GET",
        "/api/v2/users/{id}",
        auth=basic(f"{zendesk_docs.API_EMAIL}/token", zendesk_docs.API_TOKEN),
        known=zendesk_docs.EVENT["detail"]["requester_id"],
        body={"user": zendesk_docs.USER["user"] | {"email": "zendesk@example.com"}},
    )
    # Intercom: Retrieve a contact (needs the Intercom-Version header).
    serve(
        api,
        "GET",
        "/contacts/{id}",
        auth=f"Bearer {intercom_docs.ACCESS_TOKEN}",
        known=str(intercom_docs.CONTACT["id"]),
        body=intercom_docs.CONTACT | {"email": "intercom@example.com"},
        needs=lambda r: bool(r.headers.get("intercom-version")),
    )
    # ServiceNow: the caller's sys_user record through the Table API.
    serve(
        api,
        "GET",
        "/api/now/table/sys_user/{id}",
        auth=basic(servicenow_docs.API_USER, servicenow_docs.API_PASSWORD),
        known=servicenow_docs.CALLER,
        body={"result": servicenow_docs.USER["result"] | {"email": "servicenow@example.com"}},
    )
    # Freshdesk and Salesforce: their examples carry the email, so these must not be called.
    serve(
        api,
        "GET",
        "/api/v2/contacts/{id}",
        auth=basic(freshdesk_docs.API_KEY, "X"),
        known=str(freshdesk_docs.CONTACT["id"]),
        body=freshdesk_docs.CONTACT | {"email": "freshdesk-api@example.com"},
    )
    serve(
        api,
        "POST",
        "/services/oauth2/token",
        auth="",  # the client credentials are in the form body
        known=None,
        body={"access_token": salesforce_docs.ACCESS_TOKEN, "token_type": "Bearer"},
        needs=lambda r: r.headers.get("authorization") is None,
    )
    serve(
        api,
        "GET",
        "/services/data/v61.0/sobjects/Contact/{id}",
        auth=f"Bearer {salesforce_docs.ACCESS_TOKEN}",
        known=salesforce_docs.CONTACT_ID,
        body=salesforce_docs.CONTACT | {"Email": "salesforce-api@example.com"},
    )
    return api


def vendors_asked(api: LocalApi) -> set[str]:
    asked = set()
    for call in api.calls:
        if call.path.startswith("/crm/"):
            asked.add("hubspot")
        elif call.path.startswith("/api/v2/users/"):
            asked.add("zendesk")
        elif call.path.startswith("/api/v2/contacts/"):
            asked.add("freshdesk")
        elif call.path.startswith("/api/now/"):
            asked.add("servicenow")
        elif call.path.startswith("/contacts/"):
            asked.add("intercom")
        elif call.path.startswith("/services/"):
            asked.add("salesforce")
    return asked


# --- the stack ------------------------------------------------------------------------------------


def stack(
    kafka: KafkaSettings,
    database: DatabaseSettings,
    program: Program,
    api: LocalApi,
    outbox: Path,
) -> EmbeddedApp:
    settings = CommonSettings(
        kafka=kafka,
        database=database,
        http=HttpSettings(api_token=SecretStr(TOKEN)),
        links=LinkSettings(public_url=BASE_URL),
    )
    return EmbeddedApp(
        trigger_app(
            settings,
            TriggerSettings(webhook_public_url=None),
            program=program,
            vendors=vendors(),
            resolvers=resolvers(api),
        ),
        dispatcher_app(
            settings,
            DispatcherSettings(email_provider="file", outbox_dir=outbox, poll_seconds=0.1),
            program=program,
        ),
        collector_app(settings, CollectorSettings(bot_min_seconds=0), program=program),
    )


def emails(outbox: Path) -> dict[str, list[tuple[str, bytes]]]:
    """The outbox's .eml files, (name, bytes), by their To address."""
    found: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    if outbox.is_dir():
        for path in sorted(outbox.glob("*.eml")):  # written atomically: complete when listed
            raw = path.read_bytes()
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            found[str(msg["To"])].append((path.name, raw))
    return dict(found)


async def ledger(app: EmbeddedApp, source: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The trigger's decisions about events from ``source``: why an email did (not) come."""
    sessions = app.apps["trigger"].state.runtime.sessions
    async with sessions() as s:
        rows = await s.execute(
            select(Decision.event_type, Decision.decision, Decision.reason, Decision.detail)
            .where(Decision.event_source == source)
            .order_by(Decision.id)
        )
        return [(t, d, r, detail) for t, d, r, detail in rows.all()]


async def invitation_email(app: EmbeddedApp, outbox: Path, example: Example, source: str) -> bytes:
    try:
        files = await eventually(
            lambda: emails(outbox).get(example.email),
            timeout=30,
            what=f"{example.vendor}: the invitation email to {example.email} in the outbox",
        )
    except AssertionError as exc:
        decisions = await ledger(app, source)
        raise AssertionError(f"{exc}; the trigger's decisions for {source}: {decisions}") from None
    assert len(files) == 1, f"{example.vendor}: {len(files)} emails to {example.email}"
    return files[0][1]


async def post(http: httpx.AsyncClient, request: Req) -> httpx.Response:
    path, headers, body = request
    return await http.post(path, content=body, headers=headers)


def accepted(example: Example, response: httpx.Response) -> list[str] | str:
    """What the webhook answered a genuine request: the accepted ids (Salesforce: its Ack)."""
    what = f"{example.vendor}: {response.status_code} {response.text}"
    if example.vendor == "salesforce":  # a SOAP Ack, or Salesforce resends for 24 hours
        assert response.status_code == 200, what
        assert response.headers["content-type"].startswith("text/xml"), what
        assert ElementTree.fromstring(response.content).findtext(ACK_PATH) == "true", what
        return response.text
    assert response.status_code == 202, what
    answer = response.json()
    assert len(answer["accepted"]) == 1, what
    assert (answer["ignored"], answer["dead_lettered"]) == (0, []), what
    return list(answer["accepted"])


# --- the test -------------------------------------------------------------------------------------


async def test_every_vendors_documented_webhook_becomes_one_invitation_and_forgeries_none(
    kafka: KafkaSettings, postgres: DatabaseSettings, program: Program, tmp_path: Path
) -> None:
    # The shipped program has a trigger for every example's event type (ticket.solved,
    # chat.ended, case.closed, order.delivered): nothing is added to it here.
    outbox = tmp_path / "outbox"
    sources = vendors()
    with vendor_api() as api:
        app = stack(kafka, postgres, program, api, outbox)
        async with running(*app.apps.values()), client(app, BASE_URL) as http:
            # The documented examples, signed now, as the vendors send them.
            requests = {e.vendor: e.request() for e in EXAMPLES}
            answers = {}
            for example in EXAMPLES:
                answers[example.vendor] = accepted(
                    example, await post(http, requests[example.vendor])
                )

            # Each becomes one invitation email, to the customer the webhook (or the vendor's
            # API) names.
            first: dict[str, bytes] = {}
            for example in EXAMPLES:
                source = sources[example.vendor].source()
                first[example.email] = await invitation_email(app, outbox, example, source)

            # The vendor retries the same request (it did not see our answer): same answer ...
            for example in EXAMPLES:
                again = accepted(example, await post(http, requests[example.vendor]))
                assert again == answers[example.vendor], f"{example.vendor}: retry answered {again}"

            # ... and the same request with one byte changed is refused, with a JSON error.
            for example in EXAMPLES:
                tampered = example.tamper(requests[example.vendor])
                assert tampered != requests[example.vendor]
                r = await post(http, tampered)
                what = f"{example.vendor}, one byte changed: {r.status_code} {r.text}"
                assert r.status_code == 401, what
                assert r.headers["content-type"].startswith("application/json"), what
                assert r.json()["error"]["code"] == "bad_signature", what

            await asyncio.sleep(SETTLE_SECONDS)  # time for a wrong second email to appear

            # No second email for anyone, and none rewritten (each was sent exactly once).
            now = emails(outbox)
            assert {to: len(files) for to, files in now.items()} == dict.fromkeys(first, 1)
            assert {to: files[0][1] for to, files in now.items()} == first

            sessions = app.apps["dispatcher"].state.runtime.sessions
            async with sessions() as s:
                sends = (await s.execute(select(Send.invitation, Send.status, Send.attempts))).all()
            assert sorted((inv["customer"]["email"], st, n) for inv, st, n in sends) == sorted(
                (e.email, "sent", 1) for e in EXAMPLES
            )

    # On the event topic: each genuine request and its retry (the same event id), nothing
    # from the refused ones.
    records = await read_topic(kafka, events.EVENTS, expect=2 * len(EXAMPLES) + 1, timeout=3)
    published = [json.loads(r.value) for r in records]  # type: ignore[attr-defined]
    by_source = Counter((e["source"], e["id"]) for e in published)
    for example in EXAMPLES:
        source = sources[example.vendor].source()
        ids = {i: n for (s, i), n in by_source.items() if s == source}
        assert list(ids.values()) == [2], f"{example.vendor}: events published {ids}"
        if isinstance(answers[example.vendor], list):
            assert list(ids) == answers[example.vendor], example.vendor
    assert len(published) == 2 * len(EXAMPLES)

    # Look-ups only for the examples that carry ids alone.
    assert vendors_asked(api) == {e.vendor for e in EXAMPLES if e.looked_up}

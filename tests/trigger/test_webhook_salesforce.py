"""The salesforce source: Outbound Messages (SOAP), the organization id plus a URL token, the SOAP
acknowledgement, safe XML, and the Contact look-up through the REST API."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.events import CloudEvent
from services.common.kafka import Outgoing
from services.common.program import load_program
from services.trigger.ingress import Contact, LookupFailed, WebhookRequest
from services.trigger.ingress.mapping import Ignored, to_event
from services.trigger.ingress.router import router
from services.trigger.ingress.salesforce import (
    ACK,
    Salesforce,
    SalesforceResolver,
    SalesforceSettings,
    parse_xml,
)
from tests.support import client
from tests.trigger.webhook_support import ROOT_PROGRAM, app_with, error, post
from tests.vendor_api import LocalApi

SECRET = "sf-url-token-5b2f8c1d9e7a4f60"
ORG = "00D5e000000KQ2eEAG"
PATH = "/v1/webhooks/salesforce"
CLIENT_ID = "3MVG9VwZxxW3bBQjhE6m21CG2nSS4WC"
CLIENT_SECRET = "8A4BE698BCA216718ECB0B1DCA294C69"
ACCESS_TOKEN = "00D5e000000KQ2e!AR8AQPXAhJNveaXDdPzbrtXqPykdVxBx"
CONTACT_ID = "0035e00000XyZ12AAB"

# An outbound message as the outbound-messaging WSDL defines it (notifications → Notification →
# Id + sObject xsi:type="sf:Case"), for a workflow rule "Case closed" with the fields chosen below.
ENVELOPE = """<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" \
xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <soapenv:Body>
  <notifications xmlns="http://soap.sforce.com/2005/09/outbound">
   <OrganizationId>{org}</OrganizationId>
   <ActionId>04k5e000000CaRkAAK</ActionId>
   <SessionId xsi:nil="true"/>
   <EnterpriseUrl>https://acme.my.salesforce.com/services/Soap/c/61.0/00D5e000000KQ2e</EnterpriseUrl>
   <PartnerUrl>https://acme.my.salesforce.com/services/Soap/u/61.0/00D5e000000KQ2e</PartnerUrl>
{notifications}
  </notifications>
 </soapenv:Body>
</soapenv:Envelope>
"""
NOTIFICATION = """   <Notification>
    <Id>{id}</Id>
    <sObject xsi:type="sf:Case" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>{case}</sf:Id>
     <sf:AccountId>0015e00000ZkM3hAAF</sf:AccountId>
     <sf:CaseNumber>{number}</sf:CaseNumber>
     <sf:ContactEmail>aino.virtanen@example.fi</sf:ContactEmail>
     <sf:ContactId>0035e00000XyZ12AAB</sf:ContactId>
     <sf:ContactMobile>+358 40 123 4567</sf:ContactMobile>
     <sf:IsClosed>true</sf:IsClosed>
     <sf:LastModifiedDate>2026-11-20T14:03:00.000Z</sf:LastModifiedDate>
     <sf:Origin>Phone</sf:Origin>
     <sf:Priority>Medium</sf:Priority>
     <sf:Status>{status}</sf:Status>
     <sf:Type xsi:nil="true"/>
    </sObject>
   </Notification>"""


def envelope(*notifications: tuple[str, str, str, str], org: str = ORG) -> bytes:
    """(notification id, case id, case number, status) per Notification."""
    parts = [
        NOTIFICATION.format(id=n, case=c, number=number, status=s)
        for n, c, number, s in notifications
    ]
    return ENVELOPE.format(org=org, notifications="\n".join(parts)).encode()


BODY = envelope(("04l5e00000Gx7QzAAJ", "5005e00000ABCDeAAF", "00001026", "Closed"))


def settings(**overrides: Any) -> SalesforceSettings:
    values: dict[str, Any] = {"webhook_secret": SECRET, "organization_id": ORG} | overrides
    return SalesforceSettings(**values)


def vendor(**overrides: Any) -> Salesforce:
    return Salesforce(settings(**overrides))


HEADERS = {"content-type": "text/xml; charset=utf-8", "soapaction": '""'}


def example_request(
    config: SalesforceSettings | None = None,
) -> tuple[str, dict[str, str], bytes]:
    """A valid Salesforce outbound message (path with query, headers, body) for these settings."""
    config = config or settings()
    assert config.webhook_secret is not None and config.organization_id is not None
    org = config.organization_id
    if len(org) == 15:  # the 18-character form adds a 3-character suffix; kaiku compares 15
        org += "AAA"
    body = envelope(("04l5e00000Gx7QzAAJ", "5005e00000ABCDeAAF", "00001026", "Closed"), org=org)
    return f"{PATH}?token={config.webhook_secret.get_secret_value()}", dict(HEADERS), body


def unit_request(body: bytes = BODY, token: str = SECRET) -> WebhookRequest:
    url = f"http://kaiku.test{PATH}?token={token}"
    return WebhookRequest("POST", url, HEADERS, body, None)  # type: ignore[arg-type]


def events_of(body: bytes = BODY) -> list[CloudEvent]:
    v = vendor()
    v.verify(unit_request(body))
    events = [to_event(v, item, None) for item in v.items(unit_request(body))]
    assert all(isinstance(e, CloudEvent) for e in events), events
    return events  # type: ignore[return-value]


# --- verification and refusals -------------------------------------------------------------------


async def test_a_genuine_message_is_accepted_until_it_tries_to_publish() -> None:
    path, h, body = example_request()
    r = await post(app_with({"salesforce": vendor()}), path, body, h)
    assert r.status_code == 503
    assert error(r)["code"] == "unavailable"


async def test_a_15_character_organization_id_matches_too() -> None:
    path, h, body = example_request()
    r = await post(app_with({"salesforce": vendor(organization_id=ORG[:15])}), path, body, h)
    assert r.status_code == 503


@pytest.mark.parametrize(
    ("query", "body"),
    [
        ("?token=sf-url-token-5b2f8c1d9e7a4f61", BODY),  # one byte of the token changed
        ("?token=forged", BODY),
        ("", BODY),  # no token
        (f"?token={SECRET}&token={SECRET}", BODY),  # ambiguous
        (f"?token={SECRET}", BODY.replace(ORG.encode(), b"00D000000000062EAA")),  # another org
    ],
)
async def test_wrong_token_or_organization_is_401(query: str, body: bytes) -> None:
    r = await post(app_with({"salesforce": vendor()}), PATH + query, body, HEADERS)
    assert r.status_code == 401
    assert error(r)["code"] == "bad_signature"
    assert SECRET not in r.text


async def test_malformed_oversize_and_wrong_content_type() -> None:
    app = app_with({"salesforce": vendor()}, max_body=4096)
    path = f"{PATH}?token={SECRET}"
    r = await post(app, path, BODY[:-40], HEADERS)
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    r = await post(app, path, b"<notifications/>", HEADERS)  # not a SOAP envelope
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    big = BODY.replace(
        b"<sf:Priority>", b"<sf:Description>" + b"y" * 5000 + b"</sf:Description><sf:Priority>"
    )
    r = await post(app, path, big, HEADERS)
    assert (r.status_code, error(r)["code"]) == (413, "too_large")
    r = await post(app, path, BODY, HEADERS | {"content-type": "application/json"})
    assert (r.status_code, error(r)["code"]) == (415, "unsupported_media_type")


async def test_doctype_and_entities_are_refused_before_anything_is_expanded() -> None:
    app = app_with({"salesforce": vendor()})
    path = f"{PATH}?token={SECRET}"
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        + BODY.split(b"?>", 1)[1].replace(b"<ActionId>", b"<ActionId>&x;")
    )
    r = await post(app, path, xxe, HEADERS)
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    assert "DOCTYPE" in error(r)["message"]
    lol = b'<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]><l>&b;</l>'
    r = await post(app, path, lol, HEADERS)
    assert (r.status_code, error(r)["code"]) == (400, "malformed_payload")
    # In UTF-16 a byte search would miss it; the parser does not.
    utf16 = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x><x/>'.encode("utf-16")
    with pytest.raises(Exception, match="DOCTYPE"):
        parse_xml(utf16)


async def test_an_unauthenticated_body_is_not_even_parsed() -> None:
    r = await post(app_with({"salesforce": vendor()}), PATH + "?token=nope", b"<<<", HEADERS)
    assert r.status_code == 401


def test_settings_are_required_and_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trigger.ingress import salesforce

    with pytest.raises(ValueError, match="ORGANIZATION_ID"):
        Salesforce(SalesforceSettings(webhook_secret=SECRET))
    with pytest.raises(ValueError, match="WEBHOOK_SECRET"):
        Salesforce(SalesforceSettings(organization_id=ORG))
    monkeypatch.delenv("KAIKU_SALESFORCE_WEBHOOK_SECRET", raising=False)
    assert salesforce.from_env() is None
    monkeypatch.setenv("KAIKU_SALESFORCE_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("KAIKU_SALESFORCE_ORGANIZATION_ID", ORG)
    configured = salesforce.from_env()
    assert configured is not None and configured.source() == f"salesforce://{ORG}"


# --- items, mapping, acknowledgement -------------------------------------------------------------


def test_a_closed_case_maps_to_case_closed() -> None:
    [event] = events_of()
    assert event.id == "salesforce-04l5e00000Gx7QzAAJ"
    assert event.source == f"salesforce://{ORG}"
    assert event.type == "case.closed"
    assert event.customer_id == CONTACT_ID
    assert event.data.customer.email == "aino.virtanen@example.fi"
    assert event.data.customer.phone == "+358401234567"
    assert event.data.customer.account_id == "0015e00000ZkM3hAAF"
    assert event.data.case_id == "00001026"
    assert event.data.channel == "Phone"
    assert event.time is not None and event.time.isoformat() == "2026-11-20T14:03:00+00:00"
    assert event.data.attributes == {"priority": "Medium", "record_id": "5005e00000ABCDeAAF"}


def test_one_item_per_notification_and_redelivery_keeps_the_ids() -> None:
    body = envelope(
        ("04l5e00000Gx7QzAAJ", "5005e00000ABCDeAAF", "00001026", "Closed"),
        ("04l5e00000Gx7R0AAJ", "5005e00000ABCDfAAF", "00001027", "Closed"),
    )
    first = [e.id for e in events_of(body)]
    assert first == ["salesforce-04l5e00000Gx7QzAAJ", "salesforce-04l5e00000Gx7R0AAJ"]
    assert [e.id for e in events_of(body)] == first  # Salesforce resends: same ids


def test_items_carry_no_session_id_and_other_statuses_are_ignored() -> None:
    v = vendor()
    body = envelope(("04l5e00000Gx7QzAAJ", "5005e00000ABCDeAAF", "00001026", "Escalated"))
    body = body.replace(b'<SessionId xsi:nil="true"/>', b"<SessionId>00D5e!AQ0secret</SessionId>")
    [item] = v.items(unit_request(body))
    assert "secret" not in json.dumps(item)
    assert set(item) == {"Id", "OrganizationId", "ActionId", "sObject"}
    assert item["sObject"]["type"] == "Case" and item["sObject"]["Type"] is None
    assert to_event(v, item, None) == Ignored("Case.Escalated")


def test_acknowledge_is_the_soap_ack() -> None:
    response = vendor().acknowledge(["salesforce-04l5e00000Gx7QzAAJ"])
    assert response is not None
    assert response.status_code == 200
    assert response.media_type == "text/xml"
    ack = parse_xml(bytes(response.body))
    ns = "{http://soap.sforce.com/2005/09/outbound}"
    assert ack.findtext(f".//{ns}notificationsResponse/{ns}Ack") == "true"


class RecordingProducer:
    """Stands in for the Kafka producer so the route can answer after publishing."""

    def __init__(self) -> None:
        self.settings = SimpleNamespace(produce_timeout_seconds=5.0)
        self.published: list[Outgoing] = []

    async def publish(self, messages: list[Outgoing]) -> None:
        self.published.extend(messages)

    def stalled(self, seconds: float) -> bool:
        return False


async def test_the_route_answers_salesforce_with_the_ack_after_publishing() -> None:
    producer = RecordingProducer()
    app = FastAPI()
    app.include_router(
        router({"salesforce": vendor()}, load_program(ROOT_PROGRAM), producer, 1_048_576)  # type: ignore[arg-type]
    )
    path, h, body = example_request()
    async with client(app, "http://kaiku.test") as http:
        r = await http.post(path, content=body, headers=h)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/xml")
    assert r.text == ACK
    [message] = producer.published
    assert isinstance(message.value, CloudEvent)
    assert message.value.id == "salesforce-04l5e00000Gx7QzAAJ"


# --- the Contact look-up -------------------------------------------------------------------------

# sObject Rows with ?fields=: the record's attributes and the requested fields.
CONTACT = {
    "attributes": {
        "type": "Contact",
        "url": f"/services/data/v61.0/sobjects/Contact/{CONTACT_ID}",
    },
    "Email": "aino.virtanen@example.fi",
    "MobilePhone": "+358 40 123 4567",
    "Phone": None,
    "AccountId": "0015e00000ZkM3hAAF",
    "Id": CONTACT_ID,
}
EXPECTED = Contact(
    email="aino.virtanen@example.fi", phone="+358401234567", account_id="0015e00000ZkM3hAAF"
)


def salesforce_api(answers: list[Response]) -> LocalApi:
    api = LocalApi()

    @api.route("POST", "/services/oauth2/token")
    async def token(request: Request) -> Response:
        form = parse_qs((await request.body()).decode())
        if form != {
            "grant_type": ["client_credentials"],
            "client_id": [CLIENT_ID],
            "client_secret": [CLIENT_SECRET],
        }:
            return JSONResponse({"error": "invalid_client"}, status_code=400)
        return JSONResponse(
            {
                "access_token": ACCESS_TOKEN,
                "instance_url": "https://acme.my.salesforce.com",
                "token_type": "Bearer",
                "issued_at": "1732111380000",
            }
        )

    @api.route("GET", "/services/data/v61.0/sobjects/Contact/{contact_id}")
    def contact(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
            return JSONResponse(
                [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
                status_code=401,
            )
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return api


def resolver(api: LocalApi, **overrides: Any) -> SalesforceResolver:
    values: dict[str, Any] = {
        "api_base_url": api.url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    } | overrides
    return SalesforceResolver(settings(**values))


def contact_calls(api: LocalApi) -> list[Any]:
    return [c for c in api.calls if c.path.startswith("/services/data/")]


async def test_the_resolver_gets_a_token_finds_the_contact_and_caches_both() -> None:
    [event] = events_of()
    api = salesforce_api([JSONResponse(CONTACT)])
    with api:
        r = resolver(api)
        async with httpx.AsyncClient() as http:
            assert await r.resolve(event, http) == EXPECTED
            assert await r.resolve(event, http) == EXPECTED
    assert [c.path for c in api.calls] == [
        "/services/oauth2/token",
        f"/services/data/v61.0/sobjects/Contact/{CONTACT_ID}",
    ]
    assert api.calls[1].query == {"fields": "Email,MobilePhone,Phone,AccountId"}


async def test_a_static_access_token_needs_no_token_call() -> None:
    [event] = events_of()
    api = salesforce_api([JSONResponse(CONTACT)])
    with api:
        r = resolver(api, client_id=None, client_secret=None, access_token=ACCESS_TOKEN)
        async with httpx.AsyncClient() as http:
            assert await r.resolve(event, http) == EXPECTED
    assert [c.path for c in api.calls] == [f"/services/data/v61.0/sobjects/Contact/{CONTACT_ID}"]


async def test_an_unknown_contact_is_none() -> None:
    [event] = events_of()
    not_found = [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
    api = salesforce_api([JSONResponse(not_found, status_code=404)])
    with api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(event, http) is None


async def test_rate_limited_then_found() -> None:
    [event] = events_of()
    api = salesforce_api(
        [
            JSONResponse(
                [{"errorCode": "REQUEST_LIMIT_EXCEEDED"}],
                status_code=429,
                headers={"Retry-After": "0"},
            ),
            JSONResponse(CONTACT),
        ]
    )
    with api:
        async with httpx.AsyncClient() as http:
            assert await resolver(api).resolve(event, http) == EXPECTED
    assert len(contact_calls(api)) == 2


async def test_server_errors_three_times_fail_and_drop_the_token() -> None:
    [event] = events_of()
    api = salesforce_api([Response("oops", status_code=500)])
    with api:
        r = resolver(api)
        async with httpx.AsyncClient() as http:
            with pytest.raises(LookupFailed) as failed:
                await r.resolve(event, http)
            assert len(contact_calls(api)) == 3
            assert ACCESS_TOKEN not in str(failed.value)
            with pytest.raises(LookupFailed):
                await r.resolve(event, http)
    tokens = [c for c in api.calls if c.path == "/services/oauth2/token"]
    assert len(tokens) == 2  # a failed look-up takes a fresh token next time


async def test_refused_client_credentials_fail_the_look_up() -> None:
    [event] = events_of()
    api = salesforce_api([JSONResponse(CONTACT)])
    with api:
        async with httpx.AsyncClient() as http:
            with pytest.raises(LookupFailed) as failed:
                await resolver(api, client_secret="wrong").resolve(event, http)
    assert "wrong" not in str(failed.value) and CLIENT_SECRET not in str(failed.value)
    assert contact_calls(api) == []


def test_resolver_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.trigger.ingress import salesforce

    for name in ("API_BASE_URL", "CLIENT_ID", "CLIENT_SECRET", "ACCESS_TOKEN"):
        monkeypatch.delenv(f"KAIKU_SALESFORCE_{name}", raising=False)
    monkeypatch.setenv("KAIKU_SALESFORCE_API_BASE_URL", "https://acme.my.salesforce.com/")
    assert salesforce.resolver_from_env() is None
    monkeypatch.setenv("KAIKU_SALESFORCE_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("KAIKU_SALESFORCE_CLIENT_SECRET", CLIENT_SECRET)
    configured = salesforce.resolver_from_env()
    assert configured is not None and configured.base == "https://acme.my.salesforce.com"

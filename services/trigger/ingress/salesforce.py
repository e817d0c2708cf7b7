"""``salesforce``: Outbound Messages (SOAP 1.1), the notifications() call of a workflow rule or
flow.

Salesforce posts ``text/xml``: a SOAP envelope whose body is a ``notifications`` element
(namespace ``http://soap.sforce.com/2005/09/outbound``) with ``OrganizationId``, ``ActionId``,
``SessionId`` (nil unless "Send Session ID" is ticked), ``EnterpriseUrl``, ``PartnerUrl`` and up
to 100 ``Notification`` elements, each an ``Id`` and an ``sObject`` (``xsi:type="sf:Case"``,
fields in ``urn:sobject.enterprise.soap.sforce.com``) carrying the fields chosen for the message.
The listener must answer ``notificationsResponse`` with ``<Ack>true</Ack>``; otherwise Salesforce
retries, with growing intervals (at most two hours apart), for up to 24 hours, possibly out of
order and more than once — the notification ``Id`` is the documented way to spot resends, so it
is the idempotency key. Sources:

- https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_om_outboundmessaging_wsdl.htm
- https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_om_outboundmessaging_notifications.htm
- https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_om_outboundmessaging_security.htm
- https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_retrieve.htm
  (``GET /services/data/vXX.X/sobjects/Contact/{id}?fields=…``, ``Authorization: Bearer``)
- https://developer.salesforce.com/docs/atlas.en-us.chatterapi.meta/chatterapi/quickstart_connecting.htm
  (OAuth 2.0 client credentials: ``POST /services/oauth2/token``, grant_type=client_credentials)

Authenticity: outbound messages carry no signature. Salesforce's security considerations say to
check the ``OrganizationId`` of every message (it is not secret), restrict the source IPs and use
TLS. kaiku checks the organization id against ``KAIKU_SALESFORCE_ORGANIZATION_ID`` (15 or 18
characters) AND a per-source secret put in the endpoint URL, which the outbound message lets the
admin choose: ``https://<kaiku>/v1/webhooks/salesforce?token=<KAIKU_SALESFORCE_WEBHOOK_SECRET>``;
the token is compared in constant time before any XML is parsed. Salesforce sends no timestamp
(a delivery may legitimately arrive 24 hours late), so there is no replay window:
``tolerance_seconds`` is kept for uniformity and not used; a replay repeats notification ids.

The XML is parsed with expat with DOCTYPE and entity declarations refused (no DTD, no entity
expansion, no external entities; ``defusedxml`` is not installed). The session id and the API
URLs are never copied into events.

Event type: ``<sObject type>.<Status>`` (``Case.Closed``). Not confirmed from the documentation:
which Case fields an org can add to the message (``ContactEmail`` and ``ContactMobile`` are
standard Case fields; when absent the Contact look-up fills them in), and that rate-limited
REST calls answer 429 (Salesforce documents 403 ``REQUEST_LIMIT_EXCEEDED`` for the daily limit,
which fails the look-up without retries).
"""

from __future__ import annotations

import hmac
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn
from urllib.parse import parse_qs, urlsplit
from xml.parsers import expat

import httpx
from fastapi.responses import Response
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import CloudEvent
from services.common.webhooks import same
from services.trigger.ingress import Contact, LookupFailed, WebhookRequest, malformed, unauthorized
from services.trigger.ingress.lookup import TtlCache, get_json
from services.trigger.ingress.mapping import normalize_email, normalize_phone

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
OUTBOUND = "http://soap.sforce.com/2005/09/outbound"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
TOKEN_PARAM = "token"  # noqa: S105 (the query parameter's name)
CONTACT_FIELDS = "Email,MobilePhone,Phone,AccountId"
_SF_ID = re.compile(r"^[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?$")

ACK = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    "<soapenv:Body>"
    '<notificationsResponse xmlns="http://soap.sforce.com/2005/09/outbound">'
    "<Ack>true</Ack>"
    "</notificationsResponse>"
    "</soapenv:Body>"
    "</soapenv:Envelope>"
)


class SalesforceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_SALESFORCE_", extra="ignore")

    # The token in the outbound message's endpoint URL (?token=…).
    webhook_secret: SecretStr | None = None
    # The org's id (Setup → Company Information), 15 or 18 characters.
    organization_id: str | None = None
    # Salesforce sends no timestamp: kept for uniformity, not used.
    tolerance_seconds: float = 300.0
    source: str | None = None  # default salesforce://<organization id>
    # The org's My Domain URL, https://acme.my.salesforce.com (for the Contact look-up).
    api_base_url: str | None = None
    api_version: str = "v61.0"
    # OAuth 2.0 client credentials of an external client app / connected app ...
    client_id: str | None = None
    client_secret: SecretStr | None = None
    # ... or a ready access token (for tests and short-lived setups).
    access_token: SecretStr | None = None
    # How long a client-credentials token is reused: keep it below the org's session timeout.
    token_ttl_seconds: float = 900.0
    cache_ttl_seconds: float = 300.0


class _Forbidden(Exception):
    pass


def _forbid(*_: Any) -> NoReturn:
    raise _Forbidden


def _qname(raw: str) -> str:
    return "{" + raw if "}" in raw else raw


def parse_xml(body: bytes) -> ET.Element:
    """Parse untrusted XML with expat into an ElementTree, refusing DOCTYPE and entity
    declarations (so no entity expansion and no external entities); ``malformed`` otherwise."""
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")

    def start(tag: str, attributes: dict[str, str]) -> None:
        builder.start(_qname(tag), {_qname(k): v for k, v in attributes.items()})

    def end(tag: str) -> None:
        builder.end(_qname(tag))

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    parser.StartDoctypeDeclHandler = _forbid
    parser.EntityDeclHandler = _forbid
    parser.UnparsedEntityDeclHandler = _forbid
    parser.ExternalEntityRefHandler = _forbid
    try:
        parser.Parse(body, True)
        return builder.close()
    except _Forbidden:
        raise malformed("DOCTYPE and entity declarations are not accepted") from None
    except (expat.ExpatError, ValueError, AssertionError):
        raise malformed("the body is not well-formed XML") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _notifications(root: ET.Element) -> ET.Element:
    body = root.find(f"{{{SOAP_ENV}}}Body") if root.tag == f"{{{SOAP_ENV}}}Envelope" else None
    notifications = body.find(f"{{{OUTBOUND}}}notifications") if body is not None else None
    if notifications is None:
        raise malformed("expected a SOAP envelope with an outbound-messaging notifications body")
    return notifications


def _text(element: ET.Element | None) -> str | None:
    if element is None or element.get(f"{{{XSI}}}nil") == "true":
        return None
    return (element.text or "").strip() or None


def _sobject(element: ET.Element) -> dict[str, Any]:
    kind = element.get(f"{{{XSI}}}type") or ""
    fields: dict[str, Any] = {"type": kind.rsplit(":", 1)[-1] or None}
    for child in element:
        fields[_local(child.tag)] = _text(child)
    return fields


class Salesforce:
    name: ClassVar[str] = "salesforce"
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("text/xml",)
    # Fields of a Case outbound message; each item is {"Id", "OrganizationId", "ActionId",
    # "sObject": {"type": "Case", <field>: <value>, …}}.
    DEFAULT_MAPPING: ClassVar[dict[str, str]] = {
        "time": "sObject.LastModifiedDate",
        "customer_id": "sObject.ContactId",
        "email": "sObject.ContactEmail",
        "phone": "sObject.ContactMobile",
        "account_id": "sObject.AccountId",
        "case_id": "sObject.CaseNumber",
        "channel": "sObject.Origin",
        "attributes.priority": "sObject.Priority",
        "attributes.case_type": "sObject.Type",
        "attributes.record_id": "sObject.Id",
    }
    DEFAULT_TYPES: ClassVar[dict[str, str]] = {"Case.Closed": "case.closed"}
    PASS_THROUGH_TYPES: ClassVar[bool] = False

    def __init__(self, settings: SalesforceSettings) -> None:
        if settings.webhook_secret is None:
            raise ValueError("KAIKU_SALESFORCE_WEBHOOK_SECRET is not set")
        if not settings.organization_id or not _SF_ID.match(settings.organization_id):
            raise ValueError("KAIKU_SALESFORCE_ORGANIZATION_ID must be a 15 or 18 character id")
        self.settings = settings
        self._secret = settings.webhook_secret.get_secret_value()
        self._org = settings.organization_id

    def verify(self, request: WebhookRequest) -> None:
        tokens = parse_qs(urlsplit(request.url).query).get(TOKEN_PARAM, [])
        if len(tokens) != 1:
            raise unauthorized(f"the endpoint URL must carry exactly one ?{TOKEN_PARAM}=")
        if not same(tokens[0], self._secret):
            raise unauthorized(f"the ?{TOKEN_PARAM}= of the endpoint URL does not match")
        organization = _text(
            _notifications(parse_xml(request.body)).find(f"{{{OUTBOUND}}}OrganizationId")
        )
        if organization is None or not self._same_org(organization):
            raise unauthorized("the message's OrganizationId is not the configured organization")

    def _same_org(self, organization: str) -> bool:
        given = organization[: len(self._org)] if len(self._org) == 15 else organization
        return hmac.compare_digest(given.encode(), self._org.encode())

    def items(self, request: WebhookRequest) -> list[dict[str, Any]]:
        notifications = _notifications(parse_xml(request.body))
        organization = _text(notifications.find(f"{{{OUTBOUND}}}OrganizationId"))
        action = _text(notifications.find(f"{{{OUTBOUND}}}ActionId"))
        items: list[dict[str, Any]] = []
        for notification in notifications.findall(f"{{{OUTBOUND}}}Notification"):
            sobject = notification.find(f"{{{OUTBOUND}}}sObject")
            if sobject is None:
                raise malformed("a Notification has no sObject")
            items.append(
                {
                    "Id": _text(notification.find(f"{{{OUTBOUND}}}Id")),
                    "OrganizationId": organization,
                    "ActionId": action,
                    "sObject": _sobject(sobject),
                }
            )
        if not items:
            raise malformed("the message has no Notification")
        return items

    def vendor_type(self, item: Mapping[str, Any]) -> str | None:
        sobject = item.get("sObject")
        if not isinstance(sobject, Mapping):
            return None
        kind, status = sobject.get("type"), sobject.get("Status")
        return f"{kind}.{status}" if kind and status else None

    def event_id(self, item: Mapping[str, Any]) -> str | None:
        value = item.get("Id")
        return value if isinstance(value, str) and value else None

    def source(self) -> str:
        return self.settings.source or f"salesforce://{self._org}"

    def acknowledge(self, accepted: list[str]) -> Response | None:
        # Reached once the items are published (or deliberately ignored or dead-lettered):
        # acknowledge the whole message, or Salesforce resends it for 24 hours.
        return Response(ACK, status_code=200, media_type="text/xml")


def from_env() -> Salesforce | None:
    settings = SalesforceSettings()
    return Salesforce(settings) if settings.webhook_secret is not None else None


class SalesforceResolver:
    """The case contact's details: ``GET /services/data/{version}/sobjects/Contact/{id}``."""

    name: ClassVar[str] = "salesforce"

    def __init__(self, settings: SalesforceSettings) -> None:
        has_client = settings.client_id is not None and settings.client_secret is not None
        if not settings.api_base_url or not (has_client or settings.access_token is not None):
            raise ValueError(
                "KAIKU_SALESFORCE_API_BASE_URL and either KAIKU_SALESFORCE_CLIENT_ID with "
                "KAIKU_SALESFORCE_CLIENT_SECRET or KAIKU_SALESFORCE_ACCESS_TOKEN are required"
            )
        self.settings = settings
        self.base = settings.api_base_url.rstrip("/")
        self._token: tuple[str, float] | None = None  # (access token, expires at, monotonic)
        self._cache: TtlCache[tuple[Contact | None]] = TtlCache(settings.cache_ttl_seconds)

    async def _access_token(self, http: httpx.AsyncClient) -> str:
        if self.settings.access_token is not None:
            return self.settings.access_token.get_secret_value()
        if self._token is not None and self._token[1] > time.monotonic():
            return self._token[0]
        assert self.settings.client_id is not None and self.settings.client_secret is not None
        url = f"{self.base}/services/oauth2/token"
        host = httpx.URL(url).host
        try:
            response = await http.post(
                url,
                data={
                    "grant_type": "client_credentials",
                    "client_id": self.settings.client_id,
                    "client_secret": self.settings.client_secret.get_secret_value(),
                },
            )
        except httpx.HTTPError as exc:
            raise LookupFailed(f"{type(exc).__name__} calling {host} for a token") from None
        if response.status_code != 200:
            raise LookupFailed(f"{host} refused the client credentials ({response.status_code})")
        try:
            token = response.json().get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise LookupFailed(f"{host} answered the token request without an access_token")
        self._token = (token, time.monotonic() + self.settings.token_ttl_seconds)
        return token

    async def resolve(self, event: CloudEvent, http: httpx.AsyncClient) -> Contact | None:
        contact_id = event.data.customer.id
        if not _SF_ID.match(contact_id):
            return None
        cached = self._cache.get(contact_id)
        if cached is not None:
            return cached[0]
        token = await self._access_token(http)
        try:
            body = await get_json(
                http,
                f"{self.base}/services/data/{self.settings.api_version}/sobjects/Contact/"
                f"{contact_id}",
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                params={"fields": CONTACT_FIELDS},
            )
        except LookupFailed:
            # An expired session answers 401 INVALID_SESSION_ID: take a new token next time.
            self._token = None
            raise
        contact = None if body is None else _contact(body)
        self._cache.put(contact_id, (contact,))
        return contact


def _str(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list | bool):
        return None
    return str(value).strip() or None


def _contact(body: Mapping[str, Any]) -> Contact:
    return Contact(
        email=normalize_email(body.get("Email")),
        phone=normalize_phone(body.get("MobilePhone")) or normalize_phone(body.get("Phone")),
        account_id=_str(body.get("AccountId")),
    )


def resolver_from_env() -> SalesforceResolver | None:
    settings = SalesforceSettings()
    has_client = settings.client_id is not None and settings.client_secret is not None
    if not settings.api_base_url or not (has_client or settings.access_token is not None):
        return None
    return SalesforceResolver(settings)

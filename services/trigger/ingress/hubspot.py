"""``hubspot``: HubSpot app webhooks (Webhooks API), signed with the v3 request signature.

Signature (https://developers.hubspot.com/docs/api/webhooks/validating-requests, section "Validate
the v3 request signature"; new developer platform: https://developers.hubspot.com/docs/apps/
developer-platform/build-apps/authentication/request-validation): ``X-HubSpot-Signature-v3`` is
``base64(HMAC-SHA256(client secret, method + URI + body + timestamp))`` as UTF-8, where the
timestamp is the ``X-HubSpot-Request-Timestamp`` header (Unix milliseconds) and the URI is the full
URL HubSpot called, with the URL-encoded characters of HubSpot's table decoded (``%3A %2F %3F %40
%21 %24 %27 %28 %29 %2A %2C %3B`` → ``: / ? @ ! $ ' ( ) * , ;``). Requests whose timestamp is older
than 5 minutes must be rejected (``KAIKU_HUBSPOT_TOLERANCE_SECONDS``, default 300). The key is the
app's *client secret* (``KAIKU_HUBSPOT_WEBHOOK_SECRET``). HubSpot's own SDK test vector is checked
in the tests (hubspot-api-python, tests/spec/utils/test_signature.py). The older v1/v2 signatures
(``X-HubSpot-Signature``) carry no timestamp and are not accepted. Behind a proxy that changes
scheme or host, set ``KAIKU_TRIGGER_WEBHOOK_PUBLIC_URL``: the signature covers the URL.

Payload (https://developers.hubspot.com/docs/api/webhooks, "Webhook payloads"): a JSON array of
up to 100 events ``{"objectId", "propertyName", "propertyValue", "changeSource", "eventId",
"subscriptionId", "portalId", "appId", "occurredAt" (ms), "subscriptionType", "attemptNumber"}``.
The docs' example names the type field ``eventType``; real deliveries (and the docs' signature
examples) call it ``subscriptionType``: both are read. Generic subscriptions of the new platform
(``object.propertyChange`` with ``objectTypeId`` such as ``0-5``) are read as their object's legacy
type (``ticket.propertyChange``). HubSpot says ``eventId`` is "not guaranteed to be unique", so the
idempotency key is ``{portalId}-{subscriptionId}-{eventId}``; a retry (``attemptNumber`` > 0)
keeps all three, so it maps to the same CloudEvent id.

Types. HubSpot events carry ids and, for property changes, the one changed property. The vendor
type looked up in the ``types`` table is ``{object}.{propertyName}={propertyValue}`` for property
changes (``ticket.hs_pipeline_stage=4``, ``conversation.status=CLOSED``) and the subscription type
otherwise (``ticket.creation``, ``contact.creation``). Ticket pipeline stage ids are per portal
(custom pipelines have numeric ids such as ``87654321``): map yours in the program's ``types``.
The defaults map stage ``4`` (the "Closed" status of HubSpot's default support pipeline — not
confirmed from HubSpot's docs, which say stage ids differ per portal) to ``ticket.solved`` and a
conversation thread whose ``status`` became ``CLOSED`` to ``chat.ended``. A reopened ticket cannot
be recognised: the webhook carries only the new stage, not the old one.

Customer id. No HubSpot event names its customer. kaiku's customer id is:
 - a contact event: the contact's id (``objectId``), as it is;
 - a ticket event: ``ticket:{objectId}`` (and ``case_id`` is the ticket id);
 - a conversation event: ``thread:{objectId}``;
 - any other object: ``{object}:{objectId}``.
The contact behind a ticket or thread is found by the resolver below; the customer id stays the
ticket's (or thread's), so per-customer rules (sampling, throttling) count per ticket for tickets.
These derived values are added to each item under ``kaiku`` (``kaiku.object``,
``kaiku.customer_id``, ``kaiku.case_id``), so the mapping can use or replace them. The mapping
also fills ``attributes.hubspot_object``, ``hubspot_object_id``, ``hubspot_portal_id`` and
``hubspot_change_source``; the resolver reads the first two.

Contact look-ups (``HubspotResolver``) use a private app's access token
(``KAIKU_HUBSPOT_ACCESS_TOKEN``, sent as ``Authorization: Bearer``; scopes ``tickets``,
``crm.objects.contacts.read`` and, for conversations, ``conversations.read``):
 - a ticket's contact: ``GET /crm/v4/objects/tickets/{id}/associations/contacts``, the first
   ``results[].toObjectId`` (https://developers.hubspot.com/docs/api-reference/
   crm-associations-v4/guide; the response model
   ``CollectionResponseMultiAssociatedObjectWithLabelForwardPaging`` of HubSpot's SDK);
 - a thread's contact: ``GET /conversations/v3/conversations/threads/{id}``, its
   ``associatedContactId`` (https://developers.hubspot.com/docs/api-reference/
   conversations-conversations-v3/guide);
 - the contact: ``GET /crm/v3/objects/contacts/{id}?properties=email,mobilephone,phone,
   hs_language,hs_timezone,associatedcompanyid``
   (https://developers.hubspot.com/docs/guides/crm/using-object-apis), its ``properties``.
   ``hs_timezone`` holds values such as ``europe_slash_helsinki``; they are turned back into IANA
   names (that value format was seen in public integrations, not in HubSpot's docs).
404 means "not known" (None); 429 and 5xx are retried (``lookup.get_json``, honouring
``Retry-After``); anything else raises ``LookupFailed``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from functools import cache
from typing import Any, ClassVar
from zoneinfo import available_timezones

import httpx
from fastapi.responses import Response
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import PHONE_E164, CloudEvent
from services.common.webhooks import b64, hmac_digest, require_fresh, same
from services.trigger.ingress import (
    Contact,
    LookupFailed,
    WebhookRequest,
    json_objects,
    unauthorized,
)
from services.trigger.ingress.lookup import TtlCache, get_json

SIGNATURE_HEADER = "X-HubSpot-Signature-v3"
TIMESTAMP_HEADER = "X-HubSpot-Request-Timestamp"

# The characters HubSpot decodes in the request URI before signing (v3), from its docs' table.
_DECODED = {
    "3A": ":",
    "2F": "/",
    "3F": "?",
    "40": "@",
    "21": "!",
    "24": "$",
    "27": "'",
    "28": "(",
    "29": ")",
    "2A": "*",
    "2C": ",",
    "3B": ";",
}
_ENCODED = re.compile("%(" + "|".join(_DECODED) + ")", re.IGNORECASE)

# objectTypeId of the generic ``object.*`` subscriptions → the legacy object name.
OBJECT_TYPE_IDS = {"0-1": "contact", "0-2": "company", "0-3": "deal", "0-5": "ticket"}
# The customer-id prefix of events about an object that is not the customer itself.
_PREFIXES = {"ticket": "ticket", "conversation": "thread"}
_RESOLVABLE = {"contact", "ticket", "conversation"}

CONTACT_PROPERTIES = (
    "email",
    "mobilephone",
    "phone",
    "hs_language",
    "hs_timezone",
    "associatedcompanyid",
)
_PHONE = re.compile(PHONE_E164)
_NUMERIC_ID = re.compile(r"^[0-9]{1,20}$")
_MILLIS = re.compile(r"^[0-9]{1,15}$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")


class HubspotSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_HUBSPOT_", extra="ignore")

    # The app's client secret: HubSpot signs its webhooks with it.
    webhook_secret: SecretStr | None = None
    # HubSpot: "Reject the request if the timestamp is older than 5 minutes."
    tolerance_seconds: float = 300.0
    # The HubSpot account (portal) id; when set, events of other accounts are ignored.
    portal_id: str | None = None
    # The CloudEvents source; default ``hubspot://{portal_id}`` (or ``hubspot://default``).
    source: str | None = None
    # Contact look-ups: the API and a private app's access token.
    api_url: str = "https://api.hubapi.com"
    access_token: SecretStr | None = None
    cache_seconds: float = 300.0


def signed_uri(url: str) -> str:
    """The request URI as HubSpot signs it (v3): the listed URL-encoded characters decoded."""
    return _ENCODED.sub(lambda m: _DECODED[m.group(1).upper()], url)


def sign(secret: str, method: str, url: str, body: bytes, timestamp_ms: int | str) -> str:
    """The ``X-HubSpot-Signature-v3`` value of a request (what HubSpot computes)."""
    message = f"{method.upper()}{signed_uri(url)}".encode() + body + str(timestamp_ms).encode()
    return b64(hmac_digest(secret.encode(), message))


def object_name(item: Mapping[str, Any]) -> str | None:
    """``ticket`` of ``ticket.propertyChange``; the object of a generic ``object.*`` event."""
    subscription = _subscription(item)
    if subscription is None:
        return None
    prefix = subscription.partition(".")[0]
    if prefix == "object":
        type_id = item.get("objectTypeId")
        return OBJECT_TYPE_IDS.get(str(type_id), str(type_id)) if type_id else None
    return prefix or None


def _subscription(item: Mapping[str, Any]) -> str | None:
    value = item.get("subscriptionType") or item.get("eventType")
    return value if isinstance(value, str) and value else None


def _id(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | str) and str(value).strip():
        return str(value).strip()
    return None


class Hubspot:
    name: ClassVar[str] = "hubspot"
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("application/json",)
    DEFAULT_MAPPING: ClassVar[dict[str, str]] = {
        "time": "occurredAt",
        "customer_id": "kaiku.customer_id",
        "case_id": "kaiku.case_id",
        "attributes.hubspot_object": "kaiku.object",
        "attributes.hubspot_object_id": "objectId",
        "attributes.hubspot_portal_id": "portalId",
        "attributes.hubspot_change_source": "changeSource",
    }
    DEFAULT_TYPES: ClassVar[dict[str, str]] = {
        "ticket.hs_pipeline_stage=4": "ticket.solved",
        "conversation.status=CLOSED": "chat.ended",
    }
    PASS_THROUGH_TYPES: ClassVar[bool] = False

    def __init__(self, settings: HubspotSettings) -> None:
        if settings.webhook_secret is None:
            raise ValueError("KAIKU_HUBSPOT_WEBHOOK_SECRET is not set")
        self.settings = settings
        self._secret = settings.webhook_secret.get_secret_value()

    def verify(self, request: WebhookRequest) -> None:
        signature = request.headers.get(SIGNATURE_HEADER)
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        if not (signature and timestamp):
            raise unauthorized(f"{SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required")
        timestamp = timestamp.strip()
        if not _MILLIS.match(timestamp):
            raise unauthorized(f"{TIMESTAMP_HEADER} is not a Unix time in milliseconds")
        require_fresh(
            int(timestamp) / 1000,
            request.received_at,
            self.settings.tolerance_seconds,
            TIMESTAMP_HEADER,
        )
        expected = sign(self._secret, request.method, request.url, request.body, timestamp)
        if not same(signature, expected):
            raise unauthorized(f"{SIGNATURE_HEADER} does not match the request")

    def items(self, request: WebhookRequest) -> list[dict[str, Any]]:
        events = json_objects(request, "a non-empty JSON array of HubSpot events")
        return [{**e, "kaiku": self._derived(e)} for e in events]

    @staticmethod
    def _derived(item: Mapping[str, Any]) -> dict[str, str | None]:
        obj = object_name(item)
        object_id = _id(item.get("objectId"))
        customer_id: str | None = None
        if obj is not None and object_id is not None:
            prefix = "" if obj == "contact" else _PREFIXES.get(obj, obj) + ":"
            customer_id = prefix + object_id
        return {
            "object": obj,
            "customer_id": customer_id,
            "case_id": object_id if obj == "ticket" else None,
        }

    def vendor_type(self, item: Mapping[str, Any]) -> str | None:
        portal = self.settings.portal_id
        if portal is not None and _id(item.get("portalId")) != portal.strip():
            return None  # another HubSpot account that installed the app
        subscription = _subscription(item)
        obj = object_name(item)
        if subscription is None or obj is None:
            return None
        action = subscription.partition(".")[2]
        prop = item.get("propertyName")
        if action == "propertyChange" and isinstance(prop, str) and prop:
            value = item.get("propertyValue")
            return f"{obj}.{prop}={'' if value is None else value}"
        return f"{obj}.{action}"

    def event_id(self, item: Mapping[str, Any]) -> str | None:
        event = _id(item.get("eventId"))
        if event is None:
            return None
        parts = (_id(item.get("portalId")), _id(item.get("subscriptionId")), event)
        return "-".join(p for p in parts if p is not None)

    def source(self) -> str:
        if self.settings.source:
            return self.settings.source
        return f"hubspot://{self.settings.portal_id or 'default'}"

    def acknowledge(self, accepted: list[str]) -> Response | None:
        return None


def from_env() -> Hubspot | None:
    settings = HubspotSettings()
    return Hubspot(settings) if settings.webhook_secret is not None else None


@cache
def _timezones() -> dict[str, str]:
    """Lower-cased IANA names (and HubSpot's ``_slash_`` spelling of them) → the IANA name."""
    names: dict[str, str] = {}
    for zone in available_timezones():
        names[zone.lower()] = zone
        names[zone.lower().replace("/", "_slash_")] = zone
    return names


def iana_timezone(value: Any) -> str | None:
    """``europe_slash_helsinki`` (HubSpot's ``hs_timezone``) or ``Europe/Helsinki`` → IANA."""
    if not isinstance(value, str) or not value.strip():
        return None
    return _timezones().get(value.strip().lower())


def e164(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    compact = re.sub(r"[\s().-]", "", value)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    return compact if _PHONE.match(compact) else None


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, bool | dict | list):
        return None
    text = str(value).strip()
    return text or None


def contact_from(body: Mapping[str, Any]) -> Contact:
    """A ``Contact`` from a CRM contact object (``{"id", "properties": {...}}``)."""
    props = body.get("properties")
    props = props if isinstance(props, Mapping) else {}
    locale = _text(props.get("hs_language"))
    return Contact(
        email=_text(props.get("email")),
        phone=e164(props.get("mobilephone")) or e164(props.get("phone")),
        locale=locale if locale and _LOCALE.match(locale) else None,
        timezone=iana_timezone(props.get("hs_timezone")),
        account_id=_text(props.get("associatedcompanyid")),
    )


def _target(event: CloudEvent) -> tuple[str, str] | None:
    """(object, id) the event is about: from the mapped attributes, else from the customer id."""
    attributes = event.data.attributes
    obj = _text(attributes.get("hubspot_object"))
    object_id = _text(attributes.get("hubspot_object_id"))
    if obj is None or object_id is None:
        prefix, sep, rest = event.data.customer.id.partition(":")
        if not sep:
            obj, object_id = "contact", prefix
        else:
            by_prefix = {p: o for o, p in _PREFIXES.items()}
            obj, object_id = by_prefix.get(prefix, prefix), rest
    if obj not in _RESOLVABLE or not _NUMERIC_ID.match(object_id):
        return None
    return obj, object_id


class HubspotResolver:
    """The contact behind a HubSpot event: a ticket's or thread's contact, then its properties."""

    name: ClassVar[str] = "hubspot"

    def __init__(self, settings: HubspotSettings) -> None:
        if settings.access_token is None:
            raise ValueError("KAIKU_HUBSPOT_ACCESS_TOKEN is not set")
        self.api = settings.api_url.rstrip("/")
        self._headers = {
            "Authorization": f"Bearer {settings.access_token.get_secret_value()}",
            "Accept": "application/json",
        }
        self._cache: TtlCache[Contact] = TtlCache(settings.cache_seconds)

    async def resolve(self, event: CloudEvent, http: httpx.AsyncClient) -> Contact | None:
        target = _target(event)
        if target is None:
            return None
        key = ":".join(target)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        obj, object_id = target
        contact_id = await self._contact_id(http, obj, object_id)
        if contact_id is None:
            return None
        contact = self._cache.get(f"contact:{contact_id}")
        if contact is None:
            body = await get_json(
                http,
                f"{self.api}/crm/v3/objects/contacts/{contact_id}",
                headers=self._headers,
                params={"properties": ",".join(CONTACT_PROPERTIES)},
            )
            if body is None:
                return None
            # The person becomes the customer: per-customer rules count per contact, not ticket.
            contact = replace(contact_from(body), customer_id=contact_id)
            self._cache.put(f"contact:{contact_id}", contact)
        self._cache.put(key, contact)
        return contact

    async def _contact_id(self, http: httpx.AsyncClient, obj: str, object_id: str) -> str | None:
        if obj == "contact":
            return object_id
        if obj == "ticket":
            body = await get_json(
                http,
                f"{self.api}/crm/v4/objects/tickets/{object_id}/associations/contacts",
                headers=self._headers,
            )
            if body is None:
                return None
            results = body.get("results")
            if not isinstance(results, list):
                raise LookupFailed("HubSpot answered associations without results")
            for association in results:
                if isinstance(association, Mapping):
                    found = _id(association.get("toObjectId"))
                    if found is not None and _NUMERIC_ID.match(found):
                        return found
            return None
        body = await get_json(
            http,
            f"{self.api}/conversations/v3/conversations/threads/{object_id}",
            headers=self._headers,
        )
        if body is None:
            return None
        found = _id(body.get("associatedContactId"))
        return found if found is not None and _NUMERIC_ID.match(found) else None


def resolver_from_env() -> HubspotResolver | None:
    settings = HubspotSettings()
    return HubspotResolver(settings) if settings.access_token is not None else None

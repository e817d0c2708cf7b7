"""``servicenow``: a business rule that posts the record it fired on, with RESTMessageV2.

ServiceNow has no webhook product and signs nothing: outbound calls are made by a business rule
(or a Flow) with ``sn_ws.RESTMessageV2`` — ``setEndpoint``, ``setHttpMethod``,
``setRequestHeader``, ``setRequestBody``, ``executeAsync`` — and the body is whatever the script
builds. ``docs/webhooks/servicenow.md`` has the business rule to install (an *after* rule on
``incident``, condition "State changes"); it posts::

    {"table": "incident", "sys_id": "…", "number": "INC0010023", "state": "6",
     "previous_state": "2", "sys_mod_count": "5", "sys_updated_on": "2026-11-20 14:03:00",
     "caller_id": "<sys_user sys_id>", "contact_type": "phone", "priority": "3",
     "assignment_group": "Service Desk", "assigned_to": "Beth Anglin"}

Sources:

- https://www.servicenow.com/docs/r/api-reference/server-api-reference/c_RESTMessageV2API.html
  (RESTMessageV2: setRequestHeader, setBasicAuth, setRequestBody, executeAsync)
- https://www.servicenow.com/docs/r/api-reference/rest-apis/c_TableAPI.html
  (``GET /api/now/table/{tableName}/{sys_id}``: ``sysparm_fields``, ``{"result": {…}}``, 404 when
  the record does not exist; reference fields come as ``{"link", "value"}``; basic auth)
- incident states (choice values of ``incident.state``): 1 New, 2 In Progress, 3 On Hold,
  6 Resolved, 7 Closed, 8 Canceled.

Authenticity — a per-source shared secret compared in constant time, either the header
``X-Kaiku-Webhook-Secret: <KAIKU_SERVICENOW_WEBHOOK_SECRET>`` (``setRequestHeader``) or HTTP Basic
with username ``KAIKU_SERVICENOW_WEBHOOK_USERNAME`` (default ``kaiku``) and the secret as password
(``setBasicAuth``). Keep the secret in a system property (``gs.getProperty``), not in the script.
ServiceNow sends no timestamp, so there is no replay window (``tolerance_seconds`` is kept for
uniformity and not used); a replay carries the same ``sys_mod_count`` and so the same event id.

The event type is ``<table>.<state value>`` (``incident.6``), or ``<table>.reopened`` when the
record left a resolved or closed state for an open one. The idempotency key is
``<table>-<sys_id>-<sys_mod_count>``: the record's update counter, so a retry of one update is one
event and the next resolution is another. Not confirmed from the documentation: how ServiceNow
answers a rate-limited Table API call (treated as 429 with ``Retry-After``, like any API).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import httpx
from fastapi.responses import Response
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import CloudEvent
from services.common.webhooks import verify_shared_secret
from services.trigger.ingress import Contact, WebhookRequest, json_objects
from services.trigger.ingress.freshdesk import iana_zone
from services.trigger.ingress.lookup import TtlCache, get_json
from services.trigger.ingress.mapping import normalize_email, normalize_phone

USER_FIELDS = "email,mobile_phone,phone,preferred_language,time_zone,company"
# State values that mean "done" per table (incident: 6 Resolved, 7 Closed, 8 Canceled).
DONE_STATES: dict[str, frozenset[str]] = {"incident": frozenset({"6", "7", "8"})}
_SYS_ID = re.compile(r"^[0-9a-f]{32}$")


class ServiceNowSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_SERVICENOW_", extra="ignore")

    webhook_secret: SecretStr | None = None
    webhook_username: str = "kaiku"
    # ServiceNow sends no timestamp: kept for uniformity, not used.
    tolerance_seconds: float = 300.0
    # The instance name: acme for https://acme.service-now.com.
    instance: str | None = None
    source: str | None = None  # default servicenow://<instance>
    api_base_url: str | None = None  # default https://<instance>.service-now.com
    api_username: str | None = None
    api_password: SecretStr | None = None
    cache_ttl_seconds: float = 300.0

    def source_uri(self) -> str:
        return self.source or f"servicenow://{self.instance or 'default'}"

    def api_base(self) -> str | None:
        if self.api_base_url:
            return self.api_base_url.rstrip("/")
        return f"https://{self.instance}.service-now.com" if self.instance else None


def _str(value: Any) -> str | None:
    if isinstance(value, Mapping):  # a reference field: {"link": …, "value": sys_id}
        value = value.get("value")
    if value is None or isinstance(value, dict | list | bool):
        return None
    text = str(value).strip()
    return text or None


class ServiceNow:
    name: ClassVar[str] = "servicenow"
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("application/json",)
    DEFAULT_MAPPING: ClassVar[dict[str, str]] = {
        "time": "sys_updated_on",
        "customer_id": "caller_id",
        "case_id": "number",
        "channel": "contact_type",
        "team": "assignment_group",
        "agent": "assigned_to",
        "attributes.priority": "priority",
        "attributes.table": "table",
    }
    DEFAULT_TYPES: ClassVar[dict[str, str]] = {
        "incident.6": "ticket.solved",
        "incident.7": "ticket.closed",
        "incident.reopened": "ticket.reopened",
    }
    PASS_THROUGH_TYPES: ClassVar[bool] = False

    def __init__(self, settings: ServiceNowSettings) -> None:
        if settings.webhook_secret is None:
            raise ValueError("KAIKU_SERVICENOW_WEBHOOK_SECRET is not set")
        self.settings = settings
        self._secret = settings.webhook_secret.get_secret_value()

    def verify(self, request: WebhookRequest) -> None:
        verify_shared_secret(request, self._secret, self.settings.webhook_username)

    def items(self, request: WebhookRequest) -> list[dict[str, Any]]:
        return json_objects(request, "a JSON object or a non-empty array of objects")

    def vendor_type(self, item: Mapping[str, Any]) -> str | None:
        table = _str(item.get("table")) or "incident"
        state = _str(item.get("state"))
        if state is None:
            return None
        previous = _str(item.get("previous_state"))
        done = DONE_STATES.get(table, frozenset())
        if previous in done and state not in done:
            return f"{table}.reopened"
        return f"{table}.{state}"

    def event_id(self, item: Mapping[str, Any]) -> str | None:
        table = _str(item.get("table")) or "incident"
        sys_id = _str(item.get("sys_id"))
        count = _str(item.get("sys_mod_count"))
        if sys_id is None or count is None:
            return None
        return f"{table}-{sys_id}-{count}"

    def source(self) -> str:
        return self.settings.source_uri()

    def acknowledge(self, accepted: list[str]) -> Response | None:
        return None


def from_env() -> ServiceNow | None:
    settings = ServiceNowSettings()
    return ServiceNow(settings) if settings.webhook_secret is not None else None


class ServiceNowResolver:
    """The caller's contact details: ``GET /api/now/table/sys_user/{sys_id}`` (basic auth)."""

    name: ClassVar[str] = "servicenow"

    def __init__(self, settings: ServiceNowSettings) -> None:
        base = settings.api_base()
        if settings.api_username is None or settings.api_password is None or base is None:
            raise ValueError(
                "KAIKU_SERVICENOW_API_USERNAME, KAIKU_SERVICENOW_API_PASSWORD and "
                "KAIKU_SERVICENOW_INSTANCE are required"
            )
        self.base = base
        self._auth = (settings.api_username, settings.api_password.get_secret_value())
        self._cache: TtlCache[tuple[Contact | None]] = TtlCache(settings.cache_ttl_seconds)

    async def resolve(self, event: CloudEvent, http: httpx.AsyncClient) -> Contact | None:
        sys_id = event.data.customer.id
        if not _SYS_ID.match(sys_id):  # a sys_id is 32 lower-case hex digits
            return None
        cached = self._cache.get(sys_id)
        if cached is not None:
            return cached[0]
        body = await get_json(
            http,
            f"{self.base}/api/now/table/sys_user/{sys_id}",
            auth=self._auth,
            headers={"Accept": "application/json"},
            params={"sysparm_fields": USER_FIELDS},
        )
        result = None if body is None else body.get("result")
        contact = _contact(result) if isinstance(result, Mapping) else None
        self._cache.put(sys_id, (contact,))
        return contact


def _contact(user: Mapping[str, Any]) -> Contact:
    return Contact(
        email=normalize_email(_str(user.get("email"))),
        phone=normalize_phone(_str(user.get("mobile_phone")))
        or normalize_phone(_str(user.get("phone"))),
        locale=_str(user.get("preferred_language")),
        timezone=iana_zone(_str(user.get("time_zone"))),
        account_id=_str(user.get("company")),
    )


def resolver_from_env() -> ServiceNowResolver | None:
    settings = ServiceNowSettings()
    if settings.api_username is None or settings.api_password is None:
        return None
    if settings.api_base() is None:
        return None
    return ServiceNowResolver(settings)

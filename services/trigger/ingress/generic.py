"""``generic``: any in-house system, signed the Standard Webhooks way.

Headers (https://www.standardwebhooks.com): ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and
``webhook-signature``, a space-separated list of ``v1,<base64 HMAC-SHA256>`` over
``{webhook-id}.{webhook-timestamp}.{body}``. The key is the base64 part of a ``whsec_…`` secret
(``KAIKU_GENERIC_WEBHOOK_SECRET``). Requests older than the tolerance (default 300 s) are refused,
so a captured request cannot be replayed later.

The body is one JSON object or an array of them, shaped like kaiku's event data by default:
``{"id", "type", "time", "customer": {"id", "email", "phone", "locale", "timezone",
"account_id"}, "touchpoint", "channel", "team", "agent", "case_id", "attributes": {...}}``.
An object without ``id`` takes the ``webhook-id`` header as its id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi.responses import Response
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.webhooks import standard_secret_key, standard_signature, verify_standard
from services.trigger.ingress import WebhookRequest, json_objects


class GenericSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_GENERIC_", extra="ignore")

    webhook_secret: SecretStr | None = None
    tolerance_seconds: float = 300.0
    source: str = "generic://default"


def secret_key(secret: str) -> bytes:
    try:
        return standard_secret_key(secret)
    except ValueError as exc:
        raise ValueError(f"KAIKU_GENERIC_WEBHOOK_SECRET: {exc}") from exc


sign = standard_signature  # what senders compute (kept for the tests and docs)


class Generic:
    name: ClassVar[str] = "generic"
    CONTENT_TYPES: ClassVar[tuple[str, ...]] = ("application/json",)
    DEFAULT_MAPPING: ClassVar[dict[str, str]] = {
        "type": "type",
        "time": "time",
        "customer_id": "customer.id",
        "email": "customer.email",
        "phone": "customer.phone",
        "locale": "customer.locale",
        "timezone": "customer.timezone",
        "account_id": "customer.account_id",
        "touchpoint": "touchpoint",
        "channel": "channel",
        "team": "team",
        "agent": "agent",
        "case_id": "case_id",
        "do_not_survey": "do_not_survey",
    }
    # Generic events already carry kaiku's type names: every type maps to itself.
    DEFAULT_TYPES: ClassVar[dict[str, str]] = {}
    PASS_THROUGH_TYPES: ClassVar[bool] = True

    def __init__(self, settings: GenericSettings) -> None:
        if settings.webhook_secret is None:
            raise ValueError("KAIKU_GENERIC_WEBHOOK_SECRET is not set")
        self.settings = settings
        self._key = secret_key(settings.webhook_secret.get_secret_value())

    def verify(self, request: WebhookRequest) -> None:
        verify_standard(request, self._key, self.settings.tolerance_seconds)

    def items(self, request: WebhookRequest) -> list[dict[str, Any]]:
        items = json_objects(request, "a JSON object or a non-empty array of objects")
        if len(items) == 1 and "id" not in items[0]:
            items[0] = {**items[0], "id": request.headers.get("webhook-id")}
        return items

    def vendor_type(self, item: Mapping[str, Any]) -> str | None:
        value = item.get("type")
        return value if isinstance(value, str) else None

    def event_id(self, item: Mapping[str, Any]) -> str | None:
        value = item.get("id")
        return str(value) if value not in (None, "") else None

    def source(self) -> str:
        return self.settings.source

    def acknowledge(self, accepted: list[str]) -> Response | None:
        return None


def from_env() -> Generic | None:
    settings = GenericSettings()
    return Generic(settings) if settings.webhook_secret is not None else None

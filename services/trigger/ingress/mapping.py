"""From one vendor payload item to kaiku's CloudEvent, by a table of dotted paths.

The vendor module gives the defaults; the program's ``sources.<vendor>`` may override any field.
Contact details that do not validate (a phone number that is not E.164, a malformed email address,
a time zone name that is not IANA) are dropped rather than failing the whole event: the trigger can
still resolve them through the vendor's API.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from email_validator import EmailNotValidError, validate_email
from pydantic import ValidationError

from services.common.events import PHONE_E164, CloudEvent
from services.common.kafka import validation_reason
from services.common.program import SourceConfig
from services.trigger.ingress import Vendor

_MISSING = object()
_PHONE = re.compile(PHONE_E164)


@dataclass(frozen=True)
class Ignored:
    """The item is an event type the program does not map (not an error)."""

    vendor_type: str | None


@dataclass(frozen=True)
class Unmappable:
    """The item cannot become an event; it is dead-lettered with this reason."""

    event_id: str | None
    reason: str


def get_path(item: Any, path: str) -> Any:
    """``a.b.0.c`` into nested dicts and lists; ``=text`` is the constant ``text``."""
    if path.startswith("="):
        return path[1:]
    node = item
    for part in path.split("."):
        if isinstance(node, Mapping):
            node = node.get(part, _MISSING)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        if node is _MISSING:
            return None
    return node


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, Mapping | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip()
    return text or None


def _time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        number = float(value)
        if number > 1e11:  # milliseconds since the epoch (HubSpot, Intercom's created_at is s)
            number /= 1000
        return datetime.fromtimestamp(number, UTC)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def normalize_email(value: Any) -> str | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


def normalize_phone(value: Any) -> str | None:
    text = _text(value)
    if text is None:
        return None
    compact = re.sub(r"[\s().-]", "", text)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    return compact if _PHONE.match(compact) else None


def _bool(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1", "yes"))


def to_event(
    vendor: Vendor, item: Mapping[str, Any], config: SourceConfig | None
) -> CloudEvent | Ignored | Unmappable:
    mapping = {**vendor.DEFAULT_MAPPING, **(config.mapping if config else {})}
    types = {**vendor.DEFAULT_TYPES, **(config.types if config else {})}

    def field(name: str) -> Any:
        path = mapping.get(name)
        return get_path(item, path) if path else None

    raw_type = _text(field("type")) if "type" in mapping else vendor.vendor_type(item)
    if raw_type is not None and raw_type not in types and vendor.PASS_THROUGH_TYPES:
        event_type: str | None = raw_type
    else:
        event_type = types.get(raw_type or "")
    if not event_type:
        return Ignored(raw_type)
    vendor_id = _text(field("id")) if "id" in mapping else vendor.event_id(item)
    if vendor_id is None:
        return Unmappable(None, f"{vendor.name}: the payload has no event id")
    customer_id = _text(field("customer_id"))
    if customer_id is None:
        return Unmappable(
            vendor_id,
            f"{vendor.name}: no customer id at {mapping.get('customer_id', '(unmapped)')!r}",
        )
    try:
        time = _time(field("time"))
    except (ValueError, OverflowError, OSError):
        return Unmappable(vendor_id, f"{vendor.name}: unreadable time {field('time')!r}")
    attributes = {
        key.split(".", 1)[1]: value
        for key in mapping
        if key.startswith("attributes.") and (value := field(key)) is not None
    }
    customer: dict[str, Any] = {
        "id": customer_id,
        "email": normalize_email(field("email")),
        "phone": normalize_phone(field("phone")),
        "locale": _text(field("locale")),
        "timezone": _text(field("timezone")),
        "account_id": _text(field("account_id")),
    }
    raw: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"{vendor.name}-{vendor_id}",
        "source": vendor.source(),
        "type": event_type,
        "time": time,
        "subject": customer_id,
        "data": {
            "customer": customer,
            **{k: _text(field(k)) for k in ("touchpoint", "channel", "team", "agent", "case_id")},
            "do_not_survey": _bool(field("do_not_survey")),
            "attributes": attributes,
        },
    }
    try:
        return CloudEvent.model_validate(raw)
    except ValidationError as exc:
        # A bad locale or time zone is dropped, not fatal; anything else is a mapping problem.
        for err in exc.errors(include_input=False):
            loc = err["loc"]
            if loc[:2] == ("data", "customer") and loc[-1] in ("locale", "timezone"):
                customer[loc[-1]] = None
        try:
            return CloudEvent.model_validate(raw)
        except ValidationError as again:
            return Unmappable(vendor_id, f"{vendor.name}: {validation_reason(again)}")

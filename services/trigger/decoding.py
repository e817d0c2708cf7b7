"""Decoding ``kaiku.events``: CloudEvents in structured mode and in the binary mode of the
CloudEvents Kafka protocol binding, so any Kafka producer can feed kaiku.

Binary mode (CloudEvents Kafka binding 1.0, section 3.2): the attributes travel as ``ce_``-prefixed
headers (``ce_specversion``, ``ce_id``, ``ce_source``, ``ce_type``, ``ce_time``, ``ce_subject``, and
extensions), ``content-type`` carries ``datacontenttype``, and the record value is the data itself.
A record without ``ce_specversion`` is read as structured mode (the whole event as JSON).
"""

from __future__ import annotations

import json
from typing import Any

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from services.common.events import CloudEvent
from services.common.kafka import InvalidMessage, json_decoder, validation_reason

_structured = json_decoder(CloudEvent)


def decode_event(record: ConsumerRecord) -> CloudEvent:
    given: dict[str, bytes | None] = {k.lower(): v for k, v in (record.headers or ())}
    if "ce_specversion" not in given:
        event: CloudEvent = _structured(record)
        return event
    headers: dict[str, bytes] = {}
    for name, value in given.items():
        if value is not None:
            headers[name] = value
        elif name.startswith("ce_") or name == "content-type":  # Kafka allows null values
            raise InvalidMessage(f"binary mode: the {name} header has no value")
    try:
        attributes: dict[str, Any] = {
            name[3:]: value.decode("utf-8")
            for name, value in headers.items()
            if name.startswith("ce_")
        }
    except UnicodeDecodeError:
        raise InvalidMessage("binary mode: a ce_ header is not UTF-8") from None
    content_type = headers.get("content-type", b"application/json").decode("latin-1")
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise InvalidMessage(f"binary mode: data of content-type {media!r} is not JSON")
    if record.value is None:
        raise InvalidMessage("binary mode: the record has no data")
    try:
        data = json.loads(record.value)
    except (ValueError, RecursionError) as exc:  # not UTF-8 or JSON, too long a number, too deep
        raise InvalidMessage(f"malformed JSON: {exc}") from None
    try:
        return CloudEvent.model_validate({**attributes, "data": data})
    except ValidationError as exc:
        raise InvalidMessage(f"schema violation: {validation_reason(exc)}") from None

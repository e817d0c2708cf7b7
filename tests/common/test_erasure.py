"""The salted hash opt-outs keep after an erasure, and the erasure event on ``kaiku.optouts``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from pydantic import SecretStr

from services.common.config import ErasureSettings
from services.common.erasure import DEV_ERASURE_SALT, contact_hash, customer_hash, is_hash
from services.common.events import OPTOUT_MESSAGE, CustomerErased, OptOutRecorded

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_the_hash_is_keyed_normalized_and_per_channel() -> None:
    h = contact_hash("salt", "email", "Aino@Example.FI ")
    assert h == contact_hash(SecretStr("salt"), "email", "aino@example.fi")
    assert h.startswith("h:") and len(h) == 2 + 64 and is_hash(h)
    assert h != contact_hash("another salt", "email", "aino@example.fi")
    assert h != contact_hash("salt", "sms", "aino@example.fi")
    assert contact_hash("salt", "sms", "+358 40 123-4567") == contact_hash(
        "salt", "sms", "00358401234567"
    )
    assert customer_hash("salt", "cust-1") == contact_hash("salt", "customer", "cust-1")
    assert customer_hash("salt", "cust-1") != customer_hash("salt", "Cust-1")  # ids are exact
    assert not is_hash("aino@example.fi") and not is_hash(None)


def test_the_salt_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ErasureSettings().erasure_salt.get_secret_value() == DEV_ERASURE_SALT
    monkeypatch.setenv("KAIKU_ERASURE_SALT", "production-salt")
    settings = ErasureSettings()
    assert settings.erasure_salt.get_secret_value() == "production-salt"
    assert "production-salt" not in repr(settings)


def test_the_optouts_topic_carries_opt_outs_and_erasures_as_the_schema_says() -> None:
    schema = json.loads((SCHEMAS / "topic.optouts.schema.json").read_text())
    now = datetime(2026, 11, 20, tzinfo=UTC)
    erased = CustomerErased(erasure_id=uuid.uuid4(), customer_id="c1", requested_at=now)
    optout = OptOutRecorded(
        optout_id=uuid.uuid4(),
        customer_id="c1",
        channel="email",
        source="unsubscribe_page",
        occurred_at=now,
    )
    for message in (erased, optout):
        wire = message.model_dump_json(exclude_none=True)
        jsonschema.validate(json.loads(wire), schema)
        assert OPTOUT_MESSAGE.validate_json(wire) == message

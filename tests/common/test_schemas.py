"""schemas/ is the public definition of every message: it must equal what the models say, accept
what the code publishes, and refuse what the code refuses."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from services.common.events import CloudEvent, Customer, InvitationRequested
from services.common.schemas import check

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def schema(name: str) -> dict[str, object]:
    return json.loads((SCHEMAS / name).read_text())  # type: ignore[no-any-return]


def test_schemas_directory_matches_the_models() -> None:
    assert check(SCHEMAS) == [], "schemas/ drifted from the models: run `make schemas`"


EVENT = {
    "specversion": "1.0",
    "id": "zd-98213-solved",
    "source": "zendesk://acme",
    "type": "ticket.solved",
    "time": "2026-11-20T14:03:00Z",
    "subject": "cust-4411",
    "data": {
        "customer": {
            "id": "cust-4411",
            "email": "aino@example.fi",
            "phone": "+358401234567",
            "locale": "fi",
            "timezone": "Europe/Helsinki",
            "account_id": "acct-77",
        },
        "touchpoint": "support",
        "channel": "email",
        "team": "billing",
        "agent": "agent-12",
        "case_id": "98213",
        "attributes": {"priority": "high"},
    },
}


def test_the_spec_example_event_is_valid_for_code_and_schema() -> None:
    CloudEvent.model_validate(EVENT)
    jsonschema.validate(EVENT, schema("topic.events.schema.json"))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("specversion"),
        lambda e: e.update(specversion="0.3"),
        lambda e: e["data"].pop("customer"),
        lambda e: e["data"]["customer"].update(phone="0401234567"),
        lambda e: e["data"].update(unknown_field=1),
    ],
)
def test_code_and_schema_refuse_the_same_invalid_events(mutate: object) -> None:
    event = json.loads(json.dumps(EVENT))
    mutate(event)  # type: ignore[operator]
    with pytest.raises(ValidationError):
        CloudEvent.model_validate(event)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(event, schema("topic.events.schema.json"))


def test_a_published_invitation_validates_against_its_topic_schema() -> None:
    now = datetime(2026, 11, 20, 14, 3, tzinfo=UTC)
    invitation = InvitationRequested(
        invitation_id=uuid.uuid4(),
        token="a" * 29,
        survey_id="support-csat",
        trigger_id="ticket-solved-csat",
        metric="csat",
        event_id="e1",
        event_source="s",
        event_type="ticket.solved",
        customer=Customer(id="c1", email="a@example.com"),
        channel="email",
        locale="fi",
        send_at=now,
        expires_at=now + timedelta(days=7),
        requested_at=now,
    )
    wire = json.loads(invitation.model_dump_json(exclude_none=True))
    jsonschema.validate(wire, schema("topic.invitations.schema.json"))

"""Which event becomes which invitation (pure: no broker, no database)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

from services.common.events import CloudEvent
from services.common.program import Program, Trigger
from services.trigger import rules
from tests.common.test_schemas import EVENT

NOW = datetime(2026, 11, 20, 15, 0, tzinfo=UTC)


def event(**data: object) -> CloudEvent:
    raw = copy.deepcopy(EVENT)
    raw["data"].update(data)  # type: ignore[attr-defined]
    return CloudEvent.model_validate(raw)


def issue() -> str:
    return "t" * 29


def test_matching_trigger_invites_in_the_customers_language(program: Program) -> None:
    [outcome] = rules.evaluate(program, event(), NOW, issue)
    assert (outcome.decision, outcome.reason) == ("invited", "trigger_matched")
    inv = outcome.invitation
    assert inv is not None
    assert (inv.survey_id, inv.metric, inv.channel, inv.locale) == (
        "support-csat",
        "csat",
        "email",
        "fi",
    )
    assert inv.context.team == "billing"
    assert inv.context.account_id == "acct-77"
    assert inv.send_at == NOW  # the event is older than now and the delay is 0
    assert inv.expires_at == NOW + timedelta(days=7)


def test_invitation_id_is_stable_for_the_same_event_and_trigger(program: Program) -> None:
    a = rules.evaluate(program, event(), NOW, issue)[0].invitation
    b = rules.evaluate(program, event(), NOW + timedelta(hours=1), issue)[0].invitation
    assert a is not None and b is not None
    assert a.invitation_id == b.invitation_id


def test_delay_counts_from_the_event_time(program: Program) -> None:
    delayed = program.model_copy(
        update={
            "triggers": [
                Trigger(
                    id="late",
                    event="ticket.solved",
                    survey="support-csat",
                    delay=timedelta(hours=2),
                )
            ]
        }
    )
    inv = rules.evaluate(delayed, event(), NOW, issue)[0].invitation
    assert inv is not None
    assert inv.send_at == datetime(2026, 11, 20, 16, 3, tzinfo=UTC)


def test_skips_are_explained(program: Program) -> None:
    [dns] = rules.evaluate(program, event(do_not_survey=True), NOW, issue)
    assert (dns.decision, dns.reason, dns.invitation) == ("skipped", "do_not_survey", None)
    no_email = event(customer={"id": "c-9", "phone": "+358401234567"})
    [skip] = rules.evaluate(program, no_email, NOW, issue)
    assert (skip.decision, skip.reason) == ("skipped", "no_contact_point")
    other = CloudEvent.model_validate({**EVENT, "type": "customer.churned"})
    [ignored] = rules.evaluate(program, other, NOW, issue)
    assert (ignored.decision, ignored.reason) == ("ignored", "no_trigger")


def test_unsupported_locale_falls_back_to_the_program_default(program: Program) -> None:
    e = event(customer={"id": "c-1", "email": "x@example.com", "locale": "de-AT"})
    inv = rules.evaluate(program, e, NOW, issue)[0].invitation
    assert inv is not None
    assert inv.locale == "en"
    sv = event(customer={"id": "c-1", "email": "x@example.com", "locale": "sv-FI"})
    assert rules.evaluate(program, sv, NOW, issue)[0].invitation.locale == "sv"  # type: ignore[union-attr]

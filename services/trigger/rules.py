"""Which event becomes which invitation. Pure: a function of the program, the event and ``now``."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from services.common.events import CloudEvent, InvitationRequested, SurveyChannel, SurveyContext
from services.common.program import SUPPORTED_LOCALES, Program, Survey, Trigger

INVITATION_NAMESPACE = uuid.UUID("6f4a3c1e-8b2d-5e7f-9a1b-0c2d3e4f5a6b")

DecisionKind = Literal["invited", "skipped", "ignored"]


@dataclass(frozen=True)
class Outcome:
    decision: DecisionKind
    reason: str
    trigger: Trigger | None = None
    survey: Survey | None = None
    invitation: InvitationRequested | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def invitation_id(event: CloudEvent, trigger: Trigger) -> uuid.UUID:
    """Deterministic: the same event and trigger always name the same invitation."""
    return uuid.uuid5(INVITATION_NAMESPACE, f"{event.source}\x1f{event.id}\x1f{trigger.id}")


def pick_locale(event: CloudEvent, program: Program) -> str:
    requested = (event.data.customer.locale or "").replace("_", "-").split("-")[0].lower()
    return requested if requested in SUPPORTED_LOCALES else program.defaults.locale


def pick_channel(event: CloudEvent, survey: Survey) -> SurveyChannel | None:
    customer = event.data.customer
    for channel in survey.channels:
        if channel == "email" and customer.email:
            return channel
        if channel == "sms" and customer.phone:
            return channel
    return None


def evaluate(
    program: Program, event: CloudEvent, now: datetime, issue_token: Callable[[], str]
) -> list[Outcome]:
    """Every trigger of the event's type gives one outcome; no trigger gives one 'ignored'."""
    triggers = program.triggers_for(event.type)
    if not triggers:
        return [Outcome("ignored", "no_trigger", detail={"event_type": event.type})]
    if event.data.do_not_survey:
        return [Outcome("skipped", "do_not_survey", t, program.survey(t.survey)) for t in triggers]
    outcomes = []
    for trigger in triggers:
        survey = program.survey(trigger.survey)
        channel = pick_channel(event, survey)
        if channel is None:
            outcomes.append(
                Outcome(
                    "skipped",
                    "no_contact_point",
                    trigger,
                    survey,
                    detail={"channels": list(survey.channels)},
                )
            )
            continue
        base = event.time if event.time is not None and event.time <= now else now
        send_at = max(now, base + trigger.delay)
        data = event.data
        invitation = InvitationRequested(
            invitation_id=invitation_id(event, trigger),
            token=issue_token(),
            survey_id=survey.id,
            trigger_id=trigger.id,
            metric=survey.metric,
            event_id=event.id,
            event_source=event.source,
            event_type=event.type,
            event_time=event.time,
            customer=data.customer,
            channel=channel,
            locale=pick_locale(event, program),
            send_at=send_at,
            expires_at=send_at + survey.link_expiry,
            requested_at=now,
            context=SurveyContext(
                touchpoint=data.touchpoint,
                channel=data.channel,
                team=data.team,
                agent=data.agent,
                case_id=data.case_id,
                account_id=data.customer.account_id,
            ),
        )
        outcomes.append(
            Outcome(
                "invited",
                "trigger_matched",
                trigger,
                survey,
                invitation,
                detail={"channel": channel, "send_at": send_at.isoformat()},
            )
        )
    return outcomes

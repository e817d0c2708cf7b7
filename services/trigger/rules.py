"""Which event becomes which invitation. Pure: a function of the program, the event and ``now``."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from services.common.events import CloudEvent, InvitationRequested, SurveyChannel, SurveyContext
from services.common.program import (
    SUPPORTED_LOCALES,
    AllOf,
    AnyOf,
    Program,
    Survey,
    Trigger,
    When,
)

INVITATION_NAMESPACE = uuid.UUID("6f4a3c1e-8b2d-5e7f-9a1b-0c2d3e4f5a6b")

DecisionKind = Literal["invited", "deferred", "skipped", "ignored", "cancelled"]


@dataclass(frozen=True)
class Outcome:
    decision: DecisionKind
    reason: str
    trigger: Trigger | None = None
    survey: Survey | None = None
    invitation: InvitationRequested | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    next_eligible_at: datetime | None = None

    def skipped(
        self, reason: str, detail: dict[str, Any], next_eligible_at: datetime | None = None
    ) -> Outcome:
        """This outcome turned into a skip: no invitation, and why."""
        return replace(
            self,
            decision="skipped",
            reason=reason,
            invitation=None,
            detail=detail,
            next_eligible_at=next_eligible_at,
        )


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


_MISSING = object()


def field_value(event: Mapping[str, Any], path: str) -> Any:
    node: Any = event
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _compare(op: str, value: Any, operand: Any) -> bool:
    # Numbers compare as numbers, everything else as text (ISO times order correctly as text).
    if isinstance(operand, bool) or isinstance(value, bool):
        return False
    if isinstance(operand, int | float):
        try:
            left: Any = float(value)
        except (TypeError, ValueError):
            return False
        right: Any = float(operand)
    else:
        left, right = str(value), str(operand)
    return bool(
        {"gt": left > right, "gte": left >= right, "lt": left < right, "lte": left <= right}[op]
    )


def _equal(value: Any, operand: Any) -> bool:
    if isinstance(operand, bool) or isinstance(value, bool):
        return value is operand
    if isinstance(operand, int | float) and not isinstance(value, str):
        return bool(value == operand)
    return str(value) == str(operand)


def holds(condition: When | list[When], event: Mapping[str, Any]) -> bool:
    """Whether the event (as a JSON-like dict) satisfies the condition tree."""
    if isinstance(condition, list):
        return all(holds(c, event) for c in condition)
    if isinstance(condition, AllOf):
        return all(holds(c, event) for c in condition.all)
    if isinstance(condition, AnyOf):
        return any(holds(c, event) for c in condition.any)
    value = field_value(event, condition.field)
    present = value is not _MISSING and value is not None
    op, operand = condition.operator, condition.operand
    if op == "exists":
        return present is operand
    if not present:
        return op in ("ne", "not_in")
    if op == "eq":
        return _equal(value, operand)
    if op == "ne":
        return not _equal(value, operand)
    if op == "in":
        return any(_equal(value, o) for o in operand)
    if op == "not_in":
        return not any(_equal(value, o) for o in operand)
    if op == "matches":
        return isinstance(value, str) and re.search(operand, value) is not None
    return _compare(op, value, operand)


def sampled_in(trigger: Trigger, customer_id: str) -> bool:
    """Stable: a customer's place in [0, 1) depends only on the trigger and the customer."""
    if trigger.sample >= 1:
        return True
    digest = hashlib.sha256(f"{trigger.id}\x1f{customer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < trigger.sample


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
    doc: dict[str, Any] | None = None
    for trigger in triggers:
        survey = program.survey(trigger.survey)
        if trigger.when is not None:
            doc = doc if doc is not None else event.model_dump(mode="json")
            if not holds(trigger.when, doc):
                outcomes.append(Outcome("skipped", "conditions_not_met", trigger, survey))
                continue
        if not sampled_in(trigger, event.customer_id):
            outcomes.append(
                Outcome(
                    "skipped", "not_sampled", trigger, survey, detail={"sample": trigger.sample}
                )
            )
            continue
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

"""The trigger worker: events in, invitations out, every decision in the ledger."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession

from services.common import events
from services.common.events import CloudEvent, utcnow
from services.common.kafka import HandlerResult, Incoming, Outgoing
from services.common.program import Program
from services.common.tokens import LinkKeys
from services.trigger import repository, rules

log = logging.getLogger(__name__)

DECISIONS = Counter("kaiku_trigger_decisions_total", "Trigger decisions", ["decision", "reason"])


def _stored(message: Outgoing) -> dict[str, Any]:
    return {"topic": message.topic, "key": message.key, "value": message.encode().decode()}


def _restored(item: dict[str, Any]) -> Outgoing:
    return Outgoing(item["topic"], item["key"], item["value"].encode())


@dataclass
class EventHandler:
    program: Program
    links: LinkKeys
    clock: Callable[[], datetime] = utcnow

    async def __call__(
        self, batch: list[Incoming[CloudEvent]], session: AsyncSession
    ) -> HandlerResult:
        now = self.clock()
        # The first copy of an event in a batch counts; later copies are duplicates.
        unique: dict[repository.EventKey, CloudEvent] = {}
        for item in batch:
            unique.setdefault((item.message.source, item.message.id), item.message)
        seen = await repository.processed(session, list(unique))
        publish: list[Outgoing] = []
        for key in seen:
            log.info(
                "event %s from %s was processed before: publishing its result again", key[1], key[0]
            )
            publish.extend(_restored(i) for i in seen[key])

        fresh = {k: e for k, e in unique.items() if k not in seen}
        markers: list[dict[str, Any]] = []
        decisions: list[dict[str, Any]] = []
        outputs: dict[repository.EventKey, list[Outgoing]] = {}
        for key, event in fresh.items():
            out: list[Outgoing] = []
            for outcome in rules.evaluate(self.program, event, now, self.links.issue):
                if outcome.invitation is not None:
                    out.append(Outgoing(events.INVITATIONS, event.customer_id, outcome.invitation))
                decisions.append(_decision_row(event, outcome, now))
            outputs[key] = out
            markers.append(
                {
                    "source": event.source,
                    "event_id": event.id,
                    "customer_id": event.customer_id,
                    "event_type": event.type,
                    "processed_at": now,
                    "published": [_stored(m) for m in out],
                }
            )
        won = await repository.mark_processed(session, markers)
        lost = [k for k in fresh if k not in won]
        if lost:  # another consumer handled these concurrently: publish what it stored
            again = await repository.processed(session, lost)
            for key in lost:
                publish.extend(_restored(i) for i in again.get(key, []))
        await repository.record_decisions(
            session, [d for d in decisions if (d["event_source"], d["event_id"]) in won]
        )
        for key in won:
            publish.extend(outputs[key])
        for d in decisions:
            if (d["event_source"], d["event_id"]) in won:
                DECISIONS.labels(decision=d["decision"], reason=d["reason"]).inc()
        return HandlerResult(publish=publish)


def _decision_row(event: CloudEvent, outcome: rules.Outcome, now: datetime) -> dict[str, Any]:
    return {
        "customer_id": event.customer_id,
        "account_id": event.data.customer.account_id,
        "event_source": event.source,
        "event_id": event.id,
        "event_type": event.type,
        "trigger_id": outcome.trigger.id if outcome.trigger else None,
        "survey_id": outcome.survey.id if outcome.survey else None,
        "decision": outcome.decision,
        "reason": outcome.reason,
        "detail": outcome.detail,
        "invitation_id": outcome.invitation.invitation_id if outcome.invitation else None,
        "next_eligible_at": None,
        "decided_at": now,
    }

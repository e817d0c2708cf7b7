"""The trigger worker: events in, invitations (and cancellations) out, every decision in the
ledger.

Per batch: claim the events (dedupe on source + id; an event seen before publishes again what it
published the first time), evaluate the rules (pure), let the highest priority win per customer,
then apply what needs state — ``cancel_on`` and coalescing — against the trigger's invitations
table, all in one transaction with a handful of statements for the whole batch.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession

from services.common import events
from services.common.erasure import DEV_ERASURE_SALT, contact_hash, customer_hash
from services.common.events import (
    CloudEvent,
    InvitationCancelled,
    InvitationRequested,
    utcnow,
)
from services.common.kafka import HandlerResult, Incoming, Outgoing
from services.common.program import Program, Trigger
from services.common.tokens import LinkKeys
from services.trigger import fatigue, repository, rules
from services.trigger.repository import EventKey

log = logging.getLogger(__name__)

# Surveys that qualify for one customer closer together than this compete on priority.
PRIORITY_WINDOW = timedelta(hours=1)

DECISIONS = Counter("kaiku_trigger_decisions_total", "Trigger decisions", ["decision", "reason"])


def _stored(message: Outgoing) -> dict[str, Any]:
    return {"topic": message.topic, "key": message.key, "value": message.encode().decode()}


def _restored(item: dict[str, Any]) -> Outgoing:
    return Outgoing(item["topic"], item["key"], item["value"].encode())


@dataclass(slots=True)
class _Pending:
    """An invitation as the batch sees it: from the table, or issued earlier in this batch.
    Fatigue reads it as it is (a ``fatigue.Touched``)."""

    invitation_id: Any
    customer_id: str
    trigger_id: str
    survey_id: str
    case_id: str | None
    send_at: datetime
    created_at: datetime
    cancelled: bool = False
    account_id: str | None = None
    contact: str | None = None
    channel: str = "email"
    delivered_at: datetime | None = None
    responded_at: datetime | None = None
    failed: bool = False  # the send failed or bounced (kaiku.deliveries): it does not count

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def invited_at(self) -> datetime:
        return self.send_at

    @property
    def status(self) -> str:
        return "cancelled" if self.cancelled else "failed" if self.failed else "pending"


@dataclass
class _Batch:
    """What one batch's decisions read and reserve, loaded once per batch."""

    session: AsyncSession
    history: _History
    states: dict[str, fatigue.CustomerState]
    zones: dict[str, str]  # customers' last known time zones
    quota_used: dict[tuple[str, datetime], int] = field(default_factory=dict)


class _History:
    """The batch's view of past and reserved invitations, indexed by every fatigue key."""

    def __init__(self) -> None:
        self.by_customer: dict[str, list[_Pending]] = defaultdict(list)
        self.by_account: dict[str, list[_Pending]] = defaultdict(list)
        self.by_contact: dict[str, list[_Pending]] = defaultdict(list)

    def add(self, p: _Pending) -> None:
        self.by_customer[p.customer_id].append(p)
        if p.account_id:
            self.by_account[p.account_id].append(p)
        if p.contact:
            self.by_contact[p.contact].append(p)

    def touches(self, customer: str, account: str | None, contact: str | None) -> list[_Pending]:
        found = {id(p): p for p in self.by_customer.get(customer, ())}
        found.update({id(p): p for p in self.by_account.get(account or "", ())})
        found.update({id(p): p for p in self.by_contact.get(contact or "", ())})
        return list(found.values())


def _contact(inv: InvitationRequested) -> str | None:
    customer = inv.customer
    value = customer.email if inv.channel == "email" else customer.phone
    return value.lower() if value else None


@dataclass
class EventHandler:
    program: Program
    links: LinkKeys
    clock: Callable[[], datetime] = utcnow
    # Why a contact look-up gave nothing, per event (set by the Enricher before each batch).
    lookup_notes: Callable[[], dict[EventKey, str]] = dict
    # KAIKU_ERASURE_SALT: erased customers' opt-outs are kept as salted hashes.
    salt: SecretStr = field(default_factory=lambda: SecretStr(DEV_ERASURE_SALT))

    async def __call__(
        self, batch: list[Incoming[CloudEvent]], session: AsyncSession
    ) -> HandlerResult:
        now = self.clock()
        unique: dict[EventKey, CloudEvent] = {}
        for item in batch:  # the first copy of an event in a batch counts
            unique.setdefault((item.message.source, item.message.id), item.message)
        publish: list[Outgoing] = []
        # Claim first: an event whose marker was already there (handled before, or by another
        # consumer at this moment) publishes again what was stored for it.
        won = await repository.mark_processed(
            session,
            [
                {
                    "source": e.source,
                    "event_id": e.id,
                    "customer_id": e.customer_id,
                    "event_type": e.type,
                    "processed_at": now,
                    "published": [],
                }
                for e in unique.values()
            ],
        )
        seen = [k for k in unique if k not in won]
        if seen:
            stored = await repository.processed(session, seen)
            for key in seen:
                log.info(
                    "event %s from %s was processed before: publishing its result again",
                    key[1],
                    key[0],
                )
                publish.extend(_restored(i) for i in stored.get(key, []))
        mine = [e for k, e in unique.items() if k in won]
        if not mine:
            return HandlerResult(publish=publish)

        await self._remember(session, mine, now)
        outputs, decisions, new, cancelled = await self._decide(session, mine, now)
        await repository.add_invitations(session, new)
        await repository.mark_cancelled(session, cancelled, now)
        await repository.record_decisions(session, decisions)
        await repository.set_published(
            session,
            [
                {
                    "source": e.source,
                    "event_id": e.id,
                    "published": [_stored(m) for m in outputs[(e.source, e.id)]],
                }
                for e in mine
            ],
        )
        for e in mine:
            publish.extend(outputs[(e.source, e.id)])
        for d in decisions:
            DECISIONS.labels(decision=d["decision"], reason=d["reason"]).inc()
        return HandlerResult(publish=publish)

    async def _remember(
        self, session: AsyncSession, batch: list[CloudEvent], now: datetime
    ) -> None:
        """Customers' last known time zones and their open cases, from this batch's events."""
        zones = {e.customer_id: e.data.customer.timezone for e in batch if e.data.customer.timezone}
        await repository.remember_customers(
            session,
            [{"customer_id": c, "timezone": z, "updated_at": now} for c, z in zones.items()],
        )
        tracking = self.program.suppression.open_case
        if tracking is None:
            return
        cases: dict[tuple[str, str], bool] = {}
        for e in batch:
            if e.data.case_id and e.type in tracking.opens:
                cases[(e.customer_id, e.data.case_id)] = True
            elif e.data.case_id and e.type in tracking.closes:
                cases[(e.customer_id, e.data.case_id)] = False
        await repository.update_cases(
            session,
            [
                {"customer_id": c, "case_id": k, "open": o, "updated_at": now}
                for (c, k), o in cases.items()
            ],
        )

    async def _decide(
        self, session: AsyncSession, batch: list[CloudEvent], now: datetime
    ) -> tuple[
        dict[EventKey, list[Outgoing]], list[dict[str, Any]], list[dict[str, Any]], list[Any]
    ]:
        notes = self.lookup_notes()
        outcomes = {
            (e.source, e.id): [
                replace(o, reason="contact_unresolved", detail={**o.detail, "lookup": note})
                if o.reason == "no_contact_point" and (note := notes.get((e.source, e.id)))
                else o
                for o in rules.evaluate(self.program, e, now, self.links.issue)
            ]
            for e in batch
        }
        self._prefer_priority(batch, outcomes)

        invited = [o.invitation for os in outcomes.values() for o in os if o.invitation]
        # Reservations are exact across workers: lock every key a limit may count on.
        await repository.lock_keys(
            session,
            [
                *(f"customer:{i.customer.id}" for i in invited),
                *(f"account:{i.customer.account_id}" for i in invited if i.customer.account_id),
                *(f"contact:{c}" for i in invited if (c := _contact(i))),
                *(
                    f"quota:{q.survey}"
                    for q in self.program.quotas
                    if any(i.survey_id == q.survey for i in invited)
                ),
            ],
        )
        history = _History()
        for row in await repository.recent_invitations(
            session,
            customers=sorted({e.customer_id for e in batch}),
            accounts=sorted({a for i in invited if (a := i.customer.account_id)}),
            contacts=sorted({c for i in invited if (c := _contact(i))}),
            since=self._history_since(batch, now),
            now=now,
        ):
            history.add(
                _Pending(
                    row.invitation_id,
                    row.customer_id,
                    row.trigger_id,
                    row.survey_id,
                    row.case_id,
                    row.send_at,
                    row.created_at,
                    False,
                    row.account_id,
                    row.contact,
                    row.channel,
                    row.delivered_at,
                    row.responded_at,
                    row.failed_at is not None,
                )
            )

        states, zones = await self._customer_states(session, batch, invited)
        context = _Batch(session, history, states, zones)
        outputs: dict[EventKey, list[Outgoing]] = {}
        decisions: list[dict[str, Any]] = []
        new: list[dict[str, Any]] = []
        cancelled: list[Any] = []

        def cancel(p: _Pending, event: CloudEvent, reason: str, out: list[Outgoing]) -> None:
            p.cancel()
            cancelled.append(p.invitation_id)
            out.append(
                Outgoing(
                    events.INVITATIONS,
                    p.customer_id,
                    InvitationCancelled(
                        invitation_id=p.invitation_id,
                        customer_id=p.customer_id,
                        survey_id=p.survey_id,
                        reason=reason,
                        event_id=event.id,
                        cancelled_at=now,
                    ),
                )
            )
            decisions.append(
                _row(
                    event,
                    rules.Outcome(
                        "cancelled",
                        reason,
                        detail={
                            "invitation_id": str(p.invitation_id),
                            "trigger_id": p.trigger_id,
                            "survey_id": p.survey_id,
                            "case_id": p.case_id,
                        },
                    ),
                    now,
                )
            )

        for event in batch:
            out: list[Outgoing] = []
            mine = history.by_customer[event.customer_id]
            # cancel_on: a reopened ticket cancels the pending invitation about the same case.
            for cancelling in self.program.cancelled_by(event.type):
                for p in mine:
                    if (
                        p.trigger_id == cancelling.id
                        and not p.cancelled
                        and p.send_at > now
                        and (event.data.case_id is None or p.case_id == event.data.case_id)
                    ):
                        cancel(p, event, f"cancel_on:{event.type}", out)
            for outcome in outcomes[(event.source, event.id)]:
                trigger = outcome.trigger
                if outcome.invitation is not None and trigger is not None and trigger.coalesce:
                    outcome = self._coalesce(
                        outcome,
                        trigger,
                        event,
                        mine,
                        now,
                        functools.partial(cancel, event=event, reason="coalesced", out=out),
                    )
                if outcome.invitation is not None and outcome.survey is not None:
                    outcome = await self._fatigue(outcome, event, context, now)
                if outcome.invitation is not None and trigger is not None:
                    inv = outcome.invitation
                    out.append(Outgoing(events.INVITATIONS, event.customer_id, inv))
                    created = event.time if event.time and event.time <= now else now
                    pending = _Pending(
                        inv.invitation_id,
                        event.customer_id,
                        trigger.id,
                        inv.survey_id,
                        event.data.case_id,
                        inv.send_at,
                        created,
                        False,
                        inv.customer.account_id,
                        _contact(inv),
                        inv.channel,
                    )
                    history.add(pending)
                    new.append(
                        {
                            "invitation_id": inv.invitation_id,
                            "customer_id": event.customer_id,
                            "trigger_id": trigger.id,
                            "survey_id": inv.survey_id,
                            "case_id": event.data.case_id,
                            "event_id": event.id,
                            "send_at": inv.send_at,
                            "created_at": created,
                            "cancelled_at": None,
                            "account_id": pending.account_id,
                            "contact": pending.contact,
                            "channel": pending.channel,
                            "delivered_at": None,
                            "responded_at": None,
                        }
                    )
                decisions.append(_row(event, outcome, now))
            outputs[(event.source, event.id)] = out
        return outputs, decisions, new, cancelled

    @staticmethod
    def _coalesce(
        outcome: rules.Outcome,
        trigger: Trigger,
        event: CloudEvent,
        mine: list[_Pending],
        now: datetime,
        cancel: Callable[[_Pending], None],
    ) -> rules.Outcome:
        """One invitation per coalescing window: a pending one is replaced by the newer case;
        once one has gone out, later events in the window are skipped."""
        assert trigger.coalesce is not None
        at = event.time or now
        earlier = [
            p
            for p in mine
            if p.trigger_id == trigger.id
            and not p.cancelled
            and p.created_at >= at - trigger.coalesce
        ]
        if any(p.send_at <= now for p in earlier):
            last = max(p.created_at for p in earlier if p.send_at <= now)
            return outcome.skipped(
                "coalesced", {"window": str(trigger.coalesce)}, last + trigger.coalesce
            )
        for p in earlier:
            cancel(p)
        return outcome

    def _history_since(self, batch: list[CloudEvent], now: datetime) -> dict[str, datetime]:
        """How far back each fatigue key's history must reach: the longest window of the rules
        counting on it, and for a rule counting deliveries or answers also the longest link
        expiry (a survey is delivered and answered before its link expires, so one sent that
        much before the window may still be counted in it); for the customers also the
        coalescing windows back from the batch's earliest event. A key no rule counts is not
        read (the customers' pending invitations are, for ``cancel_on``)."""
        expiry = max((s.link_expiry for s in self.program.surveys), default=timedelta(0))
        since: dict[str, datetime] = {}
        for rule in self.program.fatigue.rules:
            reach = rule.window + (expiry if rule.clock != "invited" else timedelta(0))
            since[rule.key] = min(since.get(rule.key, now), now - reach)
        coalesce = max(
            (t.coalesce for t in self.program.triggers if t.coalesce), default=timedelta(0)
        )
        earliest = min((e.time or now) for e in batch)
        since["customer"] = min(since.get("customer", now), earliest - coalesce)
        return since

    async def _customer_states(
        self, session: AsyncSession, batch: list[CloudEvent], invited: list[InvitationRequested]
    ) -> tuple[dict[str, fatigue.CustomerState], dict[str, str]]:
        """Suppression state and last known time zones of the batch's customers."""
        ids = sorted({e.customer_id for e in batch})
        known = await repository.customers(session, ids)
        cases = await repository.open_cases(session, ids)
        opted: dict[str, set[tuple[str | None, str]]] = defaultdict(set)
        contacts = {c: i.customer.id for i in invited if (c := _contact(i))}
        # An erased customer's opt-outs hold salted hashes: match those too, as plain values.
        hashed = {contact_hash(self.salt, i.channel, c): c for i in invited if (c := _contact(i))}
        erased = {customer_hash(self.salt, c): c for c in ids}
        plain = {**hashed, **erased}
        for o in await repository.optouts(session, [*ids, *erased], sorted({*contacts, *hashed})):
            contact = plain.get(o.contact, o.contact) if o.contact else None
            customer = plain.get(o.customer_id, o.customer_id)
            whom = contacts.get(contact or "", customer)
            opted[whom].add((contact, o.channel))
            if contact is None or customer == whom:
                opted[customer].add((contact, o.channel))
        states = {
            c: fatigue.CustomerState(
                opted_out=frozenset(opted.get(c, ())),
                open_cases=frozenset(cases.get(c, ())),
                last_unhappy_at=known[c].last_unhappy_at if c in known else None,
            )
            for c in ids
        }
        return states, {c: k.timezone for c, k in known.items() if k.timezone}

    async def _quota_full(self, batch: _Batch, survey_id: str, at: datetime) -> str | None:
        """The quota this send would exceed (and reserve a place in the others), or None."""
        zone = self.program.defaults.timezone
        quotas = [q for q in self.program.quotas if q.survey == survey_id]
        periods = []
        for quota in quotas:
            start, end = fatigue.quota_period(at, quota.per, zone)
            key = (f"{survey_id}:{quota.per}", start)
            if key not in batch.quota_used:
                batch.quota_used[key] = await repository.quota_used(
                    batch.session, survey_id, start, end
                )
            if batch.quota_used[key] >= quota.limit:
                return f"quota:{survey_id}:{quota.per}"
            periods.append(key)
        for key in periods:
            batch.quota_used[key] += 1
        return None

    async def _fatigue(
        self, outcome: rules.Outcome, event: CloudEvent, batch: _Batch, now: datetime
    ) -> rules.Outcome:
        """Suppression, fatigue limits, quiet hours and quotas: allow, drop, or move the send."""
        inv, survey = outcome.invitation, outcome.survey
        assert inv is not None and survey is not None
        contact = _contact(inv)
        touches = batch.history.touches(inv.customer.id, inv.customer.account_id, contact)
        zone = (
            inv.customer.timezone
            or batch.zones.get(inv.customer.id)
            or self.program.defaults.timezone
        )
        if zone is not None and inv.timezone != zone:
            inv = inv.model_copy(update={"timezone": zone})  # the dispatcher checks it again
            outcome = replace(outcome, invitation=inv)
        candidate = fatigue.Candidate(
            customer_id=inv.customer.id,
            account_id=inv.customer.account_id,
            contact=contact,
            channel=inv.channel,
            survey_id=inv.survey_id,
            trigger_id=inv.trigger_id,
            send_at=inv.send_at,
        )
        blocked = fatigue.suppressed(
            self.program.suppression,
            candidate,
            batch.states.get(inv.customer.id, fatigue.CustomerState()),
            case_id=event.data.case_id,
            email=inv.customer.email,
            now=now,
            ignore_fatigue=survey.ignore_fatigue,
        )
        if blocked is not None:
            return outcome.skipped(
                f"suppressed:{blocked.reason}", blocked.detail, blocked.next_eligible_at
            )
        verdict = fatigue.schedule(
            self.program.fatigue, candidate, touches, zone, ignore=survey.ignore_fatigue
        )
        if verdict.action == "drop":
            return outcome.skipped(
                f"fatigue:{verdict.rule}",
                {**verdict.seen, "channel": inv.channel},
                verdict.next_eligible_at,
            )
        assert verdict.send_at is not None
        at = verdict.send_at
        full = await self._quota_full(batch, inv.survey_id, at)
        if full is not None:
            return outcome.skipped(full, {"send_at": at.isoformat()})
        if at == inv.send_at:
            return outcome
        moved = inv.model_copy(update={"send_at": at, "expires_at": at + survey.link_expiry})
        detail = {
            **outcome.detail,
            "send_at": at.isoformat(),
            "timezone": zone or "unknown",
            "requested_send_at": inv.send_at.isoformat(),
        }
        if verdict.action == "defer":
            return replace(
                outcome,
                decision="deferred",
                reason=f"fatigue:{verdict.rule}",
                invitation=moved,
                next_eligible_at=at,
                detail={**detail, **verdict.seen},
            )
        return replace(
            outcome, reason="quiet_hours", invitation=moved, next_eligible_at=at, detail=detail
        )

    def _prefer_priority(
        self, batch: list[CloudEvent], outcomes: dict[EventKey, list[rules.Outcome]]
    ) -> None:
        """When several surveys qualify for one customer at once (from one event, or from events
        of one batch less than ``PRIORITY_WINDOW`` apart), the highest priority wins; the others
        are skipped with that reason."""
        qualified: dict[str, list[tuple[datetime | None, int]]] = defaultdict(list)
        for e in batch:
            for o in outcomes[(e.source, e.id)]:
                if o.decision == "invited" and o.trigger is not None:
                    qualified[e.customer_id].append((e.time, o.trigger.priority))

        def winner(e: CloudEvent) -> int:
            return max(
                (
                    p
                    for t, p in qualified[e.customer_id]
                    if t is None or e.time is None or abs(t - e.time) < PRIORITY_WINDOW
                ),
                default=-(2**31),
            )

        for e in batch:
            key = (e.source, e.id)
            best = winner(e)
            outcomes[key] = [
                o.skipped(
                    "lower_priority", {"priority": o.trigger.priority, "winning_priority": best}
                )
                if o.decision == "invited" and o.trigger is not None and o.trigger.priority < best
                else o
                for o in outcomes[key]
            ]


def _row(event: CloudEvent, outcome: rules.Outcome, now: datetime) -> dict[str, Any]:
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
        "next_eligible_at": outcome.next_eligible_at,
        "decided_at": now,
    }

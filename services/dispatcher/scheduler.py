"""Sends due messages: claims them in batches, sends, records the outcome, publishes deliveries.

A send goes pending → claimed (a round's batch, committed) → sending (committed just before the
provider is called, ``send_concurrency`` sends at a time) → sent | failed. A crash between the
last two commits leaves it in ``sending``; it is then marked ``in_doubt`` and never retried
blindly, because a survey sent twice annoys more than one not sent. A send still ``claimed`` at a
crash was never started: it goes back to pending. Transient provider errors put
the send back to pending with exponential back-off and jitter, a bounded number of times.
Asked to stop (SIGTERM), the scheduler finishes the sends in flight and records them, and
releases the claimed sends it has not started (back to pending, for any replica's next round).

At the moment of sending (in the claim's transaction, so nothing is ``sending`` that will not
be sent) each due message is checked again: a contact point that opted out since it was
scheduled cancels it, an expired link cancels it, and quiet hours in the recipient's time zone
move it to the next allowed minute. A sent invitation whose survey has a reminder schedules it
(``after`` the send, before the link expires); an answer or an opt-out cancels it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common import events
from services.common.db import unit_of_work
from services.common.erasure import DEV_ERASURE_SALT
from services.common.events import DeliveryRecorded, InvitationRequested, OptOutRecorded, utcnow
from services.common.faults import afailpoint
from services.common.kafka import Outgoing, Producer, is_transient
from services.common.logging import bound
from services.common.program import Program
from services.common.quiet_hours import allowed_from
from services.common.runtime import Worker
from services.dispatcher import repository
from services.dispatcher.channels import OutboundEmail, OutboundSms, Provider, SendResult
from services.dispatcher.config import DispatcherSettings
from services.dispatcher.handlers import provider_optout
from services.dispatcher.models import OptOut, Receipt, Send
from services.dispatcher.rendering import Renderer

log = logging.getLogger(__name__)

SENT = Counter("kaiku_invitations_sent_total", "Messages sent", ["channel", "provider", "kind"])
FAILED = Counter(
    "kaiku_invitations_failed_total",
    "Messages that failed for good",
    ["channel", "provider", "kind"],
)
RETRIED = Counter(
    "kaiku_invitations_retried_total", "Transient send failures retried", ["channel", "provider"]
)
IN_DOUBT = Counter(
    "kaiku_invitations_in_doubt_total",
    "Sends interrupted between start and recorded outcome (never retried)",
)
# Attempts at a round's writes after its claim while the database is away (a minute in all).
DB_ATTEMPTS = 16

HELD = Counter(
    "kaiku_sends_held_total",
    "Due messages not sent at their time, by reason (quiet_hours moves; the others cancel)",
    ["reason"],
)
SEGMENTS = Counter("kaiku_sms_segments_total", "SMS segments sent (billed)", ["encoding"])
LATENCY = Gauge("kaiku_last_send_delay_seconds", "Delay between send_at and the actual send")
# Sends are delayed by design (a trigger's delay, quiet hours): seconds up to a week.
EVENT_TO_SEND = Histogram(
    "kaiku_event_to_send_seconds",
    "From the event's time (else the invitation's request) to the provider accepting the "
    "invitation; reminders are not counted",
    ["channel"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 43200, 86400,
             172800, 345600, 604800),
)  # fmt: skip
SEND_LAG = Histogram(
    "kaiku_send_lag_seconds",
    "From a message's planned send_at to the provider accepting it (how far sending runs late)",
    ["channel", "kind"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400),
)


@dataclass(frozen=True)
class _Verdict:
    """What to do with a due send: send it, or the row update that holds it."""

    send: bool
    update: dict[str, Any]


class Scheduler(Worker):
    def __init__(
        self,
        *,
        settings: DispatcherSettings,
        program: Program,
        renderer: Renderer,
        providers: Mapping[str, Provider[Any]],
        sessions: async_sessionmaker[AsyncSession],
        producer: Producer,
        clock: Callable[[], datetime] = utcnow,
        salt: SecretStr | None = None,
    ) -> None:
        super().__init__(settings.poll_seconds)
        self.settings = settings
        self.program = program
        self.renderer = renderer
        self.providers = dict(providers)
        self.sessions = sessions
        self.producer = producer
        self.clock = clock
        # KAIKU_ERASURE_SALT: an erased customer's opt-outs are salted hashes of the contact.
        self.salt = salt or SecretStr(DEV_ERASURE_SALT)
        self._sem = asyncio.Semaphore(settings.send_concurrency)
        self._last_sweep = 0.0

    async def run(self) -> None:
        await self.recover()
        while not self.stopping:
            try:
                claimed = await self.round()
                await self.publish_outbox()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("scheduler: transient error (%s); retrying", type(exc).__name__)
                await asyncio.sleep(self.settings.poll_seconds)
                continue
            if claimed < self.settings.claim_batch:
                await self.idle()

    async def recover(self) -> None:
        now = self.clock()
        async with unit_of_work(self.sessions) as session:
            lease_expired_before = now - timedelta(seconds=self.settings.sending_lease_seconds)
            back = await repository.release_claims(
                session,
                instance=self.settings.instance_id,
                lease_expired_before=lease_expired_before,
            )
            n = await repository.mark_in_doubt(
                session,
                now=now,
                instance=self.settings.instance_id,
                lease_expired_before=lease_expired_before,
            )
        if back:
            log.info("%d claimed send(s) not started before a crash: pending again", back)
        if n:
            IN_DOUBT.inc(n)
            log.warning("%d send(s) were interrupted by a crash and are now in doubt", n)

    # -- one round --------------------------------------------------------------------------------

    async def round(self) -> int:
        """Claim one batch of due sends, send them, record the outcomes. Returns the batch size."""
        now = self.clock()
        claimed: list[Send] = []
        async with unit_of_work(self.sessions) as session:
            due = await repository.due(session, now=now, limit=self.settings.claim_batch)
            tried = {(s.invitation_id, s.kind): s.attempts for s in due}  # before the claim
            if due:
                claimed = await self._claim(session, due, now)
        if not due:
            if now.timestamp() - self._last_sweep > 30:  # other replicas' abandoned claims
                self._last_sweep = now.timestamp()
                await self.recover()
            return 0
        for s in claimed:  # as committed (the rows are detached now)
            # From the values before the claim: the ORM's bulk update may already have
            # refreshed these objects, and counting from them would count an attempt twice.
            s.status, s.attempts = "claimed", tried[s.invitation_id, s.kind] + 1
        await afailpoint("dispatcher.after_claim")
        # A chunk of ``send_concurrency`` at a time is marked ``sending`` (committed) right
        # before its provider calls: a crash leaves that chunk in doubt, while the claimed sends
        # not started yet are handed back (``recover``), never in doubt.
        step = max(1, self.settings.send_concurrency)
        for at in range(0, len(claimed), step):
            chunk = claimed[at : at + step]
            if self.stopping:
                outcomes: list[tuple[SendResult, OutboundSms | None] | None] = [None] * len(chunk)
            else:
                await self._mark_sending(chunk)
                outcomes = list(await asyncio.gather(*(self._send_one(s) for s in chunk)))
                await afailpoint("dispatcher.after_send")
            # On shutdown the sends not started are released for the next round of any replica.
            done = [(s, o) for s, o in zip(chunk, outcomes, strict=True) if o is not None]
            released = [
                _released(s, tried[s.invitation_id, s.kind])
                for s, o in zip(chunk, outcomes, strict=True)
                if o is None
            ]
            await self._record_retrying(done, released)
            if released:
                log.info("stopping: %d claimed send(s) not started, released", len(released))
        return len(due)

    async def _mark_sending(self, chunk: list[Send]) -> None:
        async def mark() -> None:
            async with unit_of_work(self.sessions) as session:
                await repository.update_sends(
                    session,
                    [
                        {"invitation_id": s.invitation_id, "kind": s.kind, "status": "sending"}
                        for s in chunk
                    ],
                )

        await self._retrying(f"marking {len(chunk)} send(s) started", mark)
        for s in chunk:
            s.status = "sending"

    async def _record_retrying(
        self,
        done: list[tuple[Send, tuple[SendResult, OutboundSms | None]]],
        released: list[dict[str, Any]],
    ) -> None:
        """Record the outcomes of the sends made and release the ones not started. The
        outcomes exist only here: a send left ``sending`` would be taken for one interrupted by
        a crash (in doubt)."""

        async def record() -> None:
            async with unit_of_work(self.sessions) as session:
                await self._record(session, [s for s, _ in done], [o for _, o in done])
                await repository.update_sends(session, released)

        await self._retrying(f"recording {len(done)} send outcome(s)", record)

    async def _retrying(self, what: str, work: Callable[[], Awaitable[None]]) -> None:
        """``work`` in a round that claimed sends, retried while the database is briefly away
        (a restart, a fail-over), so the round neither leaves its claims nor loses outcomes."""
        for attempt in range(DB_ATTEMPTS):
            try:
                await work()
                return
            except Exception as exc:
                if not is_transient(exc) or attempt == DB_ATTEMPTS - 1:
                    raise
                delay = min(5.0, 0.2 * 2**attempt)
                log.warning("%s failed (%s); retrying in %.1fs", what, type(exc).__name__, delay)
                await asyncio.sleep(delay)

    async def _claim(self, session: AsyncSession, due: list[Send], now: datetime) -> list[Send]:
        """Check each due send again; mark the ones to send ``claimed`` (committed, so no other
        replica takes them) and hold the rest."""
        keys = set()
        for s in due:
            keys.add((s.channel, repository.customer_key(s.customer_id)))
            if s.contact:
                keys.add((s.channel, s.contact))
        opted = await repository.opted_out(session, keys, self.salt)
        updates, claimed = [], []
        for s in due:
            verdict = self._check(s, opted, now)
            updates.append({"invitation_id": s.invitation_id, "kind": s.kind, **verdict.update})
            if verdict.send:
                claimed.append(s)
        await repository.update_sends(session, updates)
        return claimed

    def _check(self, s: Send, opted: set[tuple[str, str]], now: datetime) -> _Verdict:
        invitation = s.invitation
        if (s.channel, s.contact or "") in opted or (
            s.channel,
            repository.customer_key(s.customer_id),
        ) in opted:
            HELD.labels(reason="opted_out").inc()
            return _Verdict(False, repository.cancelled("opted out before the send", now))
        expires = datetime.fromisoformat(invitation["expires_at"])
        if now >= expires:
            HELD.labels(reason="expired").inc()
            return _Verdict(
                False, repository.cancelled("the survey link expired before the send", now)
            )
        zone = invitation.get("timezone") or invitation["customer"].get("timezone")
        at = allowed_from(self.program.fatigue, now, s.channel, zone)
        if at > now:
            HELD.labels(reason="quiet_hours").inc()
            log.info("quiet hours in the recipient's time zone: send moved to %s", at.isoformat())
            return _Verdict(False, {"send_at": at})
        return _Verdict(
            True,
            {
                "status": "claimed",
                "claimed_by": self.settings.instance_id,
                "claimed_at": now,
                "attempts": s.attempts + 1,
            },
        )

    async def _send_one(self, send: Send) -> tuple[SendResult, OutboundSms | None] | None:
        """The outcome of one send; None when the scheduler is stopping and it never started."""
        with bound(invitation_id=str(send.invitation_id), customer_id=send.customer_id):
            provider = self.providers.get(send.channel)
            if provider is None:
                reason = f"no provider is configured for {send.channel}"
                return SendResult("permanent", reason=reason), None
            try:
                message = self._render(send)
            except (ValueError, KeyError) as exc:
                return SendResult("permanent", reason=f"cannot render the message: {exc}"), None
            sms = message if isinstance(message, OutboundSms) else None
            async with self._sem:
                if self.stopping:
                    return None
                await afailpoint("dispatcher.before_send")
                try:
                    return await provider.send(message), sms
                except Exception as exc:  # a provider bug must not lose the outcome
                    log.exception("provider %s raised", provider.name)
                    reason = f"{provider.name}: {type(exc).__name__}"
                    return SendResult("transient", reason=reason), sms

    def _render(self, send: Send) -> OutboundEmail | OutboundSms:
        invitation = InvitationRequested.model_validate(send.invitation)
        try:
            survey = self.program.survey(invitation.survey_id)
        except KeyError:
            raise ValueError("the survey is no longer in the program") from None
        reminder = send.kind == "reminder"
        if send.channel == "sms":
            return self.renderer.outbound_sms(
                invitation,
                survey,
                sender=self.settings.sms_from,
                max_segments=self.settings.sms_max_segments,
                reminder=reminder,
            )
        return self.renderer.outbound_email(
            invitation,
            survey,
            sender=self.settings.email_from,
            unsubscribe_mailto=self.settings.unsubscribe_mailto,
            domain=self.settings.email_domain,
            reminder=reminder,
        )

    async def _record(
        self,
        session: AsyncSession,
        sends: list[Send],
        outcomes: list[tuple[SendResult, OutboundSms | None]],
    ) -> None:
        now = self.clock()
        rows: list[dict[str, Any]] = []
        reminders: list[dict[str, Any]] = []
        optouts: list[dict[str, Any]] = []
        for send, (result, sms) in zip(sends, outcomes, strict=True):
            with bound(invitation_id=str(send.invitation_id), customer_id=send.customer_id):
                row = self._outcome(send, result, now)
                if sms is not None:
                    row.update(sms_encoding=sms.encoding, sms_segments=sms.segments)
                    if result.outcome == "sent":
                        SEGMENTS.labels(encoding=sms.encoding).inc(sms.segments)
                rows.append(row)
                if result.outcome == "sent" and send.kind == "invitation":
                    reminder = self._reminder(send, now)
                    if reminder is not None:
                        reminders.append(reminder)
                if result.outcome == "permanent" and result.suppress and send.contact:
                    optouts.append(
                        provider_optout(send.channel, send.contact, send, result.suppress, now)
                    )
        await repository.update_sends(session, rows)
        await repository.schedule(session, reminders)
        await repository.suppress(
            session, optouts, reason="the provider refused the contact point", now=now
        )

    def _outcome(self, send: Send, result: SendResult, now: datetime) -> dict[str, Any]:
        provider = self.providers[send.channel].name if send.channel in self.providers else "none"
        row: dict[str, Any] = {
            "invitation_id": send.invitation_id,
            "kind": send.kind,
            "provider": provider,
            "reason": result.reason,
        }
        labels = {"channel": send.channel, "provider": provider}
        if result.outcome == "sent":
            SENT.labels(**labels, kind=send.kind).inc()
            LATENCY.set((now - send.send_at).total_seconds())
            SEND_LAG.labels(channel=send.channel, kind=send.kind).observe(
                max(0.0, (now - send.send_at).total_seconds())
            )
            if send.kind == "invitation":
                EVENT_TO_SEND.labels(channel=send.channel).observe(_since_event(send, now))
            log.info("%s sent", send.kind)
            row.update(
                status="sent", finished_at=now, provider_message_id=result.provider_message_id
            )
        elif result.outcome == "transient" and send.attempts < self.settings.max_attempts:
            RETRIED.labels(**labels).inc()
            backoff = min(
                self.settings.retry_max_seconds,
                self.settings.retry_base_seconds * 2 ** (send.attempts - 1),
            ) * (0.5 + random.random())
            backoff = max(backoff, result.retry_after or 0.0)
            log.warning(
                "send failed (%s); retry %d in %.0fs", result.reason, send.attempts, backoff
            )
            row.update(
                status="pending",
                send_at=now + timedelta(seconds=backoff),
                claimed_by=None,
                claimed_at=None,
            )
        else:
            FAILED.labels(**labels, kind=send.kind).inc()
            log.warning("send failed for good: %s", result.reason)
            row.update(status="failed", finished_at=now)
        return row

    def _reminder(self, send: Send, now: datetime) -> dict[str, Any] | None:
        try:
            survey = self.program.survey(send.survey_id)
        except KeyError:
            return None
        if survey.reminder is None:
            return None
        at = now + survey.reminder.after
        if at >= datetime.fromisoformat(send.invitation["expires_at"]):
            return None  # the link would be dead by then
        return {
            "invitation_id": send.invitation_id,
            "kind": "reminder",
            "customer_id": send.customer_id,
            "survey_id": send.survey_id,
            "channel": send.channel,
            "contact": send.contact,
            "invitation": send.invitation,
            "status": "pending",
            "send_at": at,
            "attempts": 0,
            "created_at": now,
        }

    # -- the outbox relay -------------------------------------------------------------------------

    async def publish_outbox(self, limit: int = 500) -> int:
        """Publish what is not yet on Kafka: send outcomes and receipts to ``kaiku.deliveries``,
        opt-outs found by the dispatcher to ``kaiku.optouts``."""
        async with unit_of_work(self.sessions) as session:
            sends = await repository.unpublished(session, limit)
            receipts = await repository.unpublished_receipts(session, limit)
            optouts = await repository.unpublished_optouts(session, limit)
            if not (sends or receipts or optouts):
                return 0
            messages = [_delivery(s) for s in sends]
            messages += [m for r in receipts if (m := _receipt_delivery(r)) is not None]
            messages += [m for o in optouts if (m := _optout(o)) is not None]
            await self.producer.publish(messages)
            now = self.clock()
            await repository.mark_published(
                session, [(s.invitation_id, s.kind) for s in sends], now
            )
            await repository.mark_receipts_published(
                session, [(r.provider, r.event_id) for r in receipts], now
            )
            await repository.mark_optouts_published(
                session, [(o.channel, o.contact) for o in optouts], now
            )
        return max(len(sends), len(receipts), len(optouts))


def _since_event(send: Send, now: datetime) -> float:
    """Seconds from the CloudEvent's time (else the invitation's request) to ``now``; never
    negative (a producer's clock may run ahead)."""
    invitation = send.invitation
    started = datetime.fromisoformat(invitation.get("event_time") or invitation["requested_at"])
    return max(0.0, (now - started).total_seconds())


def _released(send: Send, attempts: int) -> dict[str, Any]:
    """The row update that hands a claimed send back as it was before the claim."""
    return {
        "invitation_id": send.invitation_id,
        "kind": send.kind,
        "status": "pending",
        "claimed_by": None,
        "claimed_at": None,
        "attempts": attempts,
    }


def _channel(value: str) -> events.SurveyChannel:
    return "sms" if value == "sms" else "email"


def _delivery(send: Send) -> Outgoing:
    message = DeliveryRecorded(
        invitation_id=send.invitation_id,
        survey_id=send.survey_id,
        customer_id=send.customer_id,
        channel=_channel(send.channel),
        provider=send.provider or "none",
        status="sent"
        if send.status == "sent"
        else ("in_doubt" if send.status == "in_doubt" else "failed"),
        reason=send.reason,
        provider_message_id=send.provider_message_id,
        attempts=send.attempts,
        occurred_at=send.finished_at or utcnow(),
        kind="reminder" if send.kind == "reminder" else "invitation",
    )
    return Outgoing(events.DELIVERIES, send.customer_id, message)


def _receipt_delivery(r: Receipt) -> Outgoing | None:
    if r.invitation_id is None or r.customer_id is None or r.survey_id is None:
        return None  # a STOP from a number kaiku never wrote to: nothing to tell
    message = DeliveryRecorded(
        invitation_id=r.invitation_id,
        survey_id=r.survey_id,
        customer_id=r.customer_id,
        channel=_channel(r.channel),
        provider=r.provider,
        status=r.status,
        reason=r.reason,
        provider_message_id=r.provider_message_id,
        occurred_at=r.occurred_at,
        kind="reminder" if r.kind == "reminder" else "invitation",
    )
    return Outgoing(events.DELIVERIES, r.customer_id, message)


def _optout(o: OptOut) -> Outgoing | None:
    if o.customer_id is None:
        return None
    message = OptOutRecorded(
        optout_id=o.optout_id,
        customer_id=o.customer_id,
        channel=_channel(o.channel),
        invitation_id=o.invitation_id,
        survey_id=o.survey_id,
        source="provider",
        reason=o.reason,
        occurred_at=o.created_at,
    )
    return Outgoing(events.OPTOUTS, o.customer_id, message)

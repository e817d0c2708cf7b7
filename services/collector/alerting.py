"""Close the loop: an answer that matches an alert rule is marked for follow-up and posted to the
program's alert webhooks.

``record`` runs in the answer's transaction: it sets ``alerted_at`` (the first time),
``alert_rules``, opens the follow-up and queues one row per webhook in
``collector_alert_deliveries`` (the outbox). ``AlertSender`` posts them: JSON, signed the
Standard Webhooks way (``webhook-id`` is the delivery id, the same on every retry), 2xx
delivered; 408, 425, 429, 5xx and no answer are retried with exponential back-off and jitter
(after ``Retry-After`` when given) up to ``alert_max_attempts``; any other answer fails it for
good. Rows are claimed with ``FOR UPDATE SKIP LOCKED`` and leased while posted, so replicas
share the work; a crash mid-post posts again after the lease (the receiver deduplicates on
``webhook-id``). Logs name the webhook by scheme, host and path only: never its query string,
the secret or the comment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import Counter
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.collector import alerts, repository
from services.collector.config import CollectorSettings
from services.collector.models import AlertDelivery, Response
from services.common.db import unit_of_work
from services.common.events import utcnow
from services.common.http import retry_after_seconds
from services.common.kafka import is_transient
from services.common.program import Program
from services.common.runtime import Worker
from services.common.webhooks import standard_headers, standard_secret_key

log = logging.getLogger(__name__)

WEBHOOKS = Counter(
    "kaiku_alert_webhooks_total",
    "Close-the-loop alert webhooks, by outcome (delivered, retried, failed; withdrawn: the "
    "answer turned out a suspected bot)",
    ["outcome"],
)
ALERTED = Counter("kaiku_alerts_total", "Answers that matched an alert rule, by rule", ["rule"])
USER_AGENT = "kaiku-collector"
BATCH = 50


async def record(
    session: AsyncSession,
    program: Program,
    response: Response,
    now: datetime,
    *,
    hold: timedelta = timedelta(0),
) -> list[str]:
    """Alert on a stored answer if it matches rules that have not alerted for it yet; returns
    those rules. Call in the answer's transaction, after ``repository.save_response``. The
    webhooks are posted ``hold`` later: while the answer may still be found a link scanner's (a
    trap-link hit after the POST re-marks it), and not at all if it is."""
    answer = alerts.Answer(
        survey_id=response.survey_id,
        metric=response.metric,
        score=response.score,
        comment=response.comment,
        suspected_bot=response.suspected_bot,
    )
    matched = alerts.matching_rules(program.alerts.rules, answer)
    already = alerts.split_rules(response.alert_rules)
    new = alerts.new_rules(already, matched)
    if not new:
        return []
    deliveries = [
        (hook.url, [r for r in new if hook.rules is None or r in hook.rules])
        for hook in alerts.webhooks_for(program.alerts.webhooks, new)
    ]
    await repository.record_alert(
        session, response, rules=already + new, deliveries=deliveries, now=now, due=now + hold
    )
    for rule in new:
        ALERTED.labels(rule=rule).inc()
    log.info("answer alerted (%s); %d webhook(s) queued", ", ".join(new), len(deliveries))
    return new


def where(url: str) -> str:
    """A webhook URL fit for a log line: scheme, host, port and path, no query or credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def payload(delivery: AlertDelivery, response: Response) -> dict[str, Any]:
    """The body of an alert (``type``, ``timestamp``, ``data``: the Standard Webhooks shape)."""
    return {
        "type": "response.alert",
        "timestamp": delivery.created_at.isoformat(),
        "data": {
            "response_id": str(response.response_id),
            "invitation_id": str(response.invitation_id),
            "customer_id": response.customer_id,
            "survey": response.survey_id,
            "metric": response.metric,
            "score": response.score,
            "comment": response.comment,
            "locale": response.locale,
            "revision": response.revision,
            "submitted_at": response.submitted_at.isoformat(),
            "rules": alerts.split_rules(delivery.rules),
            "segments": {f: getattr(response, f) for f in repository.CONTEXT_FIELDS},
        },
    }


def retry_after(answer: httpx.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), if any."""
    return retry_after_seconds(answer.headers.get("retry-after"))


@dataclass(frozen=True)
class Attempt:
    delivery_id: uuid.UUID
    attempts: int
    url: str
    body: bytes


@dataclass(frozen=True)
class Outcome:
    outcome: str  # delivered | transient | permanent
    reason: str | None = None
    retry_after: float | None = None


def classify(answer: httpx.Response) -> Outcome:
    status = answer.status_code
    if 200 <= status < 300:
        return Outcome("delivered")
    if status in (408, 425, 429) or status >= 500:
        return Outcome("transient", f"HTTP {status}", retry_after(answer))
    return Outcome("permanent", f"HTTP {status}")


class AlertSender(Worker):
    def __init__(
        self,
        *,
        settings: CollectorSettings,
        program: Program,
        sessions: async_sessionmaker[AsyncSession],
        environ: Mapping[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """Refuses (ValueError) a webhook whose secret variable is unset or not a secret."""
        super().__init__(settings.alert_poll_seconds)
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        env = os.environ if environ is None else environ
        self.secrets: dict[str, str] = {}
        for i, hook in enumerate(program.alerts.webhooks):
            secret = env.get(hook.secret_env, "")
            name = f"alerts.webhooks.{i}: {hook.secret_env}"
            if not secret.strip(", "):
                raise ValueError(f"{name}: the webhook's signing secret is not set")
            for part in secret.split(","):
                if part.strip():
                    try:
                        standard_secret_key(part.strip())
                    except ValueError:  # named by its variable; nothing of the value
                        raise ValueError(f"{name}: whsec_ must be followed by base64") from None
            self.secrets[hook.url] = secret
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=settings.alert_timeout_seconds, headers={"user-agent": USER_AGENT}
        )

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def run(self) -> None:
        while not self.stopping:
            try:
                claimed = await self.round()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("alert sender: transient error (%s)", type(exc).__name__)
                await asyncio.sleep(self.poll_seconds)
                continue
            if claimed < BATCH:
                await self.idle()

    async def round(self) -> int:
        """Claim due deliveries (leased while posted), post them, record the outcomes. Returns
        how many were due."""
        now = self.clock()
        lease = timedelta(seconds=self.settings.alert_timeout_seconds + 60)
        attempts: list[Attempt] = []
        async with unit_of_work(self.sessions) as session:
            due = await repository.due_alert_deliveries(session, now=now, limit=BATCH)
            for delivery, response in due:
                if delivery.url not in self.secrets:
                    self._close(delivery, "failed", "the webhook is no longer in the program")
                elif response is None or response.erased_at is not None:
                    self._close(delivery, "failed", "the answer was erased")
                elif response.suspected_bot:
                    reason = f"the answer is a suspected bot: {response.bot_reason}"
                    self._close(delivery, "withdrawn", reason)
                else:
                    delivery.attempts += 1
                    delivery.next_attempt_at = now + lease
                    body = json.dumps(
                        payload(delivery, response), ensure_ascii=False, separators=(",", ":")
                    ).encode()
                    attempts.append(Attempt(delivery.id, delivery.attempts, delivery.url, body))
        if attempts:
            outcomes = await asyncio.gather(*(self.post(a) for a in attempts))
            done = self.clock()
            async with unit_of_work(self.sessions) as session:
                for attempt, outcome in zip(attempts, outcomes, strict=True):
                    await repository.finish_alert_delivery(
                        session,
                        attempt.delivery_id,
                        attempt.attempts,
                        self._result(attempt, outcome, done),
                    )
        return len(due)

    def _close(self, delivery: AlertDelivery, status: str, reason: str) -> None:
        """Never post it: ``failed`` for good, or ``withdrawn`` (its answer turned out a bot's)."""
        WEBHOOKS.labels(outcome=status).inc()
        log.warning("alert %s to %s %s: %s", delivery.id, where(delivery.url), status, reason)
        delivery.status = status
        delivery.last_error = reason

    async def post(self, attempt: Attempt) -> Outcome:
        headers = standard_headers(
            self.secrets[attempt.url], str(attempt.delivery_id), attempt.body
        )
        try:
            answer = await self._http.post(attempt.url, content=attempt.body, headers=headers)
        except httpx.TimeoutException:
            return Outcome("transient", "timed out")
        except httpx.HTTPError as exc:
            return Outcome("transient", type(exc).__name__)
        return classify(answer)

    def _result(self, attempt: Attempt, outcome: Outcome, now: datetime) -> dict[str, Any]:
        to = where(attempt.url)
        if outcome.outcome == "delivered":
            WEBHOOKS.labels(outcome="delivered").inc()
            log.info("alert %s delivered to %s", attempt.delivery_id, to)
            return {"status": "delivered", "delivered_at": now, "last_error": None}
        if outcome.outcome == "transient" and attempt.attempts < self.settings.alert_max_attempts:
            WEBHOOKS.labels(outcome="retried").inc()
            backoff = min(
                self.settings.alert_retry_max_seconds,
                self.settings.alert_retry_base_seconds * 2 ** (attempt.attempts - 1),
            ) * (0.5 + random.random())
            if outcome.retry_after is not None:
                backoff = max(
                    backoff, min(outcome.retry_after, self.settings.alert_retry_max_seconds)
                )
            log.warning(
                "alert %s to %s: %s; retry %d in %.1fs",
                attempt.delivery_id,
                to,
                outcome.reason,
                attempt.attempts,
                backoff,
            )
            return {
                "next_attempt_at": now + timedelta(seconds=backoff),
                "last_error": outcome.reason,
            }
        WEBHOOKS.labels(outcome="failed").inc()
        log.warning(
            "alert %s to %s failed for good after %d attempt(s): %s",
            attempt.delivery_id,
            to,
            attempt.attempts,
            outcome.reason,
        )
        return {"status": "failed", "last_error": outcome.reason}

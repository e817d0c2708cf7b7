"""SIGTERM in the middle of a batch: each service finishes or hands back what it holds, commits,
and exits 0 within KAIKU_SHUTDOWN_SECONDS; a fresh instance then completes the work with nothing
lost and nothing done twice (docs/operations-shutdown.md).

Each service runs as a subprocess (``python -m services.<name>``) on the real broker and
PostgreSQL. A ``sleep`` failpoint (services/common/faults.py) holds a batch open, and the test
sends SIGTERM once the failpoint's "sleeping" line is in the log: the batch is then provably in
progress (inside its database transaction, or with its sends in flight).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings, LinkSettings
from services.common.events import DeliveryRecorded
from services.common.faults import parse
from services.common.kafka import ensure_topics
from services.common.serve import shutdown_budget
from services.common.tokens import LinkKeys
from services.embedded import free_port
from tests.conftest import ROOT
from tests.integration.test_end_to_end import order_delivered
from tests.support import SmtpSink, email_invitation, eventually

BUDGET = 12  # KAIKU_SHUTDOWN_SECONDS of the services under test
SLACK = 5.0  # the test allows the exit this much after the budget (a busy machine)


# -- running a service -------------------------------------------------------------------------


class Service:
    """One ``python -m services.<name>`` process, its port and its own log file."""

    def __init__(
        self,
        name: str,
        kafka: KafkaSettings,
        db: DatabaseSettings,
        log: Path,
        *,
        failpoints: str = "",
        sink: SmtpSink | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self.port = free_port()
        env = {
            **os.environ,
            "KAIKU_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "KAIKU_TOPIC_PREFIX": kafka.topic_prefix,
            "KAIKU_KAFKA_ENABLE_IDEMPOTENCE": "false",
            "KAIKU_KAFKA_POLL_TIMEOUT_MS": "50",
            "KAIKU_KAFKA_SESSION_TIMEOUT_MS": "3000",
            "KAIKU_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "KAIKU_DATABASE_URL": db.url,
            "KAIKU_DATABASE_SCHEMA": db.schema_name or "",
            "KAIKU_PROGRAM": str(ROOT / "deploy/local/program.yaml"),
            "KAIKU_PORT": str(self.port),
            "KAIKU_API_TOKEN": "shutdown-test",
            "KAIKU_SHUTDOWN_SECONDS": str(BUDGET),
            "KAIKU_POLL_SECONDS": "0.2",
            "KAIKU_FAILPOINTS": failpoints,
            **(extra or {}),
        }
        if sink is not None:
            env.update(
                KAIKU_EMAIL_PROVIDER="smtp",
                KAIKU_SMTP_HOST="127.0.0.1",
                KAIKU_SMTP_PORT=str(sink.port),
            )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=env,
            cwd=ROOT,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for_line(self, line: str, timeout: float = 90.0) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, f"{self.name} exited early:\n{self.text()}"
            return line in self.text()

        await eventually(seen, timeout=timeout, what=f"{line!r} in the {self.name} log")

    async def terminate(self) -> float:
        """SIGTERM; returns the seconds until the process exited, after checking it exited 0
        within the budget."""
        await self.wait_for_line("Uvicorn running on")  # up, its signal handlers installed
        loop = asyncio.get_running_loop()
        sent = loop.time()
        self.proc.send_signal(signal.SIGTERM)
        await eventually(
            lambda: self.proc.poll() is not None,
            timeout=BUDGET + SLACK,
            what=f"{self.name} to exit within {BUDGET} s (+{SLACK:g} s) of SIGTERM",
        )
        took = loop.time() - sent
        assert self.proc.returncode == 0, (
            f"{self.name} exited {self.proc.returncode}:\n{self.text()}"
        )
        assert f"SIGTERM: shutting down within {BUDGET}s" in self.text()
        assert f"{self.name} stopped in" in self.text()
        assert "@example.com" not in self.text(), "a contact address in the log"
        return took

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def in_order(log: str, *lines: str) -> bool:
    """Every line is in the log, each after the one before."""
    at = -1
    for line in lines:
        at = log.find(line, at + 1)
        if at < 0:
            return False
    return True


# -- reading the broker and the database --------------------------------------------------------


async def everything(kafka: KafkaSettings, name: str) -> list[ConsumerRecord]:
    """Every record of a topic, up to its end offsets now."""
    topic = kafka.topic(name)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        await consumer.topics()  # loads the metadata
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        deadline = asyncio.get_running_loop().time() + 30
        while [tp for tp in parts if await consumer.position(tp) < ends[tp]]:
            assert asyncio.get_running_loop().time() < deadline, f"cannot read {topic}"
            for rs in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(rs)
    finally:
        await consumer.stop()
    return records


async def committed(kafka: KafkaSettings, group: str, name: str) -> dict[int, int]:
    """The committed offset of each partition of a topic for a consumer group (0: none)."""
    topic = kafka.topic(name)
    # A consumer that names the group but subscribes to nothing reads its commits without joining.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return {tp.partition: await consumer.committed(tp) or 0 for tp in parts}
    finally:
        await consumer.stop()


async def settled(kafka: KafkaSettings, group: str, name: str) -> bool:
    """The group has committed every record of the topic."""
    ends = {r.partition: r.offset + 1 for r in await everything(kafka, name)}
    done = await committed(kafka, group, name)
    return all(done.get(p, 0) >= end for p, end in ends.items())


async def rows(db: DatabaseSettings, sql: str) -> list[Any]:
    """Rows of a query on the test's schema (``{s}`` stands for it)."""
    engine = create_async_engine(db.url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(text(sql.format(s=f'"{db.schema_name}"')))
            return list(result.all())
    finally:
        await engine.dispose()


def positions(records: list[ConsumerRecord], field: str) -> list[tuple[int, int, str]]:
    """Partition, offset and identity (a field of the JSON value) of each record."""
    return [(r.partition, r.offset, str(json.loads(r.value)[field])) for r in records]


def offsets_agree(
    records: list[tuple[int, int, str]], done: set[str], offsets: dict[int, int]
) -> None:
    """The records a stopped consumer committed the offsets of are exactly the ones whose
    effects it committed to the database (``done``): the batch in hand at SIGTERM was
    committed both ways, and nothing else was."""
    for partition, offset, key in records:
        below = offset < offsets.get(partition, 0)
        assert below == (key in done), (
            f"{key} at {partition}@{offset}: offset committed {below}, "
            f"effect in the database {key in done}"
        )


async def produce(kafka: KafkaSettings, name: str, messages: list[tuple[str, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    try:
        batch = [
            await producer.send(kafka.topic(name), value, key=key.encode())
            for key, value in messages
        ]
        await asyncio.gather(*batch)
    finally:
        await producer.stop()


# -- without the broker --------------------------------------------------------------------------


def test_failpoint_spec_keeps_the_kill_format() -> None:
    points = parse("a.after_produce, b@3, c:kill, d@2:sleep=1.5")
    assert (points["a.after_produce"].nth, points["a.after_produce"].sleep) == (1, None)
    assert (points["b"].nth, points["b"].sleep) == (3, None)
    assert points["c"].sleep is None
    assert (points["d"].nth, points["d"].sleep) == (2, 1.5)


def test_the_budget_leaves_time_to_close_after_the_drain() -> None:
    http_seconds, drain_seconds = shutdown_budget(20)
    assert http_seconds < drain_seconds < 20


async def test_readiness_turns_false_when_the_shutdown_begins(
    kafka: KafkaSettings, sqlite: DatabaseSettings
) -> None:
    from services.common.settings import CommonSettings
    from services.trigger.app import create_app

    app = create_app(CommonSettings(kafka=kafka, database=sqlite))
    runtime = app.state.runtime
    runtime.begin_shutdown()  # what the SIGTERM handler does first
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://kaiku.test") as http:
        answer = await http.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["checks"] == {"accepting_work": False}
    await runtime.stop()


# -- the trigger: events → invitations ----------------------------------------------------------


def distinct_event(i: int) -> dict[str, Any]:
    """An order.delivered event of a customer (and account) of its own: it always invites."""
    event = order_delivered(f"gs-{i:03d}")
    customer = event["data"]["customer"]  # type: ignore[index]
    customer.update(email=f"gs-{i:03d}@example.com", account_id=f"acct-gs-{i:03d}")
    return event


async def test_trigger_sigterm_mid_batch_loses_and_repeats_nothing(
    kafka: KafkaSettings, postgres: DatabaseSettings, tmp_path: Path
) -> None:
    await ensure_topics(kafka)
    sent = [distinct_event(i) for i in range(200)]
    ids = {str(e["id"]) for e in sent}
    await produce(kafka, events.EVENTS, [(str(e["subject"]), json.dumps(e).encode()) for e in sent])
    group = f"{kafka.topic_prefix}trigger"
    processed = "SELECT event_id FROM {s}.trigger_processed_events"
    batches = {"KAIKU_KAFKA_MAX_BATCH": "50"}  # the restart has work left to do

    first = Service(
        "trigger",
        kafka,
        postgres,
        tmp_path / "trigger-1.log",
        failpoints="trigger.before_db_commit:sleep=3",
        extra=batches,
    )
    second: Service | None = None
    try:
        # The first batch is inside its transaction, sleeping before the commit.
        await first.wait_for_line("failpoint trigger.before_db_commit sleeping")
        before = {r.event_id for r in await rows(postgres, processed)}
        await first.terminate()
        log = first.text()
        # The signal came mid-batch, and the batch went on to its commit after it.
        assert in_order(
            log,
            "failpoint trigger.before_db_commit sleeping",
            "SIGTERM: shutting down within",
            "trigger: shutting down: not ready",
            "failpoint trigger.before_db_commit woke",
            "trigger: 4 of 4 consumer(s) committed their batch in hand and left their group",
            "trigger: producer flushed",
            "trigger stopped in",
        ), log
        assert log.count("failpoint trigger.before_db_commit sleeping") == 1, log

        # The batch in hand is in the database, on the invitations topic and in the offsets.
        done = {r.event_id for r in await rows(postgres, processed)}
        assert done - before, "the batch in progress at SIGTERM was not committed"
        assert len(done) < len(ids), "the first instance took more than one batch"
        offsets = await committed(kafka, group, events.EVENTS)
        offsets_agree(positions(await everything(kafka, events.EVENTS), "id"), done, offsets)
        published = [json.loads(r.value) for r in await everything(kafka, events.INVITATIONS)]
        assert sorted(p["event_id"] for p in published) == sorted(done)

        # A fresh instance does the rest. It starts after the batch that was in hand at SIGTERM
        # (its offsets were committed with it, above): that batch is not redone, which the
        # exactly-once counts below show (a redo would re-publish its invitation ids).
        second = Service("trigger", kafka, postgres, tmp_path / "trigger-2.log", extra=batches)
        await eventually(
            lambda: settled(kafka, group, events.EVENTS), timeout=90, what="the rest processed"
        )
        await asyncio.sleep(1.5)  # room for a duplicate to show up, if there were one
        await second.terminate()
    finally:
        for service in (first, second):
            if service is not None:
                service.kill()

    # Every event has exactly one invitation: none missing, none published twice (a redone
    # batch would have re-published the same invitation ids).
    invitations = [json.loads(r.value) for r in await everything(kafka, events.INVITATIONS)]
    by_event = Counter(i["event_id"] for i in invitations)
    assert set(by_event) == ids
    assert set(by_event.values()) == {1}
    assert len({i["invitation_id"] for i in invitations}) == len(ids)
    decisions = await rows(postgres, "SELECT event_id FROM {s}.trigger_decisions")
    assert Counter(d.event_id for d in decisions) == Counter(ids)


# -- the dispatcher: due invitations → emails -----------------------------------------------------


async def test_dispatcher_sigterm_mid_send_emails_each_invitation_once(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    await ensure_topics(kafka)
    due = [email_invitation(f"gs-{i:03d}") for i in range(40)]
    ids = {str(inv.invitation_id) for inv in due}
    await produce(
        kafka,
        events.INVITATIONS,
        [(inv.customer.id, inv.model_dump_json(exclude_none=True).encode()) for inv in due],
    )
    statuses = "SELECT invitation_id, status, attempts, claimed_by FROM {s}.dispatcher_sends"

    # Four sends at a time, each held two seconds in flight by the failpoint.
    first = Service(
        "dispatcher",
        kafka,
        postgres,
        tmp_path / "dispatcher-1.log",
        failpoints="dispatcher.before_send:sleep=2",
        sink=smtp_sink,
        extra={"KAIKU_SEND_CONCURRENCY": "4"},
    )
    second: Service | None = None
    try:
        await first.wait_for_line("failpoint dispatcher.before_send sleeping")
        # Every invitation is stored (its consumer is not the subject here); sends in flight.
        await eventually(
            lambda: settled(kafka, f"{kafka.topic_prefix}dispatcher", events.INVITATIONS),
            timeout=30,
            what="the dispatcher to store the invitations",
        )
        await first.terminate()
        log = first.text()
        assert in_order(
            log,
            "failpoint dispatcher.before_send sleeping",
            "SIGTERM: shutting down within",
            "dispatcher: shutting down: not ready",
            "failpoint dispatcher.before_send woke",
            "1 of 1 worker(s) finished their round",
            "dispatcher stopped in",
        ), log
        # Every send in flight at SIGTERM went out and was recorded; the claimed sends not yet
        # started were handed back as they were before the claim; nothing is left "sending"
        # (which a restart would mark "in doubt", never to be sent).
        started = log.count("failpoint dispatcher.before_send sleeping")
        sends = await rows(postgres, statuses)
        by_status = Counter(s.status for s in sends)
        assert 0 < started < len(due), log
        assert by_status == {"sent": started, "pending": len(due) - started}, by_status
        assert smtp_sink.count() == started
        assert "claimed send(s) not started, released" in log, log
        handed_back = [s for s in sends if s.status != "sent"]
        assert all(s.attempts == 0 and s.claimed_by is None for s in handed_back), handed_back
        # ... and the outbox relay published those outcomes before the exit.
        deliveries = [json.loads(r.value) for r in await everything(kafka, events.DELIVERIES)]
        assert sorted(d["invitation_id"] for d in deliveries) == sorted(
            str(s.invitation_id) for s in sends if s.status == "sent"
        )

        second = Service(
            "dispatcher", kafka, postgres, tmp_path / "dispatcher-2.log", sink=smtp_sink
        )

        async def all_sent() -> bool:
            return {s.status for s in await rows(postgres, statuses)} == {"sent"}

        await eventually(all_sent, timeout=90, what="every invitation sent")
        await eventually(
            lambda: smtp_sink.count() >= len(due), timeout=30, what="every email at the sink"
        )
        await asyncio.sleep(1.5)  # room for a duplicate to show up, if there were one
        await second.terminate()
    finally:
        for service in (first, second):
            if service is not None:
                service.kill()

    # Every due invitation was emailed exactly once (its Message-ID is <invitation id@domain>),
    # and its delivery published once.
    emailed = Counter(str(m["Message-ID"]).strip("<>").split("@")[0] for m in smtp_sink.messages)
    assert set(emailed) == ids
    assert set(emailed.values()) == {1}
    deliveries = [json.loads(r.value) for r in await everything(kafka, events.DELIVERIES)]
    assert Counter(d["invitation_id"] for d in deliveries) == Counter(ids)
    assert {d["status"] for d in deliveries} == {"sent"}
    assert "in doubt" not in second.text()


# -- the collector: invitations, answers and deliveries -----------------------------------------


async def test_collector_sigterm_mid_batch_counts_each_delivery_once(
    kafka: KafkaSettings, postgres: DatabaseSettings, tmp_path: Path
) -> None:
    await ensure_topics(kafka)
    keys = LinkKeys.parse(LinkSettings().link_keys)
    invitations = [
        email_invitation(f"gs-{i:03d}").model_copy(update={"token": keys.issue()})
        for i in range(200)
    ]
    ids = {str(inv.invitation_id) for inv in invitations}
    await produce(
        kafka,
        events.INVITATIONS,
        [(inv.customer.id, inv.model_dump_json(exclude_none=True).encode()) for inv in invitations],
    )
    delivered = "SELECT invitation_id FROM {s}.collector_invitations WHERE delivered_at IS NOT NULL"
    deliveries_group = f"{kafka.topic_prefix}collector.deliveries"
    # Batches of 50, so the restart has work left to do.
    settings = {"KAIKU_KAFKA_MAX_BATCH": "50", "KAIKU_COLLECTOR_BOT_MIN_SECONDS": "0"}

    first = Service(
        "collector",
        kafka,
        postgres,
        tmp_path / "collector-1.log",
        failpoints="collector-deliveries.before_db_commit:sleep=3",
        extra=settings,
    )
    second: Service | None = None
    try:
        # The invitations are stored; twenty customers answer on the survey page.
        await eventually(
            lambda: settled(kafka, f"{kafka.topic_prefix}collector", events.INVITATIONS),
            timeout=90,
            what="the collector to store the invitations",
        )
        answered = invitations[:20]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{first.port}") as http:
            for inv in answered:
                answer = await http.post(f"/s/{inv.token}", data={"score": "9", "comment": "ok"})
                assert answer.status_code == 303, (
                    f"answering the survey failed (HTTP {answer.status_code}), before any "
                    f"SIGTERM:\n{first.text()[-4000:]}"
                )
        # The dispatcher's outcomes arrive; the first batch sleeps in its transaction.
        now = datetime.now(UTC)
        await produce(
            kafka,
            events.DELIVERIES,
            [
                (
                    inv.customer.id,
                    DeliveryRecorded(
                        invitation_id=inv.invitation_id,
                        survey_id=inv.survey_id,
                        customer_id=inv.customer.id,
                        channel="email",
                        provider="smtp",
                        status="sent",
                        occurred_at=now,
                    )
                    .model_dump_json(exclude_none=True)
                    .encode(),
                )
                for inv in invitations
            ],
        )
        await first.wait_for_line("failpoint collector-deliveries.before_db_commit sleeping")
        before = {str(r.invitation_id) for r in await rows(postgres, delivered)}
        await first.terminate()
        log = first.text()
        assert in_order(
            log,
            "failpoint collector-deliveries.before_db_commit sleeping",
            "SIGTERM: shutting down within",
            "collector: shutting down: not ready",
            "failpoint collector-deliveries.before_db_commit woke",
            "collector: 2 of 2 consumer(s) committed their batch in hand and left their group; "
            "2 of 2 worker(s) finished their round",
            "collector stopped in",
        ), log

        # The batch in hand is counted and its offsets committed, nothing more nor less.
        done = {str(r.invitation_id) for r in await rows(postgres, delivered)}
        assert done - before, "the batch in progress at SIGTERM was not committed"
        assert len(done) < len(ids), "the first instance took more than one batch"
        offsets_agree(
            positions(await everything(kafka, events.DELIVERIES), "invitation_id"),
            done,
            await committed(kafka, deliveries_group, events.DELIVERIES),
        )
        # The relay published every answer, once.
        responses = [json.loads(r.value) for r in await everything(kafka, events.RESPONSES)]
        assert sorted(r["invitation_id"] for r in responses) == sorted(
            str(inv.invitation_id) for inv in answered
        )

        second = Service(
            "collector",
            kafka,
            postgres,
            tmp_path / "collector-2.log",
            extra=settings,
        )
        await eventually(
            lambda: settled(kafka, deliveries_group, events.DELIVERIES),
            timeout=90,
            what="the rest of the deliveries processed",
        )
        await asyncio.sleep(1.5)  # room for a duplicate to show up, if there were one
        await second.terminate()
    finally:
        for service in (first, second):
            if service is not None:
                service.kill()

    # Every invitation is counted delivered exactly once (the response rate's denominator),
    # and every answer was published exactly once.
    assert {str(r.invitation_id) for r in await rows(postgres, delivered)} == ids
    (total,) = await rows(postgres, "SELECT coalesce(sum(n), 0) FROM {s}.collector_delivery_cells")
    assert total[0] == len(ids)
    responses = [json.loads(r.value) for r in await everything(kafka, events.RESPONSES)]
    assert len({r["response_id"] for r in responses}) == len(responses) == len(answered)
    assert {r["invitation_id"] for r in responses} == {str(i.invitation_id) for i in answered}

"""What the fault tests share: the three services as processes (``python -m services.<name>``)
on the real broker, a PostgreSQL schema and an SMTP sink; killing and restarting them; producing
events fast; waiting until everything is processed; and the invariants a run must keep.

The invariants (:func:`check`) are read from what users see, not from the services' own
counters: the trigger's decision ledger, the invitations on ``kaiku.invitations``, the emails
at the SMTP server, the dispatcher's sends (``kaiku sends in-doubt``), the collector's answers and
``kaiku.responses``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.kafka import ensure_topics
from services.common.program import Program, load_program
from services.embedded import free_port
from tests.conftest import ROOT
from tests.support import SmtpSink, survey_link

PROGRAM_PATH = ROOT / "deploy/local/program.yaml"
TOKEN = "faults-" + uuid.uuid4().hex
SERVICES = ("trigger", "dispatcher", "collector")

# Every consumer group of the three services and the topic it reads (services/*/app.py).
GROUPS = (
    ("trigger", events.EVENTS),
    ("trigger.deliveries", events.DELIVERIES),
    ("trigger.responses", events.RESPONSES),
    ("trigger.optouts", events.OPTOUTS),
    ("dispatcher", events.INVITATIONS),
    ("dispatcher.responses", events.RESPONSES),
    ("dispatcher.optouts", events.OPTOUTS),
    ("collector", events.INVITATIONS),
    ("collector.deliveries", events.DELIVERIES),
)


def say(line: str) -> None:
    """A progress line on the terminal (pytest -s) and in the captured output of a failure."""
    print(f"[faults {time.strftime('%H:%M:%S')}] {line}", flush=True)


# -- the events -------------------------------------------------------------------------------


def event(customer: str, account: str, kind: str, *, at: datetime | None = None) -> dict[str, Any]:
    """A CloudEvent of ``kind`` for a customer of an account, happening now (so sends are due).
    Email only, in a daytime-irrelevant channel: the program's quiet hours are for SMS."""
    return {
        "specversion": "1.0",
        "id": f"f-{uuid.uuid4().hex}",
        "source": "chaos://crm",
        "type": kind,
        "time": (at or datetime.now(UTC)).isoformat(),
        "subject": customer,
        "data": {
            "customer": {
                "id": customer,
                "email": f"{customer}@example.com",
                "locale": "en",
                "timezone": "Europe/Helsinki",
                "account_id": account,
            },
            "touchpoint": "support",
            "team": "chaos",
        },
    }


def workload(rng: Any, n: int, customers: int = 400, accounts: int = 50) -> list[dict[str, Any]]:
    """``n`` events for ``customers`` customers spread over ``accounts`` accounts (eight each by
    default), half ``order.delivered`` and half ``ticket.solved``, in random order: the first
    event of a customer invites, later ones meet the customer's limits, and the sixth customer
    of an account meets the account's weekly limit."""
    out = []
    for _ in range(n):
        c = rng.randrange(customers)
        kind = "order.delivered" if rng.random() < 0.5 else "ticket.solved"
        out.append(event(f"cx-{c:04d}", f"acct-{c % accounts:03d}", kind))
    return out


async def produce(
    kafka: KafkaSettings, messages: Sequence[dict[str, Any]], topic: str = events.EVENTS
) -> None:
    """Put events straight onto the events topic (as a CRM's Kafka producer would), keyed by
    customer, and wait for the broker's acknowledgement of every one."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers, linger_ms=20, max_batch_size=256 * 1024
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                kafka.topic(topic),
                json.dumps(m).encode(),
                key=str(m["data"]["customer"]["id"]).encode(),
            )
            for m in messages
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


# -- the services -------------------------------------------------------------------------------


def service_env(
    name: str,
    kafka: KafkaSettings,
    db: DatabaseSettings,
    port: int,
    sink: SmtpSink | None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
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
        "KAIKU_PROGRAM": str(PROGRAM_PATH),
        "KAIKU_PORT": str(port),
        "KAIKU_API_TOKEN": TOKEN,
        "KAIKU_SHUTDOWN_SECONDS": "10",
        "KAIKU_POLL_SECONDS": "0.2",
        # Answers come within a second of the email, faster than any person: not a bot here.
        "KAIKU_COLLECTOR_BOT_MIN_SECONDS": "0",
        "KAIKU_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "KAIKU_FAILPOINTS": "",
    }
    if sink is not None:
        env.update(
            KAIKU_EMAIL_PROVIDER="smtp", KAIKU_SMTP_HOST="127.0.0.1", KAIKU_SMTP_PORT=str(sink.port)
        )
    env.update(extra or {})
    return env


class Service:
    """One service on a fixed port, through its successive processes (a kill, a restart)."""

    def __init__(self, name: str, env: dict[str, str], port: int, log: Path) -> None:
        self.name = name
        self.env = env
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n==== start {self.starts} of {self.name} ====\n".encode())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            cwd=ROOT,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """kill -9, as the kernel's OOM killer or a node failure would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    def terminate(self) -> None:
        """SIGTERM, once (a second one after the shutdown would find the default handler)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0, *, signalled: bool = False) -> int | None:
        """SIGTERM (unless ``signalled`` already), and SIGKILL if it does not exit in
        ``timeout`` s; returns the exit code."""
        if self.proc is None:
            return None
        if not signalled:
            self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, chars: int = 6000) -> str:
        return f"--- {self.name} log (last {chars} chars) ---\n{self.text()[-chars:]}"

    async def readiness(self, http: httpx.AsyncClient) -> bool | None:
        """True: ready, False: answering 503, None: not answering at all."""
        try:
            r = await http.get(f"{self.url}/readyz", timeout=5)
        except httpx.HTTPError:
            return None
        return r.status_code == 200

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                code = self.exited()
                assert code is None, f"{self.name} exited {code}:\n{self.tail()}"
                if await self.readiness(http):
                    return
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not ready within {timeout:.0f}s:\n{self.tail()}")


class Stack:
    """The three services, each on a port of its own, logging to ``logs``."""

    def __init__(
        self,
        kafka: KafkaSettings,
        db: DatabaseSettings,
        sink: SmtpSink,
        logs: Path,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.services: dict[str, Service] = {}
        for name in SERVICES:
            port = free_port()
            env = service_env(name, kafka, db, port, sink, extra)
            self.services[name] = Service(name, env, port, logs / f"{name}.log")
        # Survey links point at the collector, wherever the test started it.
        collector = self.services["collector"].url
        for s in self.services.values():
            s.env["KAIKU_PUBLIC_URL"] = collector

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    async def start(self) -> None:
        for s in self.services.values():
            s.start()
        for s in self.services.values():
            await s.wait_ready()

    def stop(self) -> dict[str, int | None]:
        """SIGTERM to all at once; their exit codes (0: a clean drain)."""
        for s in self.services.values():
            s.terminate()
        return {name: s.stop(signalled=True) for name, s in self.services.items()}

    def kill_all(self) -> None:
        for s in self.services.values():
            if s.proc is not None and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait(10)

    def died(self) -> str | None:
        """A service that exited on its own (not killed by the test), with its log."""
        for s in self.services.values():
            code = s.exited()
            if code is not None and code != -signal.SIGKILL:
                return f"{s.name} exited {code}:\n{s.tail()}"
        return None

    def logs(self) -> str:
        return "\n".join(s.tail() for s in self.services.values())


def invitation_of(msg: EmailMessage) -> str:
    """The invitation id of an email (its Message-ID is ``<invitation id@domain>``)."""
    return str(msg["Message-ID"]).strip("<>").split("@")[0]


# -- answering surveys --------------------------------------------------------------------------


@dataclass
class Answers:
    """Survey answers posted to the collector's page, as people do, while faults happen: every
    ``pace`` seconds someone among those emailed since opens the email and answers. An answer
    counts as given once the page answered 303; until then it is posted again (the person presses
    the button again) after a connection error, a 5xx, or a 404 while the collector has not yet
    stored the invitation."""

    collector: Service
    sink: SmtpSink
    rng: Any
    want: int
    pace: float = 0.0
    refusals: Counter[int] = field(default_factory=Counter)  # HTTP status (0: none) → count
    given: dict[str, int] = field(default_factory=dict)  # invitation id → score
    chosen: dict[str, tuple[str, int]] = field(default_factory=dict)  # id → (token, score)

    async def run(self, until: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            seen = 0
            pick_at = 0.0
            while len(self.given) < self.want and not until.is_set():
                if len(self.chosen) < self.want and time.monotonic() >= pick_at:
                    everyone = list(self.sink.messages)
                    # Someone emailed since the last pick, else anyone not picked yet.
                    arrived = everyone[seen:] or [
                        m for m in everyone if invitation_of(m) not in self.chosen
                    ]
                    seen = len(everyone)
                    if arrived:
                        pick_at = time.monotonic() + self.pace
                        msg = self.rng.choice(arrived)
                        self._choose(msg)
                for inv, (token, score) in list(self.chosen.items()):
                    if inv not in self.given:
                        await self._answer(http, inv, token, score)
                await asyncio.sleep(0.1)

    def _choose(self, msg: EmailMessage) -> None:
        inv = invitation_of(msg)
        token = urlsplit(survey_link(msg)).path.rsplit("/", 1)[1]
        # One score a person (1-5 fits every metric's scale): pressing the button again sends
        # the same one.
        self.chosen.setdefault(inv, (token, self.rng.randrange(1, 6)))

    async def _answer(self, http: httpx.AsyncClient, inv: str, token: str, score: int) -> None:
        try:
            r = await http.post(
                f"{self.collector.url}/s/{token}",
                data={"score": str(score), "comment": "chaos"},
                follow_redirects=False,
            )
        except httpx.HTTPError:
            self.refusals[0] += 1  # no answer at all (the collector is down)
            return
        if r.status_code == 303:
            self.given[inv] = score
        elif r.status_code in (404, 500, 502, 503):
            self.refusals[r.status_code] += 1
        else:
            raise AssertionError(f"answering {inv}: HTTP {r.status_code}: {r.text[:500]}")


# -- reading the broker and the database -------------------------------------------------------


class Topics:
    """Every record of the run's topics, read from the beginning as they come, by one consumer
    outside any group.

    The ends of the partitions are the offsets read, not the broker's: the embedded broker
    (Tansu 0.6, in memory) answers ListOffsets(latest) with a stale offset once several
    producers have written one partition (125 for a partition holding 164 records), so
    ``end_offsets`` would stop a reader, and a lag computed from it, short."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.records: dict[str, list[ConsumerRecord]] = defaultdict(list)
        self.ends: dict[tuple[str, int], int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._empty: list[float] = []  # when the last fetches found nothing new

    async def start(self) -> None:
        await ensure_topics(self.kafka)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap_servers,
            enable_auto_commit=False,
            group_id=None,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await self._consumer.start()
        await self._consumer.topics()
        parts = []
        for name in events.ALL_TOPICS:
            topic = self.kafka.topic(name)
            partitions = self._consumer.partitions_for_topic(topic)
            assert partitions, f"topic {topic} does not exist"
            parts += [TopicPartition(topic, p) for p in partitions]
        self._consumer.assign(parts)
        await self._consumer.seek_to_beginning(*parts)
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        prefix = len(self.kafka.topic_prefix)
        while True:
            started = time.monotonic()
            batch = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            if not any(batch.values()):
                self._empty = [*self._empty[-1:], started]
            for tp, rs in batch.items():
                if rs:
                    self.records[tp.topic[prefix:]].extend(rs)
                    self.ends[(tp.topic[prefix:], tp.partition)] = rs[-1].offset + 1

    async def caught_up(self, timeout: float = 60.0) -> None:
        """Wait until two fetches in a row that began after this call found nothing new."""
        asked = time.monotonic()
        while len(self._empty) < 2 or self._empty[0] < asked:
            assert self._task is not None and not self._task.done(), "the topic reader died"
            assert time.monotonic() - asked < timeout, "the topics are still growing"
            await asyncio.sleep(0.05)

    def of(self, name: str) -> list[ConsumerRecord]:
        return list(self.records[name])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()


async def lags(kafka: KafkaSettings, topics: Topics) -> dict[str, int]:
    """Per consumer group of the services: records of its topic not committed yet."""
    await topics.caught_up()
    out = {}
    for group, name in GROUPS:
        # Names the group but subscribes to nothing: reads its commits without joining it.
        member = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers,
            group_id=f"{kafka.topic_prefix}{group}",
            enable_auto_commit=False,
        )
        await member.start()
        try:
            behind = 0
            for (topic, partition), end in topics.ends.items():
                if topic == name:
                    tp = TopicPartition(kafka.topic(name), partition)
                    behind += max(0, end - (await member.committed(tp) or 0))
        finally:
            await member.stop()
        out[group] = behind
    return out


class Database:
    """Read-only queries on the test's schema (``{s}`` in SQL stands for it)."""

    def __init__(self, db: DatabaseSettings) -> None:
        self.db = db
        self.engine: AsyncEngine = create_async_engine(db.url, pool_pre_ping=True)

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            result = await conn.execute(text(sql.format(s=f'"{self.db.schema_name}"')), params)
            return list(result.all())

    async def close(self) -> None:
        await self.engine.dispose()


async def unfinished(kafka: KafkaSettings, topics: Topics, db: Database) -> str | None:
    """What is still in progress, or None once everything is processed: every consumer group
    has committed its topic's end, no due send waits or is in flight, and every send outcome and
    answer is published."""
    behind = {g: n for g, n in (await lags(kafka, topics)).items() if n}
    if behind:
        return f"consumer lag {behind}"
    (sends,) = await db.rows(
        "SELECT count(*) FILTER (WHERE status = 'pending' AND send_at <= now()),"
        " count(*) FILTER (WHERE status IN ('claimed', 'sending')),"
        " count(*) FILTER (WHERE status IN ('sent', 'failed', 'in_doubt')"
        "   AND delivery_published_at IS NULL)"
        " FROM {s}.dispatcher_sends"
    )
    if any(sends):
        return f"sends due {sends[0]}, in flight {sends[1]}, outcomes unpublished {sends[2]}"
    (answers,) = await db.rows(
        "SELECT count(*) FROM {s}.collector_responses WHERE published_at IS NULL"
    )
    if answers[0]:
        return f"{answers[0]} answer(s) unpublished"
    return None


async def quiesce(
    kafka: KafkaSettings, topics: Topics, db: Database, stack: Stack, timeout: float = 180.0
) -> float:
    """Wait until nothing is in progress (twice in a row, a second apart); returns the seconds."""
    started = time.monotonic()
    calm = 0
    last: str | None = "not looked yet"
    while calm < 2:
        died = stack.died()
        assert died is None, died
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not quiescent after {timeout:.0f}s: {last}\n{stack.logs()}")
        last = await unfinished(kafka, topics, db)
        calm = calm + 1 if last is None else 0
        await asyncio.sleep(1.0)
    return time.monotonic() - started


async def in_doubt_cli(db: DatabaseSettings) -> list[dict[str, Any]]:
    """``kaiku sends in-doubt --format json``, as an operator runs it."""
    env = {
        **os.environ,
        "KAIKU_DATABASE_URL": db.url,
        "KAIKU_DATABASE_SCHEMA": db.schema_name or "",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "sends",
        "in-doubt",
        "--format",
        "json",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"kaiku sends in-doubt failed: {err.decode()}"
    listed: list[dict[str, Any]] = json.loads(out)
    return listed


# -- the invariants -------------------------------------------------------------------------------


def fatigue_violations(program: Program, invitations: Iterable[dict[str, Any]]) -> list[str]:
    """Every fatigue limit and quota of ``program`` over the invitations actually published (the
    cancelled ones left out): for each rule, no key has more than ``limit`` invitations in any
    rolling window (t - window, t]; for each quota, no period more than its limit."""
    from services.trigger.fatigue import quota_period

    invs = list(invitations)
    problems = []
    for rule in program.fatigue.rules:
        assert rule.clock == "invited", f"the checker counts the invited clock only: {rule.id}"
        groups: dict[tuple[str, ...], list[datetime]] = defaultdict(list)
        for inv in invs:
            customer = inv["customer"]
            if rule.channel not in ("any", inv["channel"]):
                continue
            key = {
                "customer": customer["id"],
                "account": customer.get("account_id"),
                "contact": customer.get("email" if inv["channel"] == "email" else "phone"),
            }[rule.key]
            if key is None:
                continue
            scope = {"global": "", "survey": inv["survey_id"], "trigger": inv["trigger_id"]}
            groups[(key, scope[rule.scope])].append(datetime.fromisoformat(inv["send_at"]))
        for key, times in groups.items():
            times.sort()
            for t in times:
                inside = bisect_right(times, t) - bisect_right(times, t - rule.window)
                if inside > rule.limit:
                    problems.append(
                        f"{rule.id}: {key} has {inside} invitations in the {rule.window} "
                        f"ending {t.isoformat()} (limit {rule.limit})"
                    )
                    break
    zone = program.defaults.timezone
    for quota in program.quotas:
        per: Counter[datetime] = Counter()
        for inv in invs:
            if inv["survey_id"] == quota.survey:
                start, _ = quota_period(datetime.fromisoformat(inv["send_at"]), quota.per, zone)
                per[start] += 1
        problems += [
            f"quota {quota.survey}/{quota.per}: {n} from {start} (limit {quota.limit})"
            for start, n in per.items()
            if n > quota.limit
        ]
    return problems


@dataclass
class Report:
    events: int
    decisions: Counter[str]
    invited: int
    due: int
    emailed: int
    in_doubt: int
    answers: int
    response_messages: int
    response_repeats: int

    def line(self) -> str:
        return (
            f"{self.events} events, decisions {dict(self.decisions)}, {self.invited} invitations "
            f"({self.due} due), {self.emailed} emailed, {self.in_doubt} in doubt, "
            f"{self.answers} answers ({self.response_messages} messages on responses, "
            f"{self.response_repeats} of them a repeat of the same revision)"
        )


async def check(
    topics: Topics,
    dbs: DatabaseSettings,
    db: Database,
    sink: SmtpSink,
    *,
    accepted: Iterable[str],
    refused: Iterable[str] = (),
    answers: dict[str, int] | None = None,
    max_in_doubt: int = 0,
) -> Report:
    """The invariants of a run, after :func:`quiesce`:

    - every accepted event has exactly one decision (invited, deferred, skipped, ignored) in the
      trigger's ledger, and no refused event has any; the only other rows are the cancellations
      an event makes of older pending invitations (coalescing, ``cancel_on``);
    - no dead letter;
    - no fatigue limit or quota of the program is exceeded by the invitations published;
    - each published invitation is one send, emailed at most once (by Message-ID), and each
      due one that was not cancelled exactly once, unless it is ``in_doubt`` (a kill between
      the claim and the record of a send), which ``kaiku sends in-doubt`` lists; at most
      ``max_in_doubt`` of those;
    - every answer given (303) is in the collector's table with its score, once, and on
      ``kaiku.responses`` under one response id; the last message of each has its score.
    """
    program = load_program(PROGRAM_PATH)
    accepted = set(accepted)
    refused = set(refused)

    # The decision ledger.
    ledger = await db.rows("SELECT event_id, decision FROM {s}.trigger_decisions")
    per_event = Counter(r.event_id for r in ledger if r.decision != "cancelled")
    missing = accepted - set(per_event)
    twice = {e: n for e, n in per_event.items() if n != 1}
    stray = set(per_event) - accepted - refused
    assert not missing, (
        f"{len(missing)} accepted event(s) without a decision: {sorted(missing)[:5]}"
    )
    assert not twice, f"{len(twice)} event(s) with several decisions: {list(twice.items())[:5]}"
    assert not stray, f"decisions for events never sent: {sorted(stray)[:5]}"
    decided_refused = refused & set(per_event)
    assert not decided_refused, (
        f"{len(decided_refused)} event(s) refused with 503 were stored and decided anyway: "
        f"{sorted(decided_refused)[:5]}"
    )
    await topics.caught_up()
    dead = topics.of(events.DLQ)
    assert not dead, f"{len(dead)} dead letter(s): {[dict(r.headers) for r in dead[:3]]}"

    # The invitations published (a redelivered event publishes the same one again: count once).
    requested: dict[str, dict[str, Any]] = {}
    cancelled: set[str] = set()
    for record in topics.of(events.INVITATIONS):
        message = json.loads(record.value)
        if "token" in message:
            previous = requested.setdefault(message["invitation_id"], message)
            assert previous == message, (
                f"invitation {message['invitation_id']} re-published changed"
            )
        else:
            cancelled.add(message["invitation_id"])
    invited_ids = {
        str(r.invitation_id)
        for r in await db.rows("SELECT invitation_id FROM {s}.trigger_invitations")
    }
    unpublished, unstored = invited_ids - set(requested), set(requested) - invited_ids
    assert not unpublished and not unstored, (
        f"invitations stored, never published: {len(unpublished)} {sorted(unpublished)[:3]}; "
        f"published, not stored: {len(unstored)} {sorted(unstored)[:3]}"
    )
    live = [m for i, m in requested.items() if i not in cancelled]
    problems = fatigue_violations(program, live)
    assert not problems, "fatigue limits exceeded:\n" + "\n".join(problems[:20])

    # The emails.
    emailed = Counter(invitation_of(m) for m in sink.messages)
    again = {i: n for i, n in emailed.items() if n > 1}
    assert not again, f"{len(again)} invitation(s) emailed more than once: {again}"
    unknown = set(emailed) - set(requested)
    assert not unknown, f"emails for invitations never published: {sorted(unknown)[:5]}"
    sends = {
        str(r.invitation_id): r
        for r in await db.rows(
            "SELECT invitation_id, status, send_at FROM {s}.dispatcher_sends"
            " WHERE kind = 'invitation'"
        )
    }
    assert set(sends) == set(requested), "the dispatcher's sends and the invitations differ"
    now = datetime.now(UTC)
    due = {
        i
        for i, m in requested.items()
        if i not in cancelled and datetime.fromisoformat(m["send_at"]) <= now - timedelta(seconds=1)
    }
    doubt = {i for i, s in sends.items() if s.status == "in_doubt"}
    listed = {r["invitation_id"] for r in await in_doubt_cli(dbs)}
    assert listed == doubt, f"kaiku sends in-doubt lists {listed}, the table {doubt}"
    assert len(doubt) <= max_in_doubt, f"{len(doubt)} sends in doubt (at most {max_in_doubt})"
    not_sent = {i: sends[i].status for i in due - set(emailed) - doubt}
    assert not not_sent, f"{len(not_sent)} due invitation(s) never emailed: {not_sent}"
    wrong = {
        i: sends[i].status for i in set(emailed) if sends[i].status not in ("sent", "in_doubt")
    }
    assert not wrong, f"emailed, yet recorded otherwise: {wrong}"
    early = set(emailed) - due
    assert not early, f"emailed before their time or after a cancellation: {sorted(early)[:5]}"

    # The answers.
    given = answers or {}
    stored = {
        str(r.invitation_id): r
        for r in await db.rows(
            "SELECT invitation_id, response_id, score, revision, suspected_bot"
            " FROM {s}.collector_responses"
        )
    }
    lost = set(given) - set(stored)
    assert not lost, f"{len(lost)} answer(s) given (303) but not stored: {sorted(lost)[:5]}"
    changed = {i: (s, stored[i].score) for i, s in given.items() if stored[i].score != s}
    assert not changed, f"answers stored with another score: {changed}"
    assert not any(stored[i].suspected_bot for i in given), "an answer taken for a bot's"
    on_topic: dict[str, list[dict[str, Any]]] = defaultdict(list)
    responses = topics.of(events.RESPONSES)
    for record in responses:
        message = json.loads(record.value)
        on_topic[message["invitation_id"]].append(message)
    for inv, score in given.items():
        published = on_topic.get(inv)
        assert published, f"answer to {inv} not on kaiku.responses"
        assert {m["response_id"] for m in published} == {str(stored[inv].response_id)}, (
            f"answer to {inv} published under several response ids"
        )
        last = max(published, key=lambda m: int(m["revision"]))
        assert last["score"] == score and last["revision"] == stored[inv].revision, inv
    # The relay publishes, then marks: killed in between, it publishes that revision again (a
    # repeat consumers ignore). Counted, not refused.
    revisions = {(m["response_id"], m["revision"]) for ms in on_topic.values() for m in ms}
    extra = set(on_topic) - set(given)
    assert not extra, f"answers published that nobody gave: {sorted(extra)[:5]}"

    return Report(
        events=len(accepted),
        decisions=Counter(r.decision for r in ledger),
        invited=len(live),
        due=len(due),
        emailed=len(emailed),
        in_doubt=len(doubt),
        answers=len(given),
        response_messages=len(responses),
        response_repeats=len(responses) - len(revisions),
    )


class Run:
    """One run of the three services: their processes, the topics as read, the database, the
    SMTP sink; ``finish`` waits for quiescence, stops them (SIGTERM, each must exit 0) and
    checks the invariants."""

    def __init__(
        self,
        kafka: KafkaSettings,
        db: DatabaseSettings,
        sink: SmtpSink,
        logs: Path,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.kafka = kafka
        self.dbs = db
        self.sink = sink
        self.stack = Stack(kafka, db, sink, logs, extra)
        self.db = Database(db)
        self.topics = Topics(kafka)

    def __getitem__(self, name: str) -> Service:
        return self.stack[name]

    async def __aenter__(self) -> Run:
        await self.topics.start()  # creates the topics
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stack.kill_all()
        await self.topics.stop()
        await self.db.close()

    async def lags(self) -> dict[str, int]:
        return await lags(self.kafka, self.topics)

    async def quiesce(self, timeout: float = 180.0) -> float:
        return await quiesce(self.kafka, self.topics, self.db, self.stack, timeout)

    async def finish(
        self,
        *,
        accepted: Iterable[str],
        refused: Iterable[str] = (),
        answers: dict[str, int] | None = None,
        max_in_doubt: int = 0,
        timeout: float = 180.0,
    ) -> Report:
        took = await self.quiesce(timeout)
        say(f"quiescent in {took:.1f}s")
        codes = self.stack.stop()
        assert all(c == 0 for c in codes.values()), f"exit codes {codes}\n{self.stack.logs()}"
        report = await check(
            self.topics,
            self.dbs,
            self.db,
            self.sink,
            accepted=accepted,
            refused=refused,
            answers=answers,
            max_in_doubt=max_in_doubt,
        )
        say(report.line())
        return report

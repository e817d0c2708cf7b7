"""The one consumer loop, the producer, and the dead-letter topic.

Every service consumes through :class:`ConsumerLoop`:

    getmany → decode (invalid → dead letter) → handler in one unit of work → DB commit
            → produce what the handler returned and await delivery → commit offset + 1

Handlers are plain async functions of a batch of decoded messages and a session; they *return* what
to publish. Offsets are committed only after the database transaction and the produce succeeded, so
processing is at-least-once; handlers are idempotent on a unique key and re-emit on redelivery, so
effects happen once.

Failures come in three kinds. Invalid input goes to the dead-letter topic with the reason in its
headers, then is committed; a breaker stops the consumer when most of a window goes there, so a bad
deploy cannot drain a topic. Transient failures (database or broker unreachable) retry the batch
with bounded exponential back-off. Anything else is a bug: the loop stops without committing and the
service reports itself unhealthy, so the orchestrator restarts it from the last commit.

Stopping (SIGTERM) takes no new batch, finishes the one in hand through its offset commit, then
leaves the group, so the partitions' next owner starts after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
)
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, TypeAdapter, ValidationError
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.common import events
from services.common.config import KafkaSettings
from services.common.db import unit_of_work
from services.common.faults import afailpoint

log = logging.getLogger(__name__)

M = TypeVar("M")
T = TypeVar("T")

CONSUMED = Counter("kaiku_messages_consumed_total", "Messages consumed", ["consumer", "topic"])
DEAD_LETTERED = Counter(
    "kaiku_messages_dead_lettered_total", "Messages sent to the dead-letter topic", ["consumer"]
)
PRODUCED = Counter("kaiku_messages_produced_total", "Messages produced", ["topic"])
BATCH_SECONDS = Histogram(
    "kaiku_batch_seconds", "Time to process one consumer batch end to end", ["consumer"]
)
RETRIES = Counter(
    "kaiku_transient_retries_total", "Batches retried after a transient error", ["consumer"]
)
LAG = Gauge("kaiku_consumer_lag", "Messages behind the partition end", ["consumer", "partition"])

DLQ_HEADER_PREFIX = "kaiku-dlq-"


class InvalidMessage(Exception):
    """A message that can never be processed; it goes to the dead-letter topic with this reason."""


class TooManyDeadLetters(RuntimeError):
    """The breaker tripped: most recent messages were invalid, so the consumer stops."""


@dataclass(frozen=True)
class Outgoing:
    """A message to publish: the topic name without prefix, the key, and the payload."""

    topic: str
    key: str
    value: BaseModel | bytes
    headers: tuple[tuple[str, bytes], ...] = ()

    def encode(self) -> bytes:
        if isinstance(self.value, bytes):
            return self.value
        return self.value.model_dump_json(exclude_none=True).encode()


@dataclass(frozen=True)
class Incoming(Generic[M]):
    record: ConsumerRecord
    message: M


@dataclass(frozen=True)
class Rejected:
    """A message the handler refuses for good (invalid in a way only the handler can see)."""

    record: ConsumerRecord
    reason: str


@dataclass
class HandlerResult:
    publish: list[Outgoing] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


Handler = Callable[[list[Incoming[M]], AsyncSession], Awaitable[HandlerResult]]
# Runs on a decoded batch before the transaction opens: enrichment that calls other systems.
Prepare = Callable[[list[Incoming[M]]], Awaitable[list[Incoming[M]]]]
Decoder = Callable[[ConsumerRecord], M]


def validation_reason(error: ValidationError) -> str:
    """A readable reason naming each failing field, without echoing the input (it may hold PII)."""
    parts = []
    for err in error.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def json_decoder(model: type[BaseModel] | TypeAdapter[Any]) -> Decoder[Any]:
    """Decode a structured JSON record into ``model`` (a model or a TypeAdapter of a tagged
    union); anything else is an invalid message."""
    validate = model.validate_json if isinstance(model, TypeAdapter) else model.model_validate_json

    def decode(record: ConsumerRecord) -> Any:
        if record.value is None:
            raise InvalidMessage("empty message value")
        try:
            # Walking a decoded model for NUL characters and depth costs more than the rest of
            # its validation; JSON text that cannot hold either skips it.
            storable = events.json_storable(record.value)
            return validate(record.value, context=events.STORABLE_JSON if storable else None)
        except ValidationError as exc:
            if any(e["type"] == "json_invalid" for e in exc.errors()):
                raise InvalidMessage(f"malformed JSON: {exc.errors()[0]['msg']}") from exc
            raise InvalidMessage(f"schema violation: {validation_reason(exc)}") from exc

    return decode


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the database or the broker is (briefly) unreachable or busy."""
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
        if code in {"40001", "40P01", "57P01", "57P02", "57P03", "53300"}:
            return True
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
            return True
    return isinstance(exc, sa_exc.TimeoutError | KafkaError | OSError | TimeoutError)


def _client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl.create_default_context()
    if settings.sasl_mechanism:
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return kwargs


def retention_ms(settings: KafkaSettings, name: str) -> int:
    """The ``retention.ms`` a topic of kaiku is created with (``name`` without the prefix)."""
    return settings.dlq_retention_ms if name == events.DLQ else settings.retention_ms


def new_topic(settings: KafkaSettings, name: str) -> NewTopic:
    """How kaiku creates topic ``name`` (without the prefix), at start (``ensure_topics``) and by
    ``kaiku topics create``: the settings' partitions, replication factor and retention."""
    return NewTopic(
        settings.topic(name),
        settings.partitions,
        settings.replication_factor,
        topic_configs={"retention.ms": str(retention_ms(settings, name))},
    )


async def ensure_topics(settings: KafkaSettings, names: Sequence[str] = events.ALL_TOPICS) -> None:
    """Create the topics that are missing (idempotent), with the settings' partitions,
    replication factor and retention (as ``kaiku topics create`` does); an existing topic is
    left as it is."""
    admin = AIOKafkaAdminClient(**_client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [new_topic(settings, n) for n in names if settings.topic(n) not in existing]
        if not new:
            return
        try:
            await admin.create_topics(new)
        except TopicAlreadyExistsError:  # another replica won the race
            pass
        log.info("created topics %s", ", ".join(t.name for t in new))
    finally:
        await admin.close()


class Producer:
    """The service's one producer; ``publish`` returns once the broker acknowledged every one.

    A publish abandoned by its caller (an ingress that stopped waiting and answered 503) stays
    queued in the client and is still written once the broker answers again: a timeout means
    "not known to be stored", never "not stored". ``stalled`` says that sends have waited
    longer than a given time for the broker, so an ingress can refuse at once instead of
    queueing more messages it would then refuse too (and which would be stored later)."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        # The start times of the publishes still waiting for the broker's acknowledgement.
        self._waiting: dict[int, float] = {}

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            **_client_kwargs(self.settings),
            acks="all",
            enable_idempotence=self.settings.enable_idempotence,
            linger_ms=2,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if self._producer is None:
            raise KafkaConnectionError("the producer is not started")
        futures = []
        for m in messages:
            topic = self.settings.topic(m.topic)
            futures.append(
                await self._producer.send(
                    topic, m.encode(), key=m.key.encode(), headers=list(m.headers)
                )
            )
            PRODUCED.labels(topic=m.topic).inc()
        if not futures:
            return
        acknowledged = asyncio.gather(*futures)
        key = id(acknowledged)
        self._waiting[key] = time.monotonic()

        def settled(done: asyncio.Future[list[Any]]) -> None:
            self._waiting.pop(key, None)
            if not done.cancelled():
                done.exception()  # retrieved here; the caller, if still waiting, gets it too

        acknowledged.add_done_callback(settled)
        # Shielded: a caller that stops waiting leaves the sends to finish (they are queued in
        # the client either way), so that ``stalled`` keeps counting them until they do.
        await asyncio.shield(acknowledged)

    def stalled(self, seconds: float) -> bool:
        """Some publish has waited more than ``seconds`` for the broker and still waits."""
        oldest = min(self._waiting.values(), default=None)
        return oldest is not None and time.monotonic() - oldest > seconds

    async def ping(self) -> bool:
        if self._producer is None or self.stalled(self.settings.produce_timeout_seconds):
            return False
        try:
            async with asyncio.timeout(self.settings.produce_timeout_seconds):
                await self._producer.client.fetch_all_metadata()
        except Exception:  # readiness only reports
            log.warning("broker is not reachable", exc_info=True)
            return False
        return True


def dead_letter_of(
    key: str,
    value: bytes,
    reason: str,
    *,
    origin: str,
    consumer: str,
    error: str,
    headers: Sequence[tuple[str, bytes]] = (),
    position: tuple[int, int] | None = None,
) -> Outgoing:
    """A dead letter: the original bytes, key and headers, plus why and where from (``origin``
    is a topic name, or ``webhook:<source>`` for a webhook item; ``position`` its partition and
    offset)."""
    kept = [(k, v) for k, v in headers if not k.startswith(DLQ_HEADER_PREFIX)]
    kept += [
        (f"{DLQ_HEADER_PREFIX}reason", reason[:4000].encode()),
        (f"{DLQ_HEADER_PREFIX}error", error.encode()),
        (f"{DLQ_HEADER_PREFIX}topic", origin.encode()),
    ]
    if position is not None:
        kept += [
            (f"{DLQ_HEADER_PREFIX}partition", str(position[0]).encode()),
            (f"{DLQ_HEADER_PREFIX}offset", str(position[1]).encode()),
        ]
    kept += [
        (f"{DLQ_HEADER_PREFIX}consumer", consumer.encode()),
        (f"{DLQ_HEADER_PREFIX}at", datetime.now(UTC).isoformat().encode()),
    ]
    return Outgoing(events.DLQ, key, value, tuple(kept))


def dead_letter(
    record: ConsumerRecord, reason: str, *, consumer: str, error: str = "InvalidMessage"
) -> Outgoing:
    """A consumed record that cannot be processed, as a dead letter."""
    return dead_letter_of(
        record.key.decode(errors="replace") if record.key else "",
        record.value or b"",
        reason,
        origin=record.topic,
        consumer=consumer,
        error=error,
        headers=record.headers or (),
        position=(record.partition, record.offset),
    )


class _ForgetLag(ConsumerRebalanceListener):  # type: ignore[misc]
    """Drops a consumer's lag gauge for the partitions it loses in a rebalance: their new owner
    reports them, and a stale value left here would count twice in a sum over the pods (what
    the autoscaling and the lag alert read). Forgets what it committed there too."""

    def __init__(self, consumer: str, committed: dict[TopicPartition, int]) -> None:
        self.consumer = consumer
        self.committed = committed

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self.committed.pop(tp, None)
            with contextlib.suppress(KeyError):
                LAG.remove(self.consumer, str(tp.partition))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        pass


class ConsumerLoop(Generic[M]):
    """Consume one topic in a consumer group and run ``handler`` on each batch."""

    def __init__(
        self,
        *,
        name: str,
        topic: str,
        group_id: str,
        decode: Decoder[M],
        handler: Handler[M],
        sessions: async_sessionmaker[AsyncSession],
        producer: Producer,
        settings: KafkaSettings,
        max_transient_retries: int = 8,
        after_batch: Callable[[], None] | None = None,
        prepare: Prepare[M] | None = None,
    ) -> None:
        self.prepare = prepare
        self.name = name
        self.topic = topic
        self.group_id = group_id
        self.decode = decode
        self.handler = handler
        self.sessions = sessions
        self.producer = producer
        self.settings = settings
        self.max_transient_retries = max_transient_retries
        self.after_batch = after_batch
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lag_task: asyncio.Task[None] | None = None
        # The next offset to process of each partition, as last committed here.
        self._committed: dict[TopicPartition, int] = {}
        self._recent: deque[bool] = deque(maxlen=settings.dlq_breaker_window)
        self.error: BaseException | None = None
        self.processed = 0

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._stopping = asyncio.Event()
        self.error = None
        self._consumer = AIOKafkaConsumer(
            **_client_kwargs(self.settings),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.settings.max_batch,
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
        )
        self._committed = {}
        self._consumer.subscribe(
            [self.settings.topic(self.topic)], listener=_ForgetLag(self.name, self._committed)
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")
        self._lag_task = asyncio.create_task(self._refresh_lag(), name=f"lag-{self.name}")

    @property
    def healthy(self) -> bool:
        return self._task is not None and not self._task.done() and self.error is None

    def request_stop(self) -> None:
        """Take no new batch; the one in hand is still finished and committed."""
        self._stopping.set()

    async def stop(self, timeout: float | None = None) -> bool:
        """Drain: finish the batch in hand, commit it, leave the group. A batch not finished
        within ``timeout`` seconds is abandoned uncommitted: the partitions' next owner redoes
        it, which the handlers' idempotency makes harmless. Returns whether it drained."""
        self._stopping.set()
        drained = True
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
            self._lag_task = None
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=timeout)
            if not done:
                drained = False
                log.warning(
                    "consumer %s: the batch in hand did not finish within %.1fs; abandoned "
                    "uncommitted (the next owner redoes it)",
                    self.name,
                    timeout or 0.0,
                )
                self._task.cancel()
                await asyncio.wait({self._task})
        if self._consumer is not None:
            await self._consumer.stop()  # leaves the group: its partitions move on at once
            self._consumer = None
        return drained

    # -- the loop --------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._consumer is not None
        try:
            while not self._stopping.is_set():
                batches = await self._consumer.getmany(
                    timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.max_batch
                )
                records = [r for rs in batches.values() for r in rs]
                if not records:
                    continue
                if self._stopping.is_set():
                    break  # fetched during the stop, not started: the next owner takes it
                started = time.perf_counter()
                await self._process(records)
                await self._commit(batches)
                BATCH_SECONDS.labels(consumer=self.name).observe(time.perf_counter() - started)
                self._record_lag(batches)
                self.processed += len(records)
                if self.after_batch is not None:
                    self.after_batch()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            log.critical("consumer %s stopped: %s", self.name, exc, exc_info=True)
            raise

    async def _process(self, records: list[ConsumerRecord]) -> None:
        CONSUMED.labels(consumer=self.name, topic=self.topic).inc(len(records))
        good: list[Incoming[M]] = []
        dead: list[Outgoing] = []
        for record in records:
            try:
                good.append(Incoming(record, self.decode(record)))
            except InvalidMessage as exc:
                log.warning(
                    "dead-lettering %s[%d]@%d: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
                dead.append(dead_letter(record, str(exc), consumer=self.name))
        if good and self.prepare is not None:
            good = await self.prepare(good)
        result = await self._handle(good) if good else HandlerResult()
        for rejected in result.rejected:
            dead.append(
                dead_letter(rejected.record, rejected.reason, consumer=self.name, error="Rejected")
            )
        self._breaker(len(records), len(dead))
        await afailpoint(f"{self.name}.after_db_commit")
        await self._publish(result.publish + dead)
        await afailpoint(f"{self.name}.after_produce")
        if dead:
            DEAD_LETTERED.labels(consumer=self.name).inc(len(dead))

    async def _handle(self, batch: list[Incoming[M]]) -> HandlerResult:
        async def once() -> HandlerResult:
            async with unit_of_work(self.sessions) as session:
                result = await self.handler(batch, session)
                await afailpoint(f"{self.name}.before_db_commit")
                return result

        return await self._retrying("handle", once)

    async def _publish(self, messages: list[Outgoing]) -> None:
        await self._retrying("produce", lambda: self.producer.publish(messages))

    async def _retrying(self, what: str, attempt_once: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt_once``, retrying transient failures (database or broker away) with
        bounded exponential back-off and jitter; anything else, or the last failure, raises."""
        for attempt in range(self.max_transient_retries + 1):
            try:
                return await attempt_once()
            except Exception as exc:
                if not is_transient(exc) or attempt == self.max_transient_retries:
                    raise
                RETRIES.labels(consumer=self.name).inc()
                delay = min(30.0, 0.2 * 2**attempt) * (0.5 + random.random())
                log.warning(
                    "consumer %s: %s failed (%s), retrying in %.1fs",
                    self.name,
                    what,
                    type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _commit(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        assert self._consumer is not None
        offsets = {tp: rs[-1].offset + 1 for tp, rs in batches.items() if rs}
        try:
            await self._consumer.commit(offsets)
            self._committed.update(offsets)
        except CommitFailedError:
            # The group rebalanced while we worked: the new owner gets these messages again and
            # the handlers' idempotency makes that harmless.
            log.warning("consumer %s: offset commit lost to a rebalance", self.name)

    def _breaker(self, total: int, dead: int) -> None:
        self._recent.extend([True] * dead + [False] * (total - dead))
        window = self._recent.maxlen or 0
        if (
            len(self._recent) >= window
            and sum(self._recent) > window * self.settings.dlq_breaker_ratio
        ):
            raise TooManyDeadLetters(
                f"{sum(self._recent)} of the last {len(self._recent)} messages were invalid; "
                "stopping so a bad producer or deploy does not drain the topic"
            )

    async def _refresh_lag(self) -> None:
        """Every ``lag_refresh_seconds``: each owned partition's end offset minus the next offset
        to process (committed here, else in the group, else the partition's first: the group
        starts at the earliest), whatever the loop is doing. A consumer
        stuck on a batch (the database away, a slow handler) then shows its lag growing, and
        the lag alert fires, where ``_record_lag`` alone would keep the last batch's value."""
        while True:
            await asyncio.sleep(self.settings.lag_refresh_seconds)
            consumer = self._consumer
            if consumer is None:
                return
            owned = set(consumer.assignment())
            if not owned:
                continue
            try:
                ends = await consumer.end_offsets(list(owned))
                for tp in owned:
                    done = self._committed.get(tp)
                    if done is None:
                        done = await consumer.committed(tp)
                    if done is None:  # nothing committed in the group: it starts at the first
                        done = (await consumer.beginning_offsets([tp]))[tp]
                    if tp in consumer.assignment():
                        LAG.labels(consumer=self.name, partition=str(tp.partition)).set(
                            max(0, ends[tp] - done)
                        )
            except KafkaError as exc:
                log.debug("consumer %s: lag not refreshed (%s)", self.name, type(exc).__name__)

    def _record_lag(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        assert self._consumer is not None
        for tp, rs in batches.items():
            high = self._consumer.highwater(tp)
            if high is not None and rs:
                LAG.labels(consumer=self.name, partition=str(tp.partition)).set(
                    max(0, high - rs[-1].offset - 1)
                )

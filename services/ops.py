"""``kaiku topics create`` and ``kaiku dlq list|replay``: the operator's side of the topics.

Topics. ``topics create`` makes every kaiku topic that is missing with ``KAIKU_KAFKA_PARTITIONS``,
``_REPLICATION_FACTOR`` and ``_RETENTION_MS`` (``_DLQ_RETENTION_MS`` for the dead letters), and
reports each existing one as it is: a partition count, replication factor or retention that
differs from the settings is reported, never changed (adding partitions moves customers to other
partitions and breaks their order; that is a decision for a person). See docs/topics.md.

Dead letters. ``dlq list`` and ``dlq replay`` read ``<prefix>dlq`` from its beginning up to the end
offsets taken when they start, with a consumer that belongs to no group (its partitions assigned
explicitly, nothing committed), so they never disturb one another or anyone else. Output carries
the ``kaiku-dlq-*`` headers the consumer loop writes (``services.common.kafka.dead_letter_of``),
never a message body unless asked (``--show-body``), and then with contact details and
secret-looking fields masked. Keys and reasons are masked too.

Replay markers. ``dlq replay`` republishes a dead letter to its original topic and partition with
its original key, bytes and headers plus ``kaiku-replayed-from: <dlq>[<partition>]@<offset>``;
once the broker acknowledged that copy it writes a *replay marker* to the dead-letter topic
itself, on the dead letter's own partition: a small JSON value (no personal data) and the headers
``kaiku-replay-of`` (the dead letter), ``kaiku-replayed-to`` (where the copy landed) and
``kaiku-replayed-at``. A later replay reads the markers in the same pass as the dead letters and
skips every dead letter that has one, unless ``--again``. One topic, so the markers are read with
what they mark, live exactly as long (same retention; a marker is younger than its dead letter),
and need no extra topic, group or state. A crash between a copy and its marker replays that one
dead letter again on the next run; every consumer is idempotent, so the effect is still once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
    for_code,
)
from pydantic import ValidationError

from services.common import events
from services.common.config import KafkaSettings
from services.common.kafka import DLQ_HEADER_PREFIX, _client_kwargs, new_topic, retention_ms

# On a replayed message: the dead letter it is a copy of.
REPLAYED_FROM = "kaiku-replayed-from"
# On a replay marker (on the dead-letter topic): the dead letter replayed, where and when.
REPLAY_OF = "kaiku-replay-of"
REPLAYED_TO = "kaiku-replayed-to"
REPLAYED_AT = "kaiku-replayed-at"

CONNECT_TIMEOUT_SECONDS = 30.0
# Reading the dead-letter topic fails when no record arrives for this long before its end.
READ_STALL_SECONDS = 60.0
# Copies produced (and awaited) before their markers are; a crash repeats at most one chunk.
REPLAY_CHUNK = 100

_REF = re.compile(r"^(?P<topic>.+)\[(?P<partition>\d+)\]@(?P<offset>\d+)$")


def ref(topic: str, partition: int, offset: int) -> str:
    """A record's position as kaiku writes it everywhere: ``kaiku.dlq[2]@17``."""
    return f"{topic}[{partition}]@{offset}"


# -- masking ------------------------------------------------------------------------------------
_EMAIL = re.compile(r"[^\s<>()\[\]{}\"',;:]+@[^\s<>()\[\]{}\"',;:]+")
_PHONE = re.compile(
    r"\+\d[\d ().-]{5,18}\d"  # international: +358401234567, +358 40 123 4567
    r"|(?<![\w.:/-])0\d(?:[ -]?\d){5,12}(?![\w:/-])"  # national: 040 123 4567
    r"|(?<![\w.:/-])\d{9,}(?![\w.:/-])"  # a long bare number: 358401234567
)
_SENSITIVE_WORDS = (
    r"e-?mail|phone|mobile|msisdn|token|secret|passw|api[-_]?key|authori[sz]ation|signature"
    r"|cookie|first[-_]?name|last[-_]?name|full[-_]?name"
)
_SENSITIVE_KEY = re.compile(_SENSITIVE_WORDS, re.IGNORECASE)
_SENSITIVE_EXACT = {"to", "from", "cc", "bcc", "recipient", "recipients", "address", "tel", "sms"}
# A sensitive "key": "value" pair in text that is not valid JSON (a malformed message).
_SENSITIVE_PAIR = re.compile(
    rf'("[^"]*(?:{_SENSITIVE_WORDS})[^"]*"\s*:\s*)"(?:[^"\\]|\\.)*"', re.IGNORECASE
)
MASK = "<masked>"


def mask_text(text: str) -> str:
    """``text`` with email addresses, phone-like numbers and sensitive JSON fields masked."""
    text = _SENSITIVE_PAIR.sub(rf'\1"{MASK}"', text)
    text = _EMAIL.sub("<email>", text)
    return _PHONE.sub("<phone>", text)


def _sensitive(key: str) -> bool:
    return bool(_SENSITIVE_KEY.search(key)) or key.lower() in _SENSITIVE_EXACT


def mask_json(value: Any, sensitive: bool = False) -> Any:
    """A decoded JSON value with the values of contact, name and secret fields masked, and email
    addresses and phone-like numbers masked anywhere else."""
    if isinstance(value, dict):
        return {
            mask_text(str(k)): mask_json(v, sensitive or _sensitive(str(k)))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_json(v, sensitive) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if sensitive:
        return MASK
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, int) and abs(value) >= 100_000_000:  # nine digits: maybe a number
        return "<phone>"
    return value


def mask_body(value: bytes | None) -> Any:
    """A message body fit to print: masked JSON when it is JSON, masked text otherwise."""
    if not value:
        return ""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(value)} bytes, not UTF-8>"
    try:
        return mask_json(json.loads(text))
    except ValueError:
        return mask_text(text)


# -- topics -------------------------------------------------------------------------------------
def human_ms(ms: int) -> str:
    if ms < 0:
        return "forever"
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class TopicSpec:
    """A topic as the settings want it."""

    kind: str  # the topic without the prefix (``events.EVENTS`` …)
    name: str
    partitions: int
    replication_factor: int
    retention_ms: int
    retention_setting: str

    def describe(self) -> str:
        return (
            f"{self.partitions} partitions, replication factor {self.replication_factor}, "
            f"retention {human_ms(self.retention_ms)}"
        )


def topic_specs(settings: KafkaSettings) -> list[TopicSpec]:
    return [
        TopicSpec(
            name,
            settings.topic(name),
            settings.partitions,
            settings.replication_factor,
            retention_ms(settings, name),
            "KAIKU_KAFKA_DLQ_RETENTION_MS" if name == events.DLQ else "KAIKU_KAFKA_RETENTION_MS",
        )
        for name in events.ALL_TOPICS
    ]


@dataclass(frozen=True)
class TopicState:
    """A topic as the broker has it (None: the broker did not say)."""

    partitions: int
    replication_factor: int | None
    retention_ms: int | None

    def describe(self) -> str:
        replication = self.replication_factor or "not reported"
        retention = "not set" if self.retention_ms is None else human_ms(self.retention_ms)
        return (
            f"{self.partitions} partitions, replication factor {replication}, retention {retention}"
        )


async def _start(client: Any, stop: Callable[[], Any]) -> None:
    """Start an aiokafka client within the connect time-out; closed again if it cannot."""
    try:
        await asyncio.wait_for(client.start(), CONNECT_TIMEOUT_SECONDS)
    except BaseException:
        with contextlib.suppress(Exception):
            await stop()
        raise


@contextlib.asynccontextmanager
async def _admin(settings: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    admin = AIOKafkaAdminClient(**_client_kwargs(settings))
    await _start(admin, admin.close)
    try:
        yield admin
    finally:
        await admin.close()


async def _existing(admin: AIOKafkaAdminClient, names: Iterable[str]) -> dict[str, TopicState]:
    """The state of those of ``names`` that exist. Only listed topics are described: a broker
    that creates topics on a metadata request (Tansu, Kafka's auto.create) would create the rest."""
    listed = set(await admin.list_topics())
    wanted = [n for n in names if n in listed]
    if not wanted:
        return {}
    states: dict[str, TopicState] = {}
    for topic in await admin.describe_topics(wanted):
        partitions = topic.get("partitions") or []
        replicas = {len(p["replicas"]) for p in partitions if p.get("replicas")}
        states[topic["topic"]] = TopicState(
            len(partitions), replicas.pop() if len(replicas) == 1 else None, None
        )
    retention = await _retention(admin, list(states))
    return {
        name: TopicState(s.partitions, s.replication_factor, retention.get(name))
        for name, s in states.items()
    }


async def _retention(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    if not names:
        return {}
    # Every config, not a filtered list: Tansu answers a filtered request with none at all.
    resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    try:
        responses = await admin.describe_configs(resources)
    except KafkaError:  # a broker without DescribeConfigs: retention is not checked
        return {}
    found: dict[str, int] = {}
    for response in responses:
        for resource in response.resources:
            error_code, name, entries = resource[0], resource[3], resource[4]
            if error_code:
                continue
            for entry in entries:
                if entry[0] == "retention.ms" and entry[1] is not None:
                    with contextlib.suppress(ValueError):
                        found[name] = int(entry[1])
    return found


@dataclass(frozen=True)
class TopicOutcome:
    spec: TopicSpec
    action: str  # "created", "create" (dry run), "exists", "error"
    state: TopicState | None = None
    error: str | None = None

    def differences(self) -> list[str]:
        if self.state is None:
            return []
        s, want = self.state, self.spec
        out = []
        if s.partitions != want.partitions:
            out.append(
                f"{s.partitions} partitions, not the {want.partitions} of KAIKU_KAFKA_PARTITIONS"
            )
        if s.replication_factor is not None and s.replication_factor != want.replication_factor:
            out.append(
                f"replication factor {s.replication_factor}, not the "
                f"{want.replication_factor} of KAIKU_KAFKA_REPLICATION_FACTOR"
            )
        if s.retention_ms is not None and s.retention_ms != want.retention_ms:
            out.append(
                f"retention {human_ms(s.retention_ms)}, not the "
                f"{human_ms(want.retention_ms)} of {want.retention_setting}"
            )
        return out

    def line(self) -> str:
        name = self.spec.name
        if self.action == "error":
            return f"{name}: not created: {self.error}"
        if self.action in ("created", "create"):
            verb = "created" if self.action == "created" else "would create"
            return f"{name}: {verb} ({self.spec.describe()})"
        differences = self.differences()
        if not differences:
            return f"{name}: exists ({(self.state or self.spec).describe()})"
        return f"{name}: exists; differs, left as it is: {'; '.join(differences)}"


async def create_topics(settings: KafkaSettings, *, dry_run: bool) -> list[TopicOutcome]:
    """Create the missing kaiku topics; report the existing ones (idempotent)."""
    specs = topic_specs(settings)
    async with _admin(settings) as admin:
        existing = await _existing(admin, [s.name for s in specs])
        outcomes = {
            s.name: TopicOutcome(s, "exists", existing[s.name]) for s in specs if s.name in existing
        }
        missing = [s for s in specs if s.name not in existing]
        if dry_run or not missing:
            outcomes.update({s.name: TopicOutcome(s, "create") for s in missing})
        else:
            response = await admin.create_topics([new_topic(settings, s.kind) for s in missing])
            codes = {t[0]: (t[1], t[2] if len(t) > 2 else None) for t in response.topic_errors}
            raced = []
            for s in missing:
                code, message = codes.get(s.name, (0, None))
                if code == 0:
                    outcomes[s.name] = TopicOutcome(s, "created")
                elif code == 36:  # TOPIC_ALREADY_EXISTS: another run won the race
                    raced.append(s)
                else:
                    reason = for_code(code).__name__ + (f": {message}" if message else "")
                    outcomes[s.name] = TopicOutcome(s, "error", error=reason)
            if raced:
                now = await _existing(admin, [s.name for s in raced])
                outcomes.update({s.name: TopicOutcome(s, "exists", now.get(s.name)) for s in raced})
    return [outcomes[s.name] for s in specs]


# -- dead letters -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replay:
    at: str
    to: str


@dataclass
class DeadLetter:
    """A dead letter as the consumer loop wrote it: the original bytes, key and headers, plus
    the ``kaiku-dlq-*`` headers."""

    topic: str
    partition: int
    offset: int
    at: datetime
    source_topic: str
    source_partition: int | None
    source_offset: int | None
    consumer: str
    error: str
    reason: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]  # the original message's, without the kaiku-dlq-* ones
    size: int
    replays: list[Replay] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return ref(self.topic, self.partition, self.offset)

    @property
    def source(self) -> str:
        if self.source_partition is None or self.source_offset is None:
            return self.source_topic
        return ref(self.source_topic, self.source_partition, self.source_offset)

    @classmethod
    def from_record(cls, record: ConsumerRecord, *, keep_value: bool) -> DeadLetter | None:
        headers = list(record.headers or ())
        dlq = {
            k[len(DLQ_HEADER_PREFIX) :]: _text(v)
            for k, v in headers
            if k.startswith(DLQ_HEADER_PREFIX)
        }
        if "reason" not in dlq or "topic" not in dlq:
            return None
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            at=_time(dlq.get("at"), record.timestamp),
            source_topic=dlq["topic"],
            source_partition=_int(dlq.get("partition")),
            source_offset=_int(dlq.get("offset")),
            consumer=dlq.get("consumer", ""),
            error=dlq.get("error", ""),
            reason=dlq["reason"],
            key=record.key,
            value=record.value if keep_value else None,
            headers=[(k, v) for k, v in headers if not k.startswith(DLQ_HEADER_PREFIX)],
            size=len(record.value or b""),
        )

    @property
    def target(self) -> str:
        """Where a replay goes: the original topic and partition."""
        if self.source_partition is None:
            return self.source_topic
        return f"{self.source_topic}[{self.source_partition}]"

    @property
    def replayed_from(self) -> str | None:
        """The dead letter this one is a replay of, when a replayed message failed again."""
        found = [_text(v) for k, v in self.headers if k == REPLAYED_FROM]
        return found[-1] if found else None

    def replay_headers(self) -> list[tuple[str, bytes]]:
        kept = [(k, v) for k, v in self.headers if k != REPLAYED_FROM]
        return [*kept, (REPLAYED_FROM, self.ref.encode())]

    def to_json(self, *, show_body: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ref": self.ref,
            "partition": self.partition,
            "offset": self.offset,
            "at": _iso(self.at),
            "source": {
                "topic": self.source_topic,
                "partition": self.source_partition,
                "offset": self.source_offset,
            },
            "consumer": self.consumer,
            "error": self.error,
            "reason": mask_text(self.reason),
            "key": mask_text(_text(self.key)) if self.key else None,
            "headers": [mask_text(k) for k, _ in self.headers],
            "size": self.size,
            "replayed_from": self.replayed_from,
            "replays": [{"at": r.at, "to": r.to} for r in self.replays],
        }
        if show_body:
            out["body"] = mask_body(self.value)
        return out

    def lines(self, *, show_body: bool = False) -> list[str]:
        key = f"  key {mask_text(_text(self.key))}" if self.key else ""
        out = [
            f"{self.ref}  {_iso(self.at)}  from {self.source}  consumer {self.consumer}  "
            f"{self.error}{key}",
            f"    reason: {mask_text(self.reason)}",
        ]
        if self.replayed_from:
            out.append(f"    a replay of {self.replayed_from}")
        out += [f"    replayed {r.at} -> {r.to}" for r in self.replays]
        if show_body:
            body = mask_body(self.value)
            shown = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
            out.append(f"    body: {' '.join(shown.split())}")
        return out


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", errors="replace") if value is not None else ""


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _time(header: str | None, timestamp_ms: int) -> datetime:
    if header:
        with contextlib.suppress(ValueError):
            at = datetime.fromisoformat(header)
            return at if at.tzinfo else at.replace(tzinfo=UTC)
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds")


@dataclass
class Dlq:
    """What the dead-letter topic held when reading started."""

    topic: str
    exists: bool
    letters: list[DeadLetter] = field(default_factory=list)
    markers: int = 0
    other: int = 0


async def _read_to_end(
    settings: KafkaSettings, topic: str, partitions: Sequence[int]
) -> AsyncIterator[ConsumerRecord]:
    """Every record of ``topic`` below the end offsets taken now, without a group or commits."""
    consumer = AIOKafkaConsumer(
        **_client_kwargs(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await _start(consumer, consumer.stop)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        pending = {tp for tp in tps if await consumer.position(tp) < ends[tp]}
        # The end is the high watermark of the first fetch answer, if higher: Tansu answers
        # ListOffsets(latest) with the last batch's base offset + 1, short of a batch's rest.
        settled: set[TopicPartition] = set()
        clock = asyncio.get_running_loop().time
        progress = clock()
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=500)
            for tp in pending - settled:
                highwater = consumer.highwater(tp)
                if highwater is not None:
                    ends[tp] = max(ends[tp], highwater)
                    settled.add(tp)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        yield record
                progress = clock()
            for tp in settled & pending:
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
            if pending and clock() - progress > READ_STALL_SECONDS:
                raise KafkaTimeoutError(f"reading {topic} stalled before its end")
    finally:
        await consumer.stop()


async def read_dlq(settings: KafkaSettings, *, keep_values: bool = False) -> Dlq:
    """The dead letters on ``<prefix>dlq``, each with the replays its markers record."""
    topic = settings.topic(events.DLQ)
    async with _admin(settings) as admin:
        existing = await _existing(admin, [topic])
    if topic not in existing:
        return Dlq(topic, exists=False)
    dlq = Dlq(topic, exists=True)
    replays: dict[tuple[int, int], list[Replay]] = {}
    async for record in _read_to_end(settings, topic, range(existing[topic].partitions)):
        letter = DeadLetter.from_record(record, keep_value=keep_values)
        if letter is not None:
            dlq.letters.append(letter)
            continue
        headers = {k: _text(v) for k, v in record.headers or ()}
        marked = _REF.match(headers.get(REPLAY_OF, ""))
        if marked:
            dlq.markers += 1
            position = (int(marked["partition"]), int(marked["offset"]))
            replays.setdefault(position, []).append(
                Replay(headers.get(REPLAYED_AT, ""), headers.get(REPLAYED_TO, ""))
            )
        else:
            dlq.other += 1
    for letter in dlq.letters:
        letter.replays = replays.get((letter.partition, letter.offset), [])
    dlq.letters.sort(key=lambda d: (d.at, d.partition, d.offset))
    return dlq


@dataclass(frozen=True)
class Filters:
    consumer: str | None = None
    source_topic: str | None = None
    reason_contains: str | None = None
    since: datetime | None = None
    limit: int | None = None

    def matches(self, letter: DeadLetter, prefix: str) -> bool:
        if self.consumer is not None and letter.consumer != self.consumer:
            return False
        if self.source_topic is not None and letter.source_topic not in (
            self.source_topic,
            f"{prefix}{self.source_topic}",
        ):
            return False
        if (
            self.reason_contains is not None
            and self.reason_contains.lower() not in letter.reason.lower()
        ):
            return False
        return self.since is None or letter.at >= self.since

    def select(self, letters: Iterable[DeadLetter], prefix: str) -> list[DeadLetter]:
        return [d for d in letters if self.matches(d, prefix)]

    def limited(self, letters: list[DeadLetter]) -> list[DeadLetter]:
        return letters if self.limit is None else letters[: self.limit]


@dataclass
class ReplayPlan:
    replay: list[DeadLetter] = field(default_factory=list)
    already: list[DeadLetter] = field(default_factory=list)  # skipped: replayed before
    unreplayable: list[tuple[DeadLetter, str]] = field(default_factory=list)


async def plan_replay(
    settings: KafkaSettings, dlq: Dlq, filters: Filters, *, again: bool
) -> tuple[ReplayPlan, dict[str, int]]:
    """Which matching dead letters to replay; and the partition count of each target topic."""
    plan = ReplayPlan()
    matching = filters.select(dlq.letters, settings.topic_prefix)
    targets = {d.source_topic for d in matching if not d.source_topic.startswith("webhook:")}
    async with _admin(settings) as admin:
        existing = await _existing(admin, sorted(targets))
    partitions = {name: state.partitions for name, state in existing.items()}
    for letter in matching:
        if letter.replays and not again:
            plan.already.append(letter)
        elif letter.source_topic.startswith("webhook:"):
            plan.unreplayable.append(
                (letter, f"it came from {letter.source_topic}, not from a topic")
            )
        elif letter.source_topic not in partitions:
            plan.unreplayable.append((letter, f"the topic {letter.source_topic} does not exist"))
        else:
            plan.replay.append(letter)
    plan.replay = filters.limited(plan.replay)
    return plan, partitions


def _chunks(items: list[DeadLetter], size: int) -> Iterable[list[DeadLetter]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def replay(
    settings: KafkaSettings,
    letters: list[DeadLetter],
    partitions: dict[str, int],
    on_replayed: Callable[[DeadLetter, str], None],
) -> None:
    """Republish ``letters`` (their values kept) to their original topics, and mark each one
    replayed on the dead-letter topic once the broker acknowledged its copy."""
    producer = AIOKafkaProducer(
        **_client_kwargs(settings),
        acks="all",
        enable_idempotence=settings.enable_idempotence,
    )
    await _start(producer, producer.stop)
    try:
        for chunk in _chunks(letters, REPLAY_CHUNK):
            copies = []
            for d in chunk:
                # The original partition keeps the customer's order whatever partitioner the
                # original producer used; by key if the topic has fewer partitions now.
                same = d.source_partition is not None and d.source_partition < partitions.get(
                    d.source_topic, 0
                )
                copies.append(
                    await producer.send(
                        d.source_topic,
                        d.value,
                        key=d.key or None,
                        partition=d.source_partition if same else None,
                        headers=d.replay_headers(),
                    )
                )
            landed = await asyncio.gather(*copies)
            at = _iso(datetime.now(UTC))
            markers = []
            for d, meta in zip(chunk, landed, strict=True):
                to = ref(meta.topic, meta.partition, meta.offset)
                marker = {"type": "dlq.replayed", "dead_letter": d.ref, "to": to, "at": at}
                markers.append(
                    await producer.send(
                        d.topic,
                        json.dumps(marker).encode(),
                        key=f"replay:{d.partition}:{d.offset}".encode(),
                        partition=d.partition,
                        headers=[
                            (REPLAY_OF, d.ref.encode()),
                            (REPLAYED_TO, to.encode()),
                            (REPLAYED_AT, at.encode()),
                        ],
                    )
                )
            await asyncio.gather(*markers)
            for d, meta in zip(chunk, landed, strict=True):
                on_replayed(d, ref(meta.topic, meta.partition, meta.offset))
    finally:
        await producer.stop()


# -- the commands -------------------------------------------------------------------------------
def _filters(args: argparse.Namespace) -> Filters:
    return Filters(
        consumer=args.consumer,
        source_topic=args.source_topic,
        reason_contains=args.reason_contains,
        since=args.since,
        limit=args.limit,
    )


async def _topics_create(args: argparse.Namespace, settings: KafkaSettings) -> int:
    outcomes = await create_topics(settings, dry_run=args.dry_run)
    for outcome in outcomes:
        print(outcome.line())
    if any(o.differences() for o in outcomes):
        print(
            "note: kaiku never changes an existing topic; see docs/topics.md to change one",
            file=sys.stderr,
        )
    if args.dry_run:
        print("dry run: nothing was created")
    return 1 if any(o.action == "error" for o in outcomes) else 0


async def _dlq_list(args: argparse.Namespace, settings: KafkaSettings) -> int:
    dlq = await read_dlq(settings, keep_values=args.show_body)
    matching = _filters(args).select(dlq.letters, settings.topic_prefix)
    shown = _filters(args).limited(matching)
    if args.format == "json":
        print(json.dumps([d.to_json(show_body=args.show_body) for d in shown], indent=2))
        return 0
    if not dlq.exists:
        print(f"no dead letters: {dlq.topic} does not exist")
        return 0
    for letter in shown:
        for line in letter.lines(show_body=args.show_body):
            print(line)
    other = f", {dlq.other} other records" if dlq.other else ""
    print(
        f"{len(shown)} of {len(matching)} matching dead letters shown "
        f"({len(dlq.letters)} on {dlq.topic}, {dlq.markers} replay markers{other})"
    )
    return 0


async def _dlq_replay(args: argparse.Namespace, settings: KafkaSettings) -> int:
    dlq = await read_dlq(settings, keep_values=not args.dry_run)
    plan, partitions = await plan_replay(settings, dlq, _filters(args), again=args.again)
    text = args.format == "text"
    done: list[dict[str, str]] = []

    def replayed(letter: DeadLetter, to: str) -> None:
        done.append({"ref": letter.ref, "to": to})
        if text:
            print(f"replayed {letter.ref} -> {to}  ({letter.consumer}: {mask_text(letter.reason)})")

    if text:
        for letter, why in plan.unreplayable:
            print(f"cannot replay {letter.ref}: {why}")
        if args.dry_run:
            for letter in plan.replay:
                print(
                    f"would replay {letter.ref} -> {letter.target}  "
                    f"({letter.consumer}: {mask_text(letter.reason)})"
                )
    if plan.replay and not args.dry_run:
        try:
            await replay(settings, plan.replay, partitions, replayed)
        except BaseException:
            print(
                f"kaiku: the replay stopped after {len(done)} of {len(plan.replay)} dead letters "
                "(those have their markers); running the same command again replays the rest",
                file=sys.stderr,
            )
            raise
    if not text:
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "replayed": done,
                    "would_replay": [
                        {"ref": d.ref, "to": d.target} for d in plan.replay if args.dry_run
                    ],
                    "already_replayed": [d.ref for d in plan.already],
                    "not_replayable": [{"ref": d.ref, "why": why} for d, why in plan.unreplayable],
                },
                indent=2,
            )
        )
        return 0
    verb = "would be replayed (dry run: nothing produced)" if args.dry_run else "replayed"
    summary = f"{len(plan.replay)} {verb}"
    if plan.already:
        summary += f"; {len(plan.already)} skipped, replayed before (--again replays them again)"
    if plan.unreplayable:
        summary += f"; {len(plan.unreplayable)} cannot be replayed"
    if not dlq.exists:
        summary += f"; {dlq.topic} does not exist"
    print(summary)
    return 0


_UNREACHABLE = (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
    OSError,
    TimeoutError,
)


def command(args: argparse.Namespace) -> int:
    """Run ``kaiku topics create`` or ``kaiku dlq list|replay``: 0 done, 1 the broker is
    unreachable or refused, 2 a usage or settings error."""
    # The broker's unreachability is said once, below, instead of aiokafka's retries.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        settings = KafkaSettings()
    except ValidationError as exc:
        for err in exc.errors(include_input=False, include_url=False):
            name = ".".join(str(p) for p in err["loc"])
            print(f"kaiku: KAIKU_KAFKA_{name.upper()}: {err['msg']}", file=sys.stderr)
        return 2
    run = {"topics-create": _topics_create, "dlq-list": _dlq_list, "dlq-replay": _dlq_replay}
    try:
        return asyncio.run(run[args.ops](args, settings))
    except BrokenPipeError:  # `kaiku dlq list | head`: the reader had enough
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more is written
        return 0
    except _UNREACHABLE as exc:
        print(
            f"kaiku: cannot reach the Kafka broker at {settings.bootstrap_servers} "
            f"(KAIKU_KAFKA_BOOTSTRAP_SERVERS; {type(exc).__name__}): is it running, and are "
            "the address and KAIKU_KAFKA_SECURITY_PROTOCOL right?",
            file=sys.stderr,
        )
        return 1
    except KafkaError as exc:
        print(
            f"kaiku: the Kafka broker at {settings.bootstrap_servers} refused: "
            f"{type(exc).__name__}: {mask_text(str(exc))}",
            file=sys.stderr,
        )
        return 1

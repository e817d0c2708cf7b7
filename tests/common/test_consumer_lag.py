"""``kaiku_consumer_lag`` after a rebalance: a consumer reports only the partitions it owns, so
a sum over the pods (what the autoscaling and the lag alert read) counts each partition once."""

from __future__ import annotations

import asyncio
import uuid

from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncSession

from services.common.config import DatabaseSettings, KafkaSettings
from services.common.db import create_engine, create_sessionmaker
from services.common.kafka import (
    ConsumerLoop,
    HandlerResult,
    Incoming,
    Producer,
    ensure_topics,
)
from tests.support import eventually

TOPIC = "lag-test"


def lags(consumer: str) -> dict[str, float]:
    """``consumer``'s kaiku_consumer_lag series: the value of each partition it reports."""
    return {
        sample.labels["partition"]: sample.value
        for metric in REGISTRY.collect()
        if metric.name == "kaiku_consumer_lag"
        for sample in metric.samples
        if sample.labels.get("consumer") == consumer
    }


def lag_partitions(consumer: str) -> set[str]:
    """The partitions ``consumer`` has a kaiku_consumer_lag series for."""
    return set(lags(consumer))


async def test_a_consumer_drops_the_lag_of_the_partitions_it_loses(
    kafka: KafkaSettings, sqlite: DatabaseSettings
) -> None:
    await ensure_topics(kafka, [TOPIC])
    engine = create_engine(sqlite)
    sessions = create_sessionmaker(engine)
    producer = Producer(kafka)
    await producer.start()
    group = f"lag-{uuid.uuid4().hex[:8]}"

    async def handle(batch: list[Incoming[bytes]], session: AsyncSession) -> HandlerResult:
        return HandlerResult()

    def loop(name: str) -> ConsumerLoop[bytes]:
        return ConsumerLoop(
            name=name,
            topic=TOPIC,
            group_id=group,
            decode=lambda record: bytes(record.value or b""),
            handler=handle,
            sessions=sessions,
            producer=producer,
            settings=kafka,
        )

    async def produce(n: int) -> None:
        raw = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await raw.start()
        try:
            for p in range(kafka.partitions):
                for i in range(n):
                    await raw.send_and_wait(kafka.topic(TOPIC), f"{p}-{i}".encode(), partition=p)
        finally:
            await raw.stop()

    first, second = loop(f"first-{group}"), loop(f"second-{group}")
    try:
        await first.start()
        await produce(3)
        await eventually(
            lambda: lag_partitions(first.name) == {str(p) for p in range(kafka.partitions)},
            timeout=30,
            what="the first consumer reporting the lag of every partition",
        )
        await second.start()
        # The second reports the partitions it was given once it has consumed from them: keep
        # producing until the rebalance is done and it has.
        deadline = asyncio.get_running_loop().time() + 60
        while not lag_partitions(second.name):
            assert asyncio.get_running_loop().time() < deadline, "no rebalance in 60 s"
            await produce(1)
            await asyncio.sleep(0.5)
        await produce(3)  # both now consume what they own, the first too
        await asyncio.sleep(1)
        mine, theirs = lag_partitions(first.name), lag_partitions(second.name)
        assert mine and not mine & theirs, (mine, theirs)
        assert mine | theirs == {str(p) for p in range(kafka.partitions)}
    finally:
        await second.stop(5)
        await first.stop(5)
        await producer.stop()
        await engine.dispose()


def lag_total(consumer: str) -> float:
    """The sum of ``consumer``'s kaiku_consumer_lag over its partitions."""
    return sum(lags(consumer).values())


async def test_the_lag_grows_while_a_batch_is_stuck_and_falls_when_it_is_done(
    kafka: KafkaSettings, sqlite: DatabaseSettings
) -> None:
    """A consumer stuck on a batch (its database away, a slow handler) finishes no batch, yet
    its lag gauge follows the messages arriving behind it: the lag alert can fire."""
    topic = f"lag-stuck-{uuid.uuid4().hex[:6]}"
    await ensure_topics(kafka, [topic])
    settings = kafka.model_copy(update={"lag_refresh_seconds": 0.2, "max_batch": 1})
    engine = create_engine(sqlite)
    sessions = create_sessionmaker(engine)
    producer = Producer(kafka)
    await producer.start()
    release = asyncio.Event()
    seen: list[bytes] = []

    async def handle(batch: list[Incoming[bytes]], session: AsyncSession) -> HandlerResult:
        seen.extend(m.message for m in batch)
        await release.wait()
        return HandlerResult()

    consumer = ConsumerLoop(
        name=f"stuck-{topic}",
        topic=topic,
        group_id=f"group-{topic}",
        decode=lambda record: bytes(record.value or b""),
        handler=handle,
        sessions=sessions,
        producer=producer,
        settings=settings,
    )
    raw = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await raw.start()
    try:
        await consumer.start()
        await raw.send_and_wait(kafka.topic(topic), b"first", partition=0)
        await eventually(lambda: seen == [b"first"], timeout=30, what="the first batch in hand")
        for i in range(25):
            await raw.send_and_wait(kafka.topic(topic), f"behind-{i}".encode(), partition=0)
        # The batch in hand is not committed: it and the 25 behind it.
        await eventually(
            lambda: lag_total(consumer.name) == 26, timeout=30, what="the lag of the stuck batch"
        )
        release.set()
        await eventually(lambda: len(seen) == 26, timeout=30, what="the rest consumed")
        await eventually(
            lambda: lag_total(consumer.name) == 0, timeout=30, what="the lag back to 0"
        )
    finally:
        release.set()
        await raw.stop()
        await consumer.stop(5)
        await producer.stop()
        await engine.dispose()

"""Invalid messages on kaiku.events go to the dead-letter topic with the reason; the rest flow."""

from __future__ import annotations

import json

from aiokafka import AIOKafkaProducer

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.kafka import ensure_topics
from services.common.program import Program
from services.common.settings import CommonSettings
from services.trigger.app import create_app as trigger_app
from tests.conftest import read_topic
from tests.integration.test_end_to_end import order_delivered
from tests.support import running


async def test_malformed_and_invalid_events_are_dead_lettered_and_the_rest_processed(
    kafka: KafkaSettings, postgres: DatabaseSettings, program: Program
) -> None:
    await ensure_topics(kafka)
    invalid = order_delivered("cust-2")
    del invalid["data"]["customer"]  # type: ignore[index]
    good = [order_delivered("cust-1"), order_delivered("cust-3")]
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    topic = kafka.topic(events.EVENTS)
    # All on one partition (same key), so "after" is well defined.
    await producer.send_and_wait(topic, json.dumps(good[0]).encode(), key=b"k")
    await producer.send_and_wait(
        topic, b'{"specversion": "1.0", "id": ', key=b"k", headers=[("origin", b"crm")]
    )
    await producer.send_and_wait(topic, json.dumps(invalid).encode(), key=b"k")
    await producer.send_and_wait(topic, json.dumps(good[1]).encode(), key=b"k")
    await producer.stop()

    app = trigger_app(CommonSettings(kafka=kafka, database=postgres), program=program)
    async with running(app):
        dead = await read_topic(kafka, events.DLQ, expect=2)
        invitations = await read_topic(kafka, events.INVITATIONS, expect=2)

    assert len(dead) == 2
    by_reason = [dict(r.headers) for r in dead]  # type: ignore[attr-defined]
    assert by_reason[0]["kaiku-dlq-reason"].startswith(b"malformed JSON")
    assert by_reason[0]["origin"] == b"crm"  # the original headers are kept
    assert dead[0].value == b'{"specversion": "1.0", "id": '  # type: ignore[attr-defined]
    assert b"data.customer" in by_reason[1]["kaiku-dlq-reason"]
    assert by_reason[1]["kaiku-dlq-topic"] == topic.encode()
    assert {h["kaiku-dlq-offset"] for h in by_reason} == {b"1", b"2"}

    customers = sorted(json.loads(r.value)["customer"]["id"] for r in invitations)  # type: ignore[attr-defined]
    assert customers == ["cust-1", "cust-3"]

"""kaiku.events accepts CloudEvents from Kafka producers other than kaiku: structured mode and
the binary mode of the CloudEvents Kafka binding, produced with librdkafka (confluent-kafka)."""

from __future__ import annotations

import json

from confluent_kafka import Producer

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.kafka import ensure_topics
from services.common.program import Program
from services.common.settings import CommonSettings
from services.trigger.app import create_app as trigger_app
from tests.conftest import read_topic
from tests.support import running


def produce(kafka: KafkaSettings, records: list[tuple[bytes, list[tuple[str, bytes]]]]) -> None:
    producer = Producer(
        {"bootstrap.servers": kafka.bootstrap_servers, "acks": "all", "enable.idempotence": False}
    )
    errors: list[object] = []
    for value, headers in records:
        producer.produce(
            kafka.topic(events.EVENTS),
            value=value,
            key=b"cust-rd",
            headers=headers,
            on_delivery=lambda err, _msg: errors.append(err) if err else None,
        )
    assert producer.flush(15) == 0, "librdkafka could not deliver to the broker"
    assert errors == []


async def test_structured_and_binary_mode_from_librdkafka(
    kafka: KafkaSettings, postgres: DatabaseSettings, program: Program
) -> None:
    await ensure_topics(kafka)
    data = {
        "customer": {"id": "cust-rd", "email": "rd@example.com", "locale": "sv"},
        "team": "billing",
        "case_id": "77",
    }
    structured = {
        "specversion": "1.0",
        "id": "s-1",
        "source": "crm://in-house",
        "type": "ticket.solved",
        "time": "2026-11-20T14:03:00Z",
        "data": data,
    }
    binary_headers = [
        ("ce_specversion", b"1.0"),
        ("ce_id", b"b-1"),
        ("ce_source", b"crm://in-house"),
        ("ce_type", b"order.delivered"),
        ("ce_time", b"2026-11-20T14:05:00Z"),
        ("ce_subject", b"cust-rd"),
        ("ce_tenant", b"acme"),
        ("content-type", b"application/json; charset=utf-8"),
    ]
    # Another customer for the binary event, so the program's priority rule (an order survey
    # beats a support survey for one customer at once) does not choose between the two.
    other = {**data, "customer": {"id": "cust-rd2", "email": "rd2@example.com", "locale": "sv"}}
    produce(
        kafka,
        [
            (json.dumps(structured).encode(), [("content-type", b"application/cloudevents+json")]),
            (json.dumps(other).encode(), binary_headers),
            (json.dumps(data).encode(), [h for h in binary_headers if h[0] != "ce_id"]),
            (b"<xml/>", [*binary_headers[:-1], ("content-type", b"application/xml")]),
        ],
    )
    app = trigger_app(CommonSettings(kafka=kafka, database=postgres), program=program)
    async with running(app):
        invitations = await read_topic(kafka, events.INVITATIONS, expect=2)
        dead = await read_topic(kafka, events.DLQ, expect=2)

    got = sorted(
        (
            json.loads(r.value)["event_id"],
            json.loads(r.value)["survey_id"],  # type: ignore[attr-defined]
            json.loads(r.value)["locale"],
        )
        for r in invitations
    )
    assert got == [("b-1", "relationship-nps", "sv"), ("s-1", "support-csat", "sv")]
    reasons = sorted(dict(r.headers)["kaiku-dlq-reason"].decode() for r in dead)  # type: ignore[attr-defined]
    assert reasons[0].startswith("binary mode: data of content-type 'application/xml'")
    assert "id: Field required" in reasons[1]

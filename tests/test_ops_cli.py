"""`kaiku topics create` and `kaiku dlq list|replay` through the CLI's entry point, against the
real broker; the dead letter is made the real way, by the trigger's consumer refusing an event."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.cli import main
from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.kafka import ensure_topics
from services.common.program import Program
from services.common.settings import CommonSettings
from services.embedded import free_port
from services.ops import mask_body, mask_text
from services.trigger.app import create_app as trigger_app
from tests.conftest import read_topic
from tests.support import running

EMAIL = "maija.meikalainen@example.com"
PHONE = "+358401234567"
HOUR_MS = 3_600_000


@pytest.fixture
def env(kafka: KafkaSettings, monkeypatch: pytest.MonkeyPatch) -> KafkaSettings:
    """The CLI reads its settings from the environment: this test's broker and topics only."""
    import os

    for name in list(os.environ):
        if name.startswith("KAIKU_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("KAIKU_KAFKA_BOOTSTRAP_SERVERS", kafka.bootstrap_servers)
    monkeypatch.setenv("KAIKU_TOPIC_PREFIX", kafka.topic_prefix)
    monkeypatch.setenv("KAIKU_KAFKA_ENABLE_IDEMPOTENCE", "false")
    monkeypatch.setenv("KAIKU_KAFKA_PARTITIONS", "3")
    monkeypatch.setenv("KAIKU_KAFKA_RETENTION_MS", str(HOUR_MS))
    monkeypatch.setenv("KAIKU_KAFKA_DLQ_RETENTION_MS", str(2 * HOUR_MS))
    return kafka


def kaiku(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``kaiku ARGV``: its exit code, standard output and standard error."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    code = exit_info.value.code
    assert isinstance(code, int)
    out, err = capsys.readouterr()
    return code, out, err


async def _topics(kafka: KafkaSettings) -> dict[str, tuple[int, int | None]]:
    """This test's topics as the broker describes them: partitions and retention.ms."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(kafka.topic_prefix)]
        if not names:
            return {}
        described = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
        )
        retention: dict[str, int] = {}
        for response in responses:
            for resource in response.resources:
                for entry in resource[4]:
                    if entry[0] == "retention.ms":
                        retention[resource[3]] = int(entry[1])
        return {n: (described[n], retention.get(n)) for n in names}
    finally:
        await admin.close()


async def _create_topic(kafka: KafkaSettings, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(kafka.topic(name), partitions, 1)])
    finally:
        await admin.close()


async def _records(kafka: KafkaSettings, name: str) -> list[Any]:
    """Every record of a topic, up to its high watermarks (ListOffsets is not used: Tansu's
    answer stops at the last batch's first record)."""
    topic = kafka.topic(name)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(3)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            for rs in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(rs)
            ends = [consumer.highwater(tp) for tp in tps]
            positions = [await consumer.position(tp) for tp in tps]
            if None not in ends and all(p >= e for p, e in zip(positions, ends, strict=True)):
                break
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


def records(kafka: KafkaSettings, name: str) -> list[Any]:
    return asyncio.run(_records(kafka, name))


def invalid_event() -> dict[str, object]:
    """An event with the customer's contact details and without the customer's id."""
    return {
        "specversion": "1.0",
        "id": f"ord-{uuid.uuid4().hex[:8]}",
        "source": "shop://acme",
        "type": "order.delivered",
        "time": "2026-11-20T14:03:00Z",
        "data": {"customer": {"email": EMAIL, "phone": PHONE, "locale": "fi"}},
    }


async def _trigger_dead_letters(
    kafka: KafkaSettings, database: DatabaseSettings, program: Program, *, expect: int
) -> None:
    """Run the trigger until the dead-letter topic holds ``expect`` records."""
    app = trigger_app(CommonSettings(kafka=kafka, database=database), program=program)
    async with running(app):
        dead = await read_topic(kafka, events.DLQ, expect=expect)
    assert len(dead) == expect, f"the trigger dead-lettered {len(dead)}, not {expect}"


def assert_no_contact_details(text: str) -> None:
    assert EMAIL not in text
    assert "meikalainen" not in text
    assert "example.com" not in text
    assert PHONE not in text
    assert "401234567" not in text


def test_topics_create_twice_creates_once_and_never_changes_a_topic(
    env: KafkaSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka = env
    # Someone made the optouts topic by hand, with another partition count.
    asyncio.run(_create_topic(kafka, events.OPTOUTS, 1))

    code, out, _ = kaiku(capsys, "topics", "create", "--dry-run")
    assert code == 0
    assert out.count("would create") == 5
    assert f"{kafka.topic(events.DLQ)}: would create (3 partitions" in out
    assert list(asyncio.run(_topics(kafka))) == [kafka.topic(events.OPTOUTS)]

    code, out, err = kaiku(capsys, "topics", "create")
    assert code == 0, err
    assert out.count(": created (3 partitions, replication factor 1, retention 1h)") == 4
    assert (
        f"{kafka.topic(events.DLQ)}: created (3 partitions, replication factor 1, retention 2h)"
        in out
    )
    assert f"{kafka.topic(events.OPTOUTS)}: exists; differs, left as it is: 1 partitions" in out
    assert "docs/topics.md" in err

    code, out, _ = kaiku(capsys, "topics", "create")
    assert code == 0
    assert "created" not in out
    assert out.count(": exists (3 partitions, replication factor 1, retention 1h)") == 4
    assert (
        f"{kafka.topic(events.DLQ)}: exists (3 partitions, replication factor 1, retention 2h)"
        in out
    )
    assert f"{kafka.topic(events.OPTOUTS)}: exists; differs" in out

    topics = asyncio.run(_topics(kafka))
    assert topics == {
        kafka.topic(events.EVENTS): (3, HOUR_MS),
        kafka.topic(events.INVITATIONS): (3, HOUR_MS),
        kafka.topic(events.DELIVERIES): (3, HOUR_MS),
        kafka.topic(events.RESPONSES): (3, HOUR_MS),
        kafka.topic(events.OPTOUTS): (1, None),  # as it was made: kaiku left it alone
        kafka.topic(events.DLQ): (3, 2 * HOUR_MS),
    }


def test_topics_the_services_create_have_the_retention_settings(
    env: KafkaSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service that starts first creates the topics itself (``ensure_topics``): with the same
    partitions and retention as ``kaiku topics create``, which then finds nothing different."""
    kafka = env.model_copy(
        update={"partitions": 3, "retention_ms": HOUR_MS, "dlq_retention_ms": 2 * HOUR_MS}
    )
    asyncio.run(ensure_topics(kafka))
    assert asyncio.run(_topics(kafka)) == {
        **{kafka.topic(n): (3, HOUR_MS) for n in events.ALL_TOPICS if n != events.DLQ},
        kafka.topic(events.DLQ): (3, 2 * HOUR_MS),
    }
    code, out, err = kaiku(capsys, "topics", "create")
    assert code == 0, err
    assert out.count(": exists (3 partitions, replication factor 1, retention 1h)") == 5, out
    assert "differs" not in out


def test_a_dead_letter_is_listed_without_contact_details_and_replayed_once(
    env: KafkaSettings,
    sqlite: DatabaseSettings,
    program: Program,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kafka = env
    assert kaiku(capsys, "topics", "create")[0] == 0

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        await producer.send_and_wait(
            kafka.topic(events.EVENTS),
            json.dumps(invalid_event()).encode(),
            key=b"cust-7",
            headers=[("origin", b"crm")],
        )
        await producer.stop()

    asyncio.run(produce())
    asyncio.run(_trigger_dead_letters(kafka, sqlite, program, expect=1))
    [original] = records(kafka, events.EVENTS)
    [dead] = records(kafka, events.DLQ)
    dead_ref = f"{kafka.topic(events.DLQ)}[{dead.partition}]@{dead.offset}"

    # list: where from, which consumer, why; no body, no contact details.
    code, out, _ = kaiku(capsys, "dlq", "list")
    assert code == 0
    assert dead_ref in out
    source = f"from {kafka.topic(events.EVENTS)}[{original.partition}]@{original.offset}"
    assert source in out
    assert "consumer trigger" in out
    assert "InvalidMessage" in out
    assert "schema violation" in out
    assert "data.customer.id" in out
    assert "specversion" not in out  # no body unless asked
    assert_no_contact_details(out)

    code, out, _ = kaiku(capsys, "dlq", "list", "--format", "json")
    assert code == 0
    [listed] = json.loads(out)
    assert listed["ref"] == dead_ref
    assert listed["source"]["topic"] == kafka.topic(events.EVENTS)
    assert listed["consumer"] == "trigger"
    assert "data.customer.id" in listed["reason"]
    assert listed["replays"] == []
    assert_no_contact_details(out)

    # --show-body: the body, masked.
    code, out, _ = kaiku(capsys, "dlq", "list", "--show-body")
    assert code == 0
    assert "specversion" in out
    assert '"email": "<masked>"' in out
    assert '"phone": "<masked>"' in out
    assert_no_contact_details(out)

    # The filters.
    def matching(*filters: str) -> int:
        code, out, _ = kaiku(capsys, "dlq", "list", "--format", "json", *filters)
        assert code == 0
        return len(json.loads(out))

    assert matching("--consumer", "trigger") == 1
    assert matching("--consumer", "dispatcher") == 0
    assert matching("--source-topic", "events") == 1
    assert matching("--source-topic", kafka.topic(events.EVENTS)) == 1
    assert matching("--source-topic", "invitations") == 0
    assert matching("--reason-contains", "CUSTOMER.ID") == 1
    assert matching("--reason-contains", "malformed") == 0
    assert matching("--since", "1h") == 1
    assert matching("--since", "2099-01-01") == 0
    assert matching("--limit", "1") == 1

    # replay --dry-run: says what, produces nothing.
    code, out, _ = kaiku(capsys, "dlq", "replay", "--dry-run")
    assert code == 0
    assert f"would replay {dead_ref} -> {kafka.topic(events.EVENTS)}[{original.partition}]" in out
    assert_no_contact_details(out)
    assert len(records(kafka, events.EVENTS)) == 1
    assert len(records(kafka, events.DLQ)) == 1

    # replay: the original bytes, key and headers on the original topic and partition, marked.
    code, out, _ = kaiku(capsys, "dlq", "replay")
    assert code == 0
    assert f"replayed {dead_ref} -> {kafka.topic(events.EVENTS)}[{original.partition}]@" in out
    assert_no_contact_details(out)
    copies = [r for r in records(kafka, events.EVENTS) if r.offset != original.offset]
    assert len(copies) == 1
    copy = copies[0]
    assert (copy.partition, copy.key, copy.value) == (
        original.partition,
        original.key,
        original.value,
    )
    headers = dict(copy.headers)
    assert headers["origin"] == b"crm"
    assert headers["kaiku-replayed-from"] == dead_ref.encode()
    assert not [k for k in headers if k.startswith("kaiku-dlq-")]

    # A second replay replays nothing; the list says it was replayed.
    code, out, _ = kaiku(capsys, "dlq", "replay")
    assert code == 0
    assert "0 replayed; 1 skipped, replayed before" in out
    assert len(records(kafka, events.EVENTS)) == 2
    code, out, _ = kaiku(capsys, "dlq", "list")
    assert "    replayed 20" in out
    assert "1 of 1 matching dead letters shown" in out

    # --again replays it again.
    code, out, _ = kaiku(capsys, "dlq", "replay", "--again", "--format", "json")
    assert code == 0
    assert [r["ref"] for r in json.loads(out)["replayed"]] == [dead_ref]
    assert len(records(kafka, events.EVENTS)) == 3

    # The trigger reads both copies; still invalid, they come back as dead letters that say
    # which dead letter they are a replay of.
    asyncio.run(_trigger_dead_letters(kafka, sqlite, program, expect=5))  # 3 letters, 2 markers
    code, out, _ = kaiku(capsys, "dlq", "list", "--format", "json")
    listed = json.loads(out)
    assert len(listed) == 3
    assert [d["replayed_from"] for d in listed] == [None, dead_ref, dead_ref]
    assert len(listed[0]["replays"]) == 2
    # Only the new ones are left to replay.
    code, out, _ = kaiku(capsys, "dlq", "replay", "--dry-run")
    assert "2 would be replayed (dry run: nothing produced); 1 skipped, replayed before" in out


def test_an_unreachable_broker_is_exit_1_with_its_address(
    env: KafkaSettings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("KAIKU_KAFKA_BOOTSTRAP_SERVERS", address)
    for argv in (["topics", "create"], ["dlq", "list"], ["dlq", "replay", "--dry-run"]):
        code, out, err = kaiku(capsys, *argv)
        assert code == 1, argv
        assert f"cannot reach the Kafka broker at {address}" in err
        assert "KAIKU_KAFKA_BOOTSTRAP_SERVERS" in err
        assert "Traceback" not in err + out


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq"],
        ["topics"],
        ["dlq", "list", "--since", "yesterday"],
        ["dlq", "replay", "--limit", "0"],
        ["dlq", "list", "--format", "yaml"],
        ["dlq", "list", "--dry-run"],
    ],
)
def test_usage_errors_are_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert kaiku(capsys, *argv)[0] == 2


def test_a_bad_setting_is_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAIKU_KAFKA_PARTITIONS", "many")
    code, _, err = kaiku(capsys, "topics", "create", "--dry-run")
    assert code == 2
    assert "KAIKU_KAFKA_PARTITIONS" in err


def test_masking() -> None:
    body = json.dumps(
        {
            "data": {
                "customer": {"id": "c-1", "email": "not-even-valid", "phone": "040 123 4567"},
                "note": f"call {PHONE} or 040-1234567, or mail {EMAIL}",
                "attributes": {"crm_token": "tok_abc", "msisdn": 358401234567, "score": 9},
            },
            "time": "2026-11-20T14:03:00Z",
        }
    ).encode()
    masked = mask_body(body)
    customer = masked["data"]["customer"]
    assert customer == {"id": "c-1", "email": "<masked>", "phone": "<masked>"}
    assert masked["data"]["note"] == "call <phone> or <phone>, or mail <email>"
    assert masked["data"]["attributes"] == {
        "crm_token": "<masked>",
        "msisdn": "<masked>",
        "score": 9,
    }
    assert masked["time"] == "2026-11-20T14:03:00Z"
    # Not JSON (a malformed message): the same, by pattern.
    broken = mask_body(b'{"email": "x@y.fi", "token": "abc", "phone": "+358 40 123 4567", ')
    assert broken == '{"email": "<masked>", "token": "<masked>", "phone": "<masked>", '
    assert mask_body(b"\xff\xfe") == "<2 bytes, not UTF-8>"
    assert mask_text("write to a.b@c.fi") == "write to <email>"

"""A consumer SIGKILLed after its database commit and before its offset commit, then restarted,
produces no second invitation and no second email."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.kafka import ensure_topics
from tests.conftest import ROOT, read_topic
from tests.integration.test_end_to_end import order_delivered
from tests.support import SmtpSink, eventually, free_port


def service(
    name: str,
    kafka: KafkaSettings,
    db: DatabaseSettings,
    sink: SmtpSink,
    failpoint: str | None,
    log: Path,
) -> subprocess.Popen[bytes]:
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
        "KAIKU_PORT": str(free_port()),
        "KAIKU_API_TOKEN": "crash-test",
        "KAIKU_EMAIL_PROVIDER": "smtp",
        "KAIKU_SMTP_HOST": "127.0.0.1",
        "KAIKU_SMTP_PORT": str(sink.port),
        "KAIKU_POLL_SECONDS": "0.2",
        "KAIKU_FAILPOINTS": failpoint or "",
    }
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    code = await eventually(
        lambda: proc.poll() is not None and (proc.returncode,),
        timeout=timeout,
        what="the process to die at its failpoint",
    )
    return int(code[0])


async def lag(kafka: KafkaSettings, group: str, topic: str) -> int:
    """Messages of ``topic`` not yet committed by consumer group ``group``."""
    # A consumer that names the group but subscribes to nothing reads its commits without joining.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()  # loads the metadata
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(parts)
        behind = 0
        for tp in parts:
            behind += ends[tp] - (await consumer.committed(tp) or 0)
    finally:
        await consumer.stop()
    return behind


async def test_killed_consumers_neither_invite_nor_email_twice(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    await ensure_topics(kafka)
    log = tmp_path / "services.log"
    event = order_delivered("cust-crash")
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    await producer.start()
    await producer.send_and_wait(
        kafka.topic(events.EVENTS), json.dumps(event).encode(), key=b"cust-crash"
    )
    await producer.stop()

    # 1. The trigger dies after its DB commit and its produce, before committing the offset.
    trigger = service("trigger", kafka, postgres, smtp_sink, "trigger.after_produce", log)
    assert await wait_exit(trigger) == -signal.SIGKILL, log.read_text()
    # 2. The dispatcher dies after storing the invitation, before committing the offset.
    dispatcher = service(
        "dispatcher", kafka, postgres, smtp_sink, "dispatcher.after_db_commit", log
    )
    assert await wait_exit(dispatcher) == -signal.SIGKILL, log.read_text()
    assert smtp_sink.count() == 0

    # 3. Both restart and pick up from their last committed offsets.
    trigger = service("trigger", kafka, postgres, smtp_sink, None, log)
    dispatcher = service("dispatcher", kafka, postgres, smtp_sink, None, log)
    try:
        await eventually(smtp_sink.count, timeout=40, what="the email after the restarts")
        prefix = kafka.topic_prefix
        for group, topic in (
            (f"{prefix}trigger", events.EVENTS),
            (f"{prefix}dispatcher", events.INVITATIONS),
        ):

            async def settled(group: str = group, topic: str = topic) -> bool:
                return await lag(kafka, group, kafka.topic(topic)) == 0

            await eventually(settled, timeout=30, what=f"{group} to commit everything")
        await asyncio.sleep(1.5)  # room for a duplicate to show up, if there were one
    finally:
        for proc in (trigger, dispatcher):
            proc.send_signal(signal.SIGTERM)
        for proc in (trigger, dispatcher):
            proc.wait(20)

    invitations = await read_topic(kafka, events.INVITATIONS, expect=2, timeout=3)
    ids = {json.loads(r.value)["invitation_id"] for r in invitations}  # type: ignore[attr-defined]
    tokens = {json.loads(r.value)["token"] for r in invitations}  # type: ignore[attr-defined]
    # The redelivered event re-published the *same* invitation (same id and token) ...
    assert len(invitations) == 2 and len(ids) == 1 and len(tokens) == 1
    # ... and the customer got exactly one email.
    assert smtp_sink.count() == 1
    # SIGTERM drained both cleanly (uvicorn re-raises the signal once shutdown is complete).
    for proc in (trigger, dispatcher):
        assert proc.returncode in (0, -signal.SIGTERM), log.read_text()
    assert "trigger stopped" in log.read_text()
    assert "dispatcher stopped" in log.read_text()

"""Two dispatcher replicas share 1,200 invitations; one is SIGKILLed in the middle of a batch and
restarted. No invitation is sent twice, every one is sent except those in doubt at the instant of
the kill, and there are no more of those than the killed replica had in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import func, select

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.db import create_engine, create_sessionmaker
from services.common.events import InvitationRequested
from services.common.kafka import ensure_topics
from services.dispatcher.models import Send
from tests.conftest import ROOT
from tests.support import SmtpSink, email_invitation, eventually, free_port

INVITATIONS = 1200


class SlowSink(SmtpSink):
    """An SMTP server that takes a few milliseconds per message, like a real one, and can be
    held: while ``held`` is set, messages wait at DATA (sends stay in flight)."""

    held = threading.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(0.02)
        while self.held.is_set():
            await asyncio.sleep(0.02)
        return await super().handle_DATA(server, session, envelope)


def environment(db: DatabaseSettings) -> dict[str, str]:
    return {
        **os.environ,
        "KAIKU_DATABASE_URL": db.url,
        "KAIKU_DATABASE_SCHEMA": db.schema_name or "",
    }


def replica(
    instance: str,
    kafka: KafkaSettings,
    db: DatabaseSettings,
    sink: SmtpSink,
    log: Path,
    port: int | None = None,
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
        "KAIKU_PORT": str(port or free_port()),
        "KAIKU_EMAIL_PROVIDER": "smtp",
        "KAIKU_SMTP_HOST": "127.0.0.1",
        "KAIKU_SMTP_PORT": str(sink.port),
        "KAIKU_POLL_SECONDS": "0.2",
        "KAIKU_INSTANCE_ID": instance,
        "KAIKU_CLAIM_BATCH": "40",
        "KAIKU_SEND_CONCURRENCY": "10",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.dispatcher"],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def invitation(n: int) -> InvitationRequested:
    return email_invitation(f"cust-{n:05d}")


async def test_two_replicas_one_killed_mid_batch_never_send_twice_nor_lose_silently(
    kafka: KafkaSettings, postgres: DatabaseSettings, tmp_path: Path
) -> None:
    sink = SlowSink()
    sink.start()
    engine = create_engine(postgres)
    sessions = create_sessionmaker(engine)
    log = tmp_path / "dispatchers.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await ensure_topics(kafka)
        sent_ids = [invitation(n) for n in range(INVITATIONS)]
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=5)
        await producer.start()
        try:
            for inv in sent_ids:
                await producer.send(
                    kafka.topic(events.INVITATIONS),
                    inv.model_dump_json().encode(),
                    key=inv.customer.id.encode(),
                )
            await producer.flush()
        finally:
            await producer.stop()

        a = replica("replica-a", kafka, postgres, sink, log)
        b = replica("replica-b", kafka, postgres, sink, log)
        procs += [a, b]
        # A replica's scheduler starts once its consumers joined their groups; under load the
        # second replica's joins (three groups, each a rebalance) can take a while.
        await eventually(
            lambda: log.read_text().count("dispatcher started") >= 2,
            timeout=120,
            what="both replicas to start",
        )
        await eventually(
            lambda: sink.count() >= INVITATIONS // 4, timeout=90, what="a quarter of the emails"
        )

        async def a_mid_batch() -> bool:
            async with sessions() as s:
                n = (
                    await s.execute(
                        select(func.count()).where(
                            Send.status == "sending", Send.claimed_by == "replica-a"
                        )
                    )
                ).scalar_one()
            return n > 0

        # Hold the sink so the sends in flight stay in flight, until replica a has some.
        sink.held.set()
        try:
            try:
                await eventually(a_mid_batch, timeout=60, what="replica a to be in mid-batch")
            except AssertionError:
                async with sessions() as s:
                    seen = (
                        await s.execute(
                            select(Send.claimed_by, Send.status, func.count()).group_by(
                                Send.claimed_by, Send.status
                            )
                        )
                    ).all()
                raise AssertionError(
                    f"replica a never in mid-batch; alive: {a.poll() is None}, sends: {seen}, "
                    f"log: {log.read_text()[-3000:]}"
                ) from None
            a.send_signal(signal.SIGKILL)
            a.wait(10)
        finally:
            sink.held.clear()
        # What the killed replica had in flight: claimed (committed as ``sending``), no outcome.
        async with sessions() as s:
            in_flight = (
                await s.execute(
                    select(func.count()).where(
                        Send.status == "sending", Send.claimed_by == "replica-a"
                    )
                )
            ).scalar_one()
        port = free_port()
        a = replica("replica-a", kafka, postgres, sink, log, port)  # restarted, same name
        procs.append(a)

        async def finished() -> dict[str, int] | None:
            async with sessions() as s:
                rows = dict(
                    (await s.execute(select(Send.status, func.count()).group_by(Send.status))).all()
                )
            done = rows.get("sent", 0) + rows.get("in_doubt", 0) + rows.get("failed", 0)
            return rows if done == INVITATIONS else None

        statuses = await eventually(finished, timeout=120, what="every send to finish")
        await asyncio.sleep(1.0)  # room for a late duplicate to arrive, if there were one

        received = Counter(str(m["X-Kaiku-Invitation"]) for m in sink.messages)
        async with sessions() as s:
            rows = (await s.execute(select(Send.invitation_id, Send.status))).all()
        by_status: dict[str, set[str]] = {}
        for invitation_id, status in rows:
            by_status.setdefault(status, set()).add(str(invitation_id))
        sent, doubt = by_status.get("sent", set()), by_status.get("in_doubt", set())

        print(
            f"replicas: {len(sent)} sent, {len(doubt)} in doubt, {in_flight} in flight at the "
            f"kill, {sum(received.values())} emails received"
        )
        # Nothing twice.
        assert [i for i, n in received.items() if n > 1] == []
        # Every invitation is sent or in doubt; none failed, none is silently missing.
        assert statuses.get("failed", 0) == 0, statuses
        assert sent | doubt == {str(i.invitation_id) for i in sent_ids}
        assert sent <= set(received), "a send recorded as sent never arrived"
        assert set(received) <= sent | doubt
        # In doubt: exactly what the killed replica had in flight, no more.
        assert len(doubt) == in_flight <= 40, (len(doubt), in_flight)
        assert in_flight > 0, "the kill did not land mid-batch; nothing was tested"
        # The ops CLI lists exactly those, and the restarted replica counts them in its metrics.
        cli = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "services.cli", "sends", "in-doubt", "--format", "json"),
            env=environment(postgres),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await cli.communicate()
        assert cli.returncode == 0
        assert {r["invitation_id"] for r in json.loads(out)} == doubt
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        assert f"kaiku_invitations_in_doubt_total {float(in_flight)}" in metrics
        log_text = log.read_text()
        assert "are now in doubt" in log_text
        assert "@example.com" not in log_text
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        sink.stop()
        await engine.dispose()

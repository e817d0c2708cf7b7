"""``make bench``: throughput figures, each beside a bare baseline measured in the same run.

Every figure is printed as

    bench: NAME VALUE UNIT (baseline VALUE UNIT, ratio R)

and all of them are written to ``var/bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import FastAPI, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.common import events
from services.common.config import DatabaseSettings, HttpSettings, KafkaSettings
from services.common.db import create_tables
from services.common.kafka import ConsumerLoop, Outgoing, ensure_topics
from services.common.program import load_program
from services.common.runtime import Runtime
from services.common.serve import tune_gc
from services.common.tokens import LinkKeys
from services.embedded import EmbeddedBroker
from services.trigger.decoding import decode_event
from services.trigger.handlers import EventHandler
from services.trigger.ingress.generic import sign
from services.trigger.models import Base as TriggerBase
from services.trigger.rules import evaluate
from tests.bench import dispatch, e2e, pages, scores
from tests.bench.http import Served, requests_per_second

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get(
    "KAIKU_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: float
    baseline_unit: str

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else 0.0

    def line(self) -> str:
        return (
            f"bench: {self.name} {self.value:.0f} {self.unit} "
            f"(baseline {self.baseline:.0f} {self.baseline_unit}, ratio {self.ratio:.2f})"
        )


def event(i: int) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": f"bench-{i}",
            "source": "bench://shop",
            "type": "order.delivered" if i % 2 else "ticket.solved",
            "time": "2026-11-20T14:03:00Z",
            "data": {
                "customer": {
                    "id": f"cust-{i % 5000}",
                    "email": f"c{i % 5000}@example.com",
                    "locale": "fi",
                    "account_id": f"acct-{i % 300}",
                },
                "touchpoint": "support",
                "team": "billing",
            },
        }
    ).encode()


async def preload(kafka: KafkaSettings, n: int) -> None:
    await ensure_topics(kafka)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=5)
    await producer.start()
    futures = [
        await producer.send(kafka.topic(events.EVENTS), event(i), key=f"cust-{i % 5000}".encode())
        for i in range(n)
    ]
    await asyncio.gather(*futures)
    await producer.stop()


async def bare_loop(kafka: KafkaSettings, n: int) -> float:
    """The baseline: consume → produce → await → commit, with nothing else."""
    consumer = AIOKafkaConsumer(
        kafka.topic(events.EVENTS),
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=f"bare-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=kafka.max_batch,
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all", linger_ms=2)
    await consumer.start()
    await producer.start()
    done = 0
    started = 0.0
    first = 0
    while done < n:
        batch = await consumer.getmany(timeout_ms=200, max_records=kafka.max_batch)
        futures = []
        for records in batch.values():
            for r in records:
                futures.append(await producer.send(kafka.topic("bare-out"), r.value, key=r.key))
        await asyncio.gather(*futures)
        if batch:
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
        done += sum(len(rs) for rs in batch.values())
        if not started and done:  # steady state: from the end of the first batch
            started, first = time.perf_counter(), done
    elapsed = time.perf_counter() - started
    await consumer.stop()
    await producer.stop()
    return (n - first) / elapsed


async def trigger_loop(kafka: KafkaSettings, database: DatabaseSettings, n: int) -> float:
    """The trigger worker's real loop: decode, rules, dedupe + ledger in SQL, produce, commit."""
    runtime = Runtime(name="trigger", kafka=kafka, database=database, metadata=TriggerBase.metadata)
    await create_tables(runtime.engine, TriggerBase.metadata, database.schema_name)
    await runtime.producer.start()
    loop = ConsumerLoop(
        name="bench-trigger",
        topic=events.EVENTS,
        group_id=f"bench-{uuid.uuid4().hex[:6]}",
        decode=decode_event,
        handler=EventHandler(
            load_program(ROOT / "deploy/local/program.yaml"),
            LinkKeys.parse("0:bench-key-0123456789abcdef"),
        ),
        sessions=runtime.sessions,
        producer=runtime.producer,
        settings=kafka,
    )
    await loop.start()
    while loop.processed == 0:  # the group join is not part of the figure
        await asyncio.sleep(0.001)
    started, first = time.perf_counter(), loop.processed
    while loop.processed < n:
        if loop.error is not None:
            raise loop.error
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    await loop.stop()
    await runtime.producer.stop()
    await runtime.engine.dispose()
    return (n - first) / elapsed


class _Record:
    """Just what the decoder reads of a consumer record."""

    def __init__(self, value: bytes) -> None:
        self.value, self.key, self.headers = value, None, []
        self.topic, self.partition, self.offset = "bench", 0, 0


def decode_and_rules(n: int) -> float:
    """Events/s of the two per-event steps no database or broker is in: decoding and
    validating the CloudEvent, and evaluating the rules into a signed invitation, serialized.
    It bounds what any trigger loop in this process can reach."""
    program = load_program(ROOT / "deploy/local/program.yaml")
    links = LinkKeys.parse("0:bench-key-0123456789abcdef")
    records = [_Record(event(i)) for i in range(n)]
    started = time.perf_counter()
    now = events.utcnow()
    for record in records:
        for outcome in evaluate(program, decode_event(record), now, links.issue):  # type: ignore[arg-type]
            if outcome.invitation is not None:
                Outgoing(events.INVITATIONS, "", outcome.invitation).encode()
    return n / (time.perf_counter() - started)


async def pg_schema() -> DatabaseSettings:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_async_engine(PG_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    await engine.dispose()
    return DatabaseSettings(url=PG_URL, schema_name=schema)


async def drop_schema(db: DatabaseSettings) -> None:
    engine = create_async_engine(PG_URL)
    async with engine.begin() as conn:
        await conn.execute(text(f'DROP SCHEMA "{db.schema_name}" CASCADE'))
    await engine.dispose()


def minimal_app() -> FastAPI:
    """The baseline: a FastAPI endpoint that reads the body and answers 202."""
    app = FastAPI()

    @app.post("/v1/webhooks/generic", status_code=202)
    async def accept(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return app


WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"bench-generic-secret-0123456789ab").decode()


def generic_webhook(i: int) -> tuple[str, dict[str, str], bytes]:
    body = json.dumps(
        {
            "id": f"wh-{uuid.uuid4().hex}-{i}",
            "type": "order.delivered",
            "customer": {
                "id": f"cust-{i % 5000}",
                "email": f"c{i % 5000}@example.com",
                "locale": "fi",
            },
            "team": "logistics",
        }
    ).encode()
    ts = int(time.time())
    msg_id = f"msg_{i}"
    return (
        "/v1/webhooks/generic",
        {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(WEBHOOK_SECRET, msg_id, ts, body),
        },
        body,
    )


async def webhook_ingress(kafka: KafkaSettings, n: int) -> Figure:
    """Webhook ingress requests/s (signature check, mapping, Kafka ack) beside a minimal
    FastAPI endpoint served the same way."""
    from services.common.settings import CommonSettings
    from services.trigger.app import create_app
    from services.trigger.ingress.generic import Generic, GenericSettings

    sqlite_path = ROOT / "var" / f"bench-ingress-{uuid.uuid4().hex[:6]}.db"
    settings = CommonSettings(
        kafka=kafka, database=DatabaseSettings(url=f"sqlite+aiosqlite:///{sqlite_path}")
    )
    vendor = Generic(GenericSettings(webhook_secret=WEBHOOK_SECRET))
    app = create_app(
        settings,
        program=load_program(ROOT / "deploy/local/program.yaml"),
        vendors={"generic": vendor},
    )
    try:
        with Served(app) as url:
            ingress = await requests_per_second(url, generic_webhook, n)
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
    with Served(minimal_app()) as url:
        baseline = await requests_per_second(url, generic_webhook, n)
    return Figure("webhook_ingress", ingress, "requests/s", baseline, "requests/s")


def markdown_table(report: dict[str, Any]) -> str:
    """``var/bench.json`` as the README's table: each figure beside its baseline."""
    machine = report["machine"]
    lines = [
        f"Taken {report.get('taken_at', '?')} on {machine['cpus']} cores, {machine['platform']}, "
        f"Python {machine['python']}.",
        "",
        "| figure | value | baseline | ratio |",
        "|---|---:|---:|---:|",
    ]
    for f in report["figures"]:
        lines.append(
            f"| `{f['name']}` | {f['value']:,.0f} {f['unit']} | "
            f"{f['baseline']:,.0f} {f['baseline_unit']} | {f['ratio']:.2f} |"
        )
    return "\n".join(lines)


GROUPS = ("trigger", "ingress", "dispatcher", "pages", "e2e", "memory", "scores")


async def main(n: int, only: set[str]) -> list[Figure]:
    # The services' garbage-collector settings (serve.tune_gc), for every figure and baseline
    # measured in this process and the servers it forks.
    tune_gc(HttpSettings().gc_threshold)
    broker = EmbeddedBroker()
    broker.start()
    figures: list[Figure] = []

    def fresh_kafka() -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=broker.bootstrap,
            topic_prefix=f"bench-{uuid.uuid4().hex[:6]}.",
            enable_idempotence=False,
            partitions=6,
        )

    try:
        kafka = fresh_kafka()
        if "trigger" in only:
            figures.extend(await trigger_figures(kafka, n))
        if "ingress" in only:
            figures.append(await webhook_ingress(kafka, max(1000, n // 5)))
        if "dispatcher" in only:
            program = load_program(ROOT / "deploy/local/program.yaml")
            sends = max(500, n // 10)
            for name, measure in (("smtp", dispatch.smtp_rates), ("http", dispatch.http_rates)):
                pg = await pg_schema()
                try:
                    rate, bare = await measure(program, pg, sends)
                finally:
                    await drop_schema(pg)
                figures.append(Figure(f"dispatcher_sends_{name}", rate, "sends/s", bare, "sends/s"))
        if "pages" in only:
            pg = await pg_schema()
            try:
                figures.append(Figure(*await pages.survey_page(kafka, pg, max(1000, n // 5))))
            finally:
                await drop_schema(pg)
        for group, measure in (("e2e", e2e.end_to_end), ("memory", e2e.memory)):
            if group in only:
                pg = await pg_schema()
                try:
                    results = await measure(fresh_kafka(), pg, ROOT / "var")
                    figures.extend(Figure(*result) for result in results)
                finally:
                    await drop_schema(pg)
        if "scores" in only:
            # /v1/scores over KAIKU_BENCH_SCORE_ANSWERS answers (10M) beside count(*) of them.
            figures.extend(Figure(*result) for result in await scores.figures())
    finally:
        broker.stop()
    return figures


async def trigger_figures(kafka: KafkaSettings, n: int) -> list[Figure]:
    figures: list[Figure] = []
    await preload(kafka, n)
    baseline = await bare_loop(kafka, n)
    figures.append(
        Figure("trigger_decode_and_rules", decode_and_rules(n), "events/s", baseline, "events/s")
    )
    pg = await pg_schema()
    try:
        figures.append(
            Figure(
                "trigger_events_postgres",
                await trigger_loop(kafka, pg, n),
                "events/s",
                baseline,
                "events/s",
            )
        )
    finally:
        await drop_schema(pg)
    sqlite_path = ROOT / "var" / f"bench-{uuid.uuid4().hex[:6]}.db"
    sqlite_path.parent.mkdir(exist_ok=True)
    try:
        sqlite = DatabaseSettings(url=f"sqlite+aiosqlite:///{sqlite_path}")
        figures.append(
            Figure(
                "trigger_events_sqlite",
                await trigger_loop(kafka, sqlite, n),
                "events/s",
                baseline,
                "events/s",
            )
        )
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
    # For contrast: the same code, one event per transaction (per-event SQL statements).
    pg = await pg_schema()
    try:
        one_by_one = kafka.model_copy(update={"max_batch": 1})
        figures.append(
            Figure(
                "trigger_events_postgres_per_event",
                await trigger_loop(one_by_one, pg, min(n, 2000)),
                "events/s",
                baseline,
                "events/s",
            )
        )
    finally:
        await drop_schema(pg)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated benchmarks to run (default all: {','.join(GROUPS)})",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="print var/bench.json as a Markdown table (for the README) and run nothing",
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads((ROOT / "var" / "bench.json").read_text())))
        raise SystemExit(0)
    only = set(args.only.split(","))
    if only - set(GROUPS):
        parser.error(f"unknown benchmark(s): {', '.join(sorted(only - set(GROUPS)))}")
    (ROOT / "var").mkdir(exist_ok=True)
    results = asyncio.run(main(args.events, only))
    for figure in results:
        print(figure.line(), flush=True)
    out = ROOT / "var" / "bench.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "benchmarks": sorted(only),
                "events": args.events,
                "figures": [dict(asdict(f), ratio=round(f.ratio, 3)) for f in results],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out.relative_to(ROOT)}")

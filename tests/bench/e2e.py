"""End-to-end and memory benchmarks: the three services as separate processes, as deployed.

- ``end_to_end``: signed webhooks posted to the trigger's ``/v1/webhooks/generic`` at a steady
  rate (``KAIKU_BENCH_E2E_RATE``, 500/s) for ``KAIKU_BENCH_E2E_SECONDS`` (60 s), each for a new
  customer, through the trigger, the dispatcher and SMTP to an aiosmtpd sink (a process of its
  own), from a lean open-loop client (``loadgen``: each POST starts on schedule, whatever the
  answers before it do). Latency is from the POST's scheduled start to the message's arrival at
  the sink (p50, p99), beside a bare Kafka hop
  (produce → consume) on the same broker at the same rate; the delivered rate (messages per
  second arriving while the load lasts and drains) is the peak the chain sustains, beside the
  offered rate.
- ``memory``: ``KAIKU_BENCH_MEMORY_EVENTS`` (1,000,000) events for 5,000 customers produced to
  ``kaiku.events``; the resident memory of each service when the trigger has committed 20 % of
  them and when it has committed all, and the growth between the two.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.common import events
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.kafka import ensure_topics
from services.trigger.ingress.generic import sign
from tests.bench.loadgen import open_loop
from tests.bench.sink import read_arrivals
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_ZTJlLWJlbmNoLXNlY3JldC0wMTIzNDU2Nzg5YWJjZGVm"
Result = tuple[str, float, str, float, str]


class Sink:
    """The SMTP sink (``tests.bench.sink``) in a process of its own, so that it takes no CPU
    from the load generator's process; it notes when each recipient's message arrived."""

    def __init__(self, var: Path) -> None:
        self.port = free_port()
        self.path = var / f"bench-sink-{uuid.uuid4().hex[:6]}.txt"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.sink", str(self.port), str(self.path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the SMTP sink did not start")

    def arrived(self) -> dict[str, float]:
        return read_arrivals(self.path)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.path.unlink(missing_ok=True)


def bench_program(path: Path) -> Path:
    """The example program without its daily quota (it would cap the run at 500 sends)."""
    program = yaml.safe_load((ROOT / "deploy/local/program.yaml").read_text())
    program["quotas"] = []
    path.write_text(yaml.safe_dump(program, allow_unicode=True))
    return path


def start(
    name: str, kafka: KafkaSettings, db: DatabaseSettings, sink: Sink, program: Path, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "KAIKU_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "KAIKU_TOPIC_PREFIX": kafka.topic_prefix,
        "KAIKU_KAFKA_ENABLE_IDEMPOTENCE": "false",
        "KAIKU_DATABASE_URL": db.url,
        "KAIKU_DATABASE_SCHEMA": db.schema_name or "",
        "KAIKU_PROGRAM": str(program),
        "KAIKU_PORT": str(port),
        "KAIKU_API_TOKEN": "bench",
        "KAIKU_EMAIL_PROVIDER": "smtp",
        "KAIKU_SMTP_HOST": "127.0.0.1",
        "KAIKU_SMTP_PORT": str(sink.port),
        "KAIKU_GENERIC_WEBHOOK_SECRET": SECRET,
        "KAIKU_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        env=env,
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


async def ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"a service exited while starting: see {log}")
            try:
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready in 2 minutes: see {log}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def webhook(run: str, i: int) -> tuple[dict[str, str], bytes]:
    body = json.dumps(
        {
            "id": f"e2e-{run}-{i}",
            "type": "order.delivered",
            "customer": {"id": f"e2e-{run}-{i}", "email": recipient(run, i), "locale": "fi"},
            "team": "logistics",
        }
    ).encode()
    ts, msg_id = int(time.time()), f"msg_{run}_{i}"
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(SECRET, msg_id, ts, body),
    }
    return headers, body


def recipient(run: str, i: int) -> str:
    return f"e2e-{run}-{i}@bench.example"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def kafka_hop(kafka: KafkaSettings, rate: int, seconds: float) -> list[float]:
    """The baseline: produce → consume latencies (seconds) on the same broker at ``rate``."""
    topic = kafka.topic(f"hop-{uuid.uuid4().hex[:6]}")
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=2)
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest"
    )
    await producer.start()
    await producer.send_and_wait(topic, b"warm-up")
    await consumer.start()
    n = int(rate * seconds)
    latencies: list[float] = []

    async def consume() -> None:
        while len(latencies) < n:
            batch = await consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for records in batch.values():
                latencies.extend(now - float(r.value) for r in records if r.value != b"warm-up")

    reader = asyncio.create_task(consume())
    started = time.monotonic()
    for i in range(n):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        await producer.send(topic, str(time.monotonic()).encode())
    await asyncio.wait_for(reader, 60)
    await producer.stop()
    await consumer.stop()
    return latencies


async def end_to_end(kafka: KafkaSettings, db: DatabaseSettings, var: Path) -> list[Result]:
    rate = int(os.environ.get("KAIKU_BENCH_E2E_RATE", "500"))
    seconds = float(os.environ.get("KAIKU_BENCH_E2E_SECONDS", "60"))
    await ensure_topics(kafka)
    hop = await kafka_hop(kafka, rate, min(seconds, 20))
    sink = Sink(var)
    log = var / "bench-e2e.log"
    program = bench_program(var / "bench-program.yaml")
    procs: list[subprocess.Popen[bytes]] = []
    n = int(rate * seconds)
    run = uuid.uuid4().hex[:6]

    def build(i: int) -> tuple[str, str, dict[str, str], bytes]:
        return ("POST", "/v1/webhooks/generic", *webhook(run, i))

    try:
        urls = {}
        for name in ("trigger", "dispatcher", "collector"):
            proc, urls[name] = start(name, kafka, db, sink, program, log)
            procs.append(proc)
        for proc, url in zip(procs, urls.values(), strict=True):
            await ready(url, proc, log)
        outcomes, offered_for = await open_loop(urls["trigger"], build, rate=rate, n=n)
        posted = {recipient(run, o.index): o.scheduled for o in outcomes if o.status == 202}
        refused = [o.status for o in outcomes if o.status != 202]
        # Drain: until every accepted event's email arrived, or nothing arrived for 30 s.
        last, count = time.monotonic(), -1
        while len((arrived := sink.arrived()).keys() & posted.keys()) < len(posted):
            if len(arrived) != count:
                last, count = time.monotonic(), len(arrived)
            elif time.monotonic() - last > 30:
                break
            await asyncio.sleep(0.5)
    finally:
        stop(procs)
        arrived = sink.arrived()
        sink.stop()
    started = min(posted.values(), default=0.0)
    latencies = [arrived[e] - at for e, at in posted.items() if e in arrived]
    arrivals = sorted(arrived[e] for e in posted if e in arrived)
    span = (arrivals[-1] - started) if arrivals else float("nan")
    delivered_rate = len(arrivals) / span if arrivals else 0.0
    print(
        f"end-to-end: offered {rate}/s for {offered_for:.0f} s; {len(posted)} accepted, "
        f"{len(refused)} refused {sorted(set(refused))}, {len(arrivals)} emails arrived "
        f"(mean latency {statistics.fmean(latencies) if latencies else float('nan'):.1f} s)",
        flush=True,
    )
    return [
        ("e2e_latency_p50", percentile(latencies, 0.5) * 1000, "ms",
         percentile(hop, 0.5) * 1000, "ms"),
        ("e2e_latency_p99", percentile(latencies, 0.99) * 1000, "ms",
         percentile(hop, 0.99) * 1000, "ms"),
        ("e2e_delivered_rate", delivered_rate, "events/s", float(rate), "events/s offered"),
    ]  # fmt: skip


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def committed(kafka: KafkaSettings, group: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=group)
    await consumer.start()
    try:
        topic = kafka.topic(events.EVENTS)
        await consumer.topics()
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum([await consumer.committed(tp) or 0 for tp in parts])
    finally:
        await consumer.stop()


def memory_event(i: int) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": f"mem-{i}",
            "source": "bench://memory",
            "type": "order.delivered" if i % 2 else "ticket.solved",
            "data": {
                "customer": {"id": f"mem-{i % 5000}", "email": f"m{i % 5000}@bench.example"},
                "touchpoint": "support",
                "team": "billing",
            },
        }
    ).encode()


async def memory(kafka: KafkaSettings, db: DatabaseSettings, var: Path) -> list[Result]:
    n = int(os.environ.get("KAIKU_BENCH_MEMORY_EVENTS", "1000000"))
    await ensure_topics(kafka)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=20)
    await producer.start()
    for chunk in range(0, n, 10_000):
        futures = [
            await producer.send(kafka.topic(events.EVENTS), memory_event(i), key=f"m{i}".encode())
            for i in range(chunk, min(n, chunk + 10_000))
        ]
        await asyncio.gather(*futures)
    await producer.stop()
    sink = Sink(var)
    log = var / "bench-memory.log"
    program = bench_program(var / "bench-program.yaml")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    marks: dict[str, list[float]] = {name: [] for name in ("trigger", "dispatcher", "collector")}
    started = time.monotonic()
    try:
        for name in marks:
            procs[name], url = start(name, kafka, db, sink, program, log)
            await ready(url, procs[name], log)
        group = f"{kafka.topic_prefix}trigger"
        for mark in (n // 5, n):
            while (done := await committed(kafka, group)) < mark:
                if any(p.poll() is not None for p in procs.values()):
                    raise RuntimeError(f"a service died during the memory run: see {log}")
                await asyncio.sleep(2)
            await asyncio.sleep(5)  # the dispatcher and collector catch up with the trigger
            for name, proc in procs.items():
                marks[name].append(rss_mib(proc.pid))
            sizes = ", ".join(f"{k} {v[-1]:.0f} MiB" for k, v in marks.items())
            elapsed = time.monotonic() - started
            print(f"memory: {done} events in {elapsed:.0f} s: {sizes}", flush=True)
    finally:
        stop(list(procs.values()))
        sink.stop()
    return [
        (f"memory_growth_{name}", (after - before), "MiB", before, "MiB at 20 %")
        for name, (before, after) in marks.items()
    ]

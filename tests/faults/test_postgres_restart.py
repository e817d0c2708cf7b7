"""PostgreSQL restarted in the middle of a run: the services' readiness turns false while it is
away and true again once it is back, they reconnect and carry on (transient errors are retried
with back-off, services/common/kafka.py ``is_transient``), and nothing is lost: the same
invariants as after kill -9 (tests/faults/harness.py ``check``).

The restarted server is a private cluster of the test's own (``initdb`` + ``pg_ctl`` on a free
port, as the ``postgres`` user when the test runs as root), never the shared one that other
tests use at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from services.common.config import DatabaseSettings, KafkaSettings
from services.embedded import free_port
from tests.faults.harness import SERVICES, Answers, Run, produce, say, workload
from tests.support import SmtpSink

EVENTS = 2000
DOWN = 4.0  # seconds PostgreSQL stays stopped (at least: until every service said not ready)


def pg_bin() -> Path:
    """The directory of initdb and pg_ctl: ``KAIKU_TEST_PG_BINDIR``, else Debian's layout, else
    the PATH."""
    configured = os.environ.get("KAIKU_TEST_PG_BINDIR")
    candidates = [configured] if configured else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    pytest.fail(
        "a private PostgreSQL cluster needs initdb and pg_ctl (apt-get install postgresql, or "
        "set KAIKU_TEST_PG_BINDIR); the shared server is never restarted by the tests"
    )


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory, on a free port, to stop and start."""

    def __init__(self) -> None:
        self.bin = pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="kaiku-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.log = self.dir / "postgres.log"
        # PostgreSQL refuses to run as root: run it as the postgres user then.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user, self.user)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (
            f"{' '.join(command)} failed ({done.returncode}): {done.stdout}{done.stderr}"
            f"{self.log.read_text() if self.log.exists() else ''}"
        )

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: what a service restart does (sessions are disconnected, then a clean
        shutdown); ``immediate`` would be a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.SubprocessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
    except AssertionError as exc:
        pg.destroy()
        pytest.fail(f"cannot start a private PostgreSQL cluster: {exc}")
    yield pg
    pg.destroy()


async def readiness(run: Run) -> dict[str, bool | None]:
    async with httpx.AsyncClient(timeout=5) as http:
        return {n: await run[n].readiness(http) for n in SERVICES}


async def test_services_reconnect_after_a_postgres_restart_and_lose_nothing(
    private_postgres: PrivatePostgres, kafka: KafkaSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    pg = private_postgres
    engine = create_async_engine(pg.url)
    async with engine.begin() as conn:
        await conn.execute(text('CREATE SCHEMA "faults"'))
    await engine.dispose()
    database = DatabaseSettings(url=pg.url, schema_name="faults")
    seed = int(os.environ.get("KAIKU_CHAOS_SEED") or random.randrange(2**32))
    say(f"seed {seed} (KAIKU_CHAOS_SEED={seed} replays it), {EVENTS} events")
    rng = random.Random(seed)
    sent = workload(rng, EVENTS, customers=200, accounts=25)

    async with Run(kafka, database, smtp_sink, tmp_path) as run:
        await run.stack.start()
        answers = Answers(run["collector"], smtp_sink, random.Random(rng.random()), 20, 0.2)
        enough = asyncio.Event()

        async def feed() -> None:  # over about ten seconds, the restart in the middle
            for i in range(0, len(sent), 100):
                await produce(kafka, sent[i : i + 100])
                await asyncio.sleep(0.5)

        feeding = asyncio.create_task(feed())
        await asyncio.sleep(rng.uniform(2.0, 5.0))

        # People answer the emails that arrived while PostgreSQL restarts, and after.
        answering = asyncio.create_task(answers.run(enough))
        await asyncio.sleep(0.3)
        # The restart: stopped (sessions cut), down until every service says it is not ready.
        stopped = time.monotonic()
        pg.stop("fast")
        say("PostgreSQL stopped")
        not_ready: dict[str, bool | None] = {}
        while time.monotonic() - stopped < DOWN or not all(v is False for v in not_ready.values()):
            for name, ready in (await readiness(run)).items():
                if ready is False:
                    not_ready[name] = False
                elif name not in not_ready:
                    not_ready[name] = ready
            assert time.monotonic() - stopped < 60, (
                f"readiness while PostgreSQL is down: {not_ready}"
            )
            died = run.stack.died()
            assert died is None, died
            await asyncio.sleep(0.2)
        pg.start()
        down = time.monotonic() - stopped
        say(f"PostgreSQL started again after {down:.1f}s down; every service said not ready")

        async def all_ready() -> bool:
            return all((await readiness(run)).values())

        deadline = time.monotonic() + 60
        while not await all_ready():
            died = run.stack.died()
            assert died is None, died
            assert time.monotonic() < deadline, f"not ready again: {await readiness(run)}"
            await asyncio.sleep(0.2)
        say(f"every service ready again {time.monotonic() - stopped - down:.1f}s after the start")

        await feeding
        try:
            await asyncio.wait_for(asyncio.shield(answering), 60)
        finally:
            enough.set()
            await answering
        assert len(answers.given) == 20, f"only {len(answers.given)} answers given"
        say(f"answers posted again after a refusal: {dict(answers.refusals)} (by HTTP status)")
        # While PostgreSQL is away the survey page says so (503, try again), never a 500; a 404
        # is an invitation the collector has not stored yet.
        assert set(answers.refusals) <= {404, 503}, answers.refusals
        await run.finish(
            accepted=(str(e["id"]) for e in sent),
            answers=answers.given,
            # A round of sends whose start could not be recorded while PostgreSQL was away:
            # retried for a minute, so none here.
            max_in_doubt=0,
        )
        logs = "".join(run[n].text() for n in SERVICES)
        assert "retrying" in logs or "transient" in logs, "nothing noticed the restart"
        for n in SERVICES:
            assert run[n].starts == 1, f"{n} was restarted"

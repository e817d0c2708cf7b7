"""kill -9 of a trigger, a dispatcher or a collector at random moments of a run of 20,000
events: afterwards no event is lost (each has exactly one decision), no fatigue limit is
exceeded, no invitation is emailed twice (nor left unsent unless in doubt), no answer is lost.

The three services run as processes (``python -m services.<name>``) on the real broker, a
PostgreSQL schema of the test's own and an SMTP sink, with the example program
(deploy/local/program.yaml: one survey a customer a fortnight, five an account a week, deferred
beyond; 500 NPS surveys a day). Events (ten a customer, eight customers an account, happening
now, email only: the program's quiet hours are for SMS) are produced straight onto the events
topic while a seeded random schedule SIGKILLs each service in turn, at random moments, and
restarts it, and people answer the emails on the collector's survey page.

``KAIKU_CHAOS_EVENTS`` (default 20000: 65-135 s on two cores, 10000: about 60-75 s) sets the
size of the run, ``KAIKU_CHAOS_KILLS`` (default 8) the number of kills, and ``KAIKU_CHAOS_SEED``
replays a schedule (the seed is printed: ``pytest -s``, or the captured output of a failure).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

from services.common.config import DatabaseSettings, KafkaSettings
from tests.faults.harness import (
    SERVICES,
    Answers,
    Run,
    produce,
    say,
    workload,
)
from tests.support import SmtpSink

EVENTS = int(os.environ.get("KAIKU_CHAOS_EVENTS", "20000"))
KILLS = int(os.environ.get("KAIKU_CHAOS_KILLS", "8"))
ANSWERS = 40
CHUNK = 250  # events per produce
SPAN = 24.0  # seconds over which the events arrive and the kills happen, about


async def test_kill9_at_random_moments_loses_and_repeats_nothing(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    seed = int(os.environ.get("KAIKU_CHAOS_SEED") or random.randrange(2**32))
    say(f"seed {seed} (KAIKU_CHAOS_SEED={seed} replays this schedule), {EVENTS} events")
    rng = random.Random(seed)
    # Ten events a customer, eight customers an account: every limit of the program bites.
    customers = max(400, EVENTS // 10)
    sent = workload(rng, EVENTS, customers=customers, accounts=customers // 8)
    started = time.monotonic()
    async with Run(kafka, postgres, smtp_sink, tmp_path) as run:
        stack = run.stack
        await stack.start()
        say(f"services up in {time.monotonic() - started:.1f}s")
        answers = Answers(
            stack["collector"], smtp_sink, random.Random(rng.random()), ANSWERS, SPAN / ANSWERS
        )
        enough = asyncio.Event()

        async def feed() -> None:
            """The events arrive over about as long as the kills go on."""
            chunks = range(0, len(sent), CHUNK)
            pause = SPAN / len(chunks)
            for i in chunks:
                await produce(kafka, sent[i : i + CHUNK])
                await asyncio.sleep(rng.uniform(0.5, 1.5) * pause)

        async def chaos() -> list[tuple[float, str]]:
            """Kill each service in turn, in a random order, at random moments; restart it
            after a random while."""
            done: list[tuple[float, str]] = []
            victims = [SERVICES[i % len(SERVICES)] for i in range(KILLS)]  # each, in turn
            rng.shuffle(victims)
            for name in victims:
                await asyncio.sleep(rng.uniform(0.5, 2.0) * SPAN / KILLS)
                stack[name].kill()
                done.append((round(time.monotonic() - started, 1), name))
                await asyncio.sleep(rng.uniform(0.0, 1.0))
                stack[name].start()
                died = stack.died()
                assert died is None, died
            return done

        tasks = [
            asyncio.create_task(feed()),
            asyncio.create_task(answers.run(enough)),
        ]
        kills = await chaos()
        say(f"kills (seconds into the run, service): {kills}")
        await tasks[0]
        for name in SERVICES:
            await stack[name].wait_ready(90)
        # The answers are given while the last services catch up.
        try:
            await asyncio.wait_for(asyncio.shield(tasks[1]), 60)
        finally:
            enough.set()
            await tasks[1]
        assert len(answers.given) == ANSWERS, (
            f"only {len(answers.given)} of {ANSWERS} answers given: {stack.logs()}"
        )
        say(
            f"answers posted again after a refusal: {dict(answers.refusals)} (by HTTP status, "
            f"0: no answer); lags before quiescence: {await run.lags()}"
        )
        await run.finish(
            accepted=(str(e["id"]) for e in sent),
            answers=answers.given,
            # A kill of the dispatcher between a send's start and its record leaves the sends
            # started together in doubt: KAIKU_SEND_CONCURRENCY (20) at most per kill.
            max_in_doubt=20 * stack["dispatcher"].kills,
        )
        logs = {n: stack[n].text() for n in SERVICES}
        say(
            f"kills per service: { {n: stack[n].kills for n in SERVICES} }; seed {seed}; "
            f"events redelivered to the trigger: "
            f"{logs['trigger'].count('was processed before: publishing its result again')}; "
            f"dispatcher claims handed back: {logs['dispatcher'].count('pending again')}, "
            f"sends in doubt: {logs['dispatcher'].count('are now in doubt')} time(s); "
            f"total {time.monotonic() - started:.1f}s"
        )

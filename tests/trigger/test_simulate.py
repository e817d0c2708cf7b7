"""kaiku simulate: the trigger's own decisions over an event log, no broker, no side effects."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.cli import main

PROGRAM = """
version: 1
defaults: {timezone: Europe/Helsinki}
surveys:
  - {id: support-csat, metric: csat, question: {en: "Q?"}}
triggers:
  - {id: solved, event: ticket.solved, survey: support-csat}
fatigue:
  rules:
    - {id: fortnight, key: customer, scope: global, channel: any, clock: invited,
       window: 14d, limit: 1, action: drop}
    - {id: account-daily, key: account, scope: global, channel: any, clock: invited,
       window: 1d, limit: 2, action: defer}
"""
T0 = datetime(2026, 9, 1, 10, 0, tzinfo=UTC)


def event(
    n: int, customer: str, account: str, at: datetime, kind: str = "ticket.solved"
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"e{n}",
        "source": "t://x",
        "type": kind,
        "time": at.isoformat(),
        "data": {
            "customer": {"id": customer, "email": f"{customer}@example.com", "account_id": account}
        },
    }


def run(
    tmp_path: Path, events: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], *extra: str
) -> dict[str, Any]:
    program = tmp_path / "program.yaml"
    program.write_text(PROGRAM)
    log = tmp_path / "events.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
    with pytest.raises(SystemExit) as done:
        main(["simulate", str(program), str(log), "--format", "json", *extra])
    assert done.value.code == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_volumes_reasons_and_distribution(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [
        event(1, "c1", "a1", T0),
        event(2, "c1", "a1", T0 + timedelta(days=3)),  # fortnight: dropped
        event(3, "c1", "a1", T0 + timedelta(days=20)),  # a new fortnight: invited
        event(4, "c2", "a1", T0 + timedelta(minutes=1)),
        event(5, "c3", "a1", T0 + timedelta(minutes=2)),  # a1's third today: deferred a day
        event(6, "c4", "a2", T0, kind="customer.churned"),  # no trigger
    ]
    report = run(tmp_path, events, capsys)
    assert report["events"] == 6
    assert report["skipped_lines"]["invalid_count"] == 1
    assert report["decisions"] == {"invited": 3, "skipped": 1, "deferred": 1, "ignored": 1}
    assert report["invitations_by_survey"] == {"support-csat (email)": 4}
    assert report["skips_by_reason"] == {"fatigue:fortnight": 1}
    # c1 twice in 30 days (days 0 and 20), c2 and c3 once; account a1 four times.
    assert report["surveys_per_customer_per_window"] == {"1": 2, "2": 1}
    assert report["surveys_per_account_per_window"] == {"4": 1}
    assert report["customers"] == 4


def test_the_window_of_the_distribution_is_a_choice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [event(1, "c1", "a1", T0), event(2, "c1", "a1", T0 + timedelta(days=20))]
    report = run(tmp_path, events, capsys, "--window", "30d")
    assert report["surveys_per_customer_per_window"] == {"2": 1}
    report = run(tmp_path, events, capsys, "--window", "7d")
    assert report["surveys_per_customer_per_window"] == {"1": 1}


def test_the_shipped_sample_log_is_large_enough(capsys: pytest.CaptureFixture[str]) -> None:
    import gzip

    sample = Path(__file__).resolve().parents[2] / "deploy/local/sample-events.jsonl.gz"
    with gzip.open(sample, "rt") as lines:
        assert sum(1 for _ in lines) >= 10_000

"""Write deploy/local/sample-events.jsonl.gz: 12,000 CloudEvents over 60 days for 2,500
customers in 300 accounts, the shape of a mid-size support desk and web shop (deterministic)."""

from __future__ import annotations

import gzip
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

OUT = Path(__file__).with_name("sample-events.jsonl.gz")
START = datetime(2026, 9, 1, tzinfo=UTC)
ZONES = ["Europe/Helsinki"] * 6 + ["Europe/Stockholm"] * 3 + ["Europe/London", None]
LOCALES = ["fi"] * 6 + ["sv"] * 3 + ["en"] * 2


def main() -> None:
    rng = random.Random(4411)
    customers = []
    for n in range(2500):
        zone = rng.choice(ZONES)
        customers.append(
            {
                "id": f"cust-{n:05d}",
                "email": f"customer{n}@example.com",
                "locale": rng.choice(LOCALES),
                **({"timezone": zone} if zone else {}),
                "account_id": f"acct-{rng.randrange(300):04d}",
            }
        )
    weights = [rng.paretovariate(1.2) for _ in customers]  # a few customers write a lot
    events: list[dict[str, object]] = []

    def add(kind: str, customer: dict[str, str], at: datetime, case: str) -> None:
        events.append(
            {
                "specversion": "1.0",
                "id": f"sample-{len(events)}",
                "source": "sample://acme",
                "type": kind,
                "time": at.isoformat().replace("+00:00", "Z"),
                "subject": customer["id"],
                "data": {
                    "customer": customer,
                    "touchpoint": "delivery" if kind == "order.delivered" else "support",
                    "team": rng.choice(["billing", "technical", "logistics"]),
                    "case_id": case,
                },
            }
        )

    while len(events) < 12_000:
        customer = rng.choices(customers, weights)[0]
        # Office hours mostly, some evenings and nights.
        day = START + timedelta(days=rng.randrange(60))
        at = day + timedelta(
            hours=rng.choice([6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 19, 21]),
            minutes=rng.randrange(60),
        )
        case = f"{rng.randrange(100_000, 999_999)}"
        kind = rng.choices(["ticket", "order", "chat"], [55, 30, 15])[0]
        if kind == "order":
            add("order.delivered", customer, at, case)
        elif kind == "chat":
            add("chat.ended", customer, at, case)
        else:  # a ticket's life: created, solved hours later, sometimes reopened and solved
            add("ticket.created", customer, at, case)
            at += timedelta(hours=rng.randrange(1, 72))
            add("ticket.solved", customer, at, case)
            if rng.random() < 0.1:
                at += timedelta(hours=rng.randrange(1, 24))
                add("ticket.reopened", customer, at, case)
                at += timedelta(hours=rng.randrange(1, 48))
                add("ticket.solved", customer, at, case)
    events.sort(key=lambda e: e["time"])
    with gzip.open(OUT, "wt", encoding="utf-8", compresslevel=9) as out:
        for event in events:
            out.write(json.dumps(event, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({len(events)} events)")


if __name__ == "__main__":
    main()

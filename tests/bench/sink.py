"""The end-to-end benchmarks' SMTP sink, as a process of its own: ``python -m tests.bench.sink
PORT FILE`` accepts every message and appends ``RECIPIENT MONOTONIC-SECONDS`` to FILE for each
recipient as its message arrives (the monotonic clock is the machine's, shared by processes)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class Arrivals:
    def __init__(self, path: Path) -> None:
        self.out = path.open("a", buffering=1)  # a line at a time: readable while it runs

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.monotonic()
        self.out.write("".join(f"{rcpt} {now:.6f}\n" for rcpt in envelope.rcpt_tos))
        return "250 Message accepted for delivery"


def read_arrivals(path: Path) -> dict[str, float]:
    """The first arrival of each recipient written so far."""
    arrived: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rcpt, _, at = line.rpartition(" ")
            if rcpt:
                arrived.setdefault(rcpt, float(at))
    return arrived


def main() -> None:
    port, path = int(sys.argv[1]), Path(sys.argv[2])
    controller = Controller(Arrivals(path), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()

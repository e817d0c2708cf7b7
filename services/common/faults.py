"""Failpoints: named places where a test can make the process die as if it were SIGKILLed, or
pause so that it is provably in the middle of something.

Set ``KAIKU_FAILPOINTS=item[,item...]``, each item ``name[@N][:action]``:

- ``name`` or ``name:kill`` dies with SIGKILL at the first pass, ``name@N`` at the N-th;
- ``name:sleep=S`` sleeps S seconds at every pass (from the N-th with ``@N``), after writing
  ``failpoint <name> sleeping`` to stderr, so a test can wait for that line and act (send
  SIGTERM, say) while the process is inside the failpoint's step; ``failpoint <name> woke``
  follows. Only ``await afailpoint(...)`` sleeps without blocking the event loop.

Nothing is active unless the variable is set, and a pass through an inactive failpoint costs one
dict look-up. Used by the crash tests to kill a consumer at an exact moment (after the database
commit and before the offset commit) and by the shutdown tests to stop one mid-batch.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class _Point:
    nth: int
    sleep: float | None  # None: kill


def parse(spec: str) -> dict[str, _Point]:
    """The failpoints of a ``KAIKU_FAILPOINTS`` value."""
    points: dict[str, _Point] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        head, _, action = item.partition(":")
        name, _, nth = head.strip().partition("@")
        action = action.strip()
        if action in ("", "kill"):
            sleep = None
        elif action.startswith("sleep="):
            sleep = float(action.removeprefix("sleep="))
        else:
            raise ValueError(f"KAIKU_FAILPOINTS: unknown action {action!r} in {item!r}")
        points[name] = _Point(int(nth) if nth else 1, sleep)
    return points


_ACTIVE = parse(os.environ.get("KAIKU_FAILPOINTS", ""))
_PASSES: dict[str, int] = {}


def _due(name: str) -> _Point | None:
    point = _ACTIVE.get(name)
    if point is None:
        return None
    _PASSES[name] = _PASSES.get(name, 0) + 1
    return point if _PASSES[name] >= point.nth else None


def _say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _kill(name: str) -> None:
    _say(f"failpoint {name} fired: killing process {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


def failpoint(name: str) -> None:
    """Die with SIGKILL here if the failpoint ``name`` is active and due; a ``sleep`` blocks
    the thread (in async code use :func:`afailpoint`)."""
    point = _due(name)
    if point is None:
        return
    if point.sleep is None:
        _kill(name)
        return
    _say(f"failpoint {name} sleeping {point.sleep:g}s (pass {_PASSES[name]})")
    time.sleep(point.sleep)
    _say(f"failpoint {name} woke")


async def afailpoint(name: str) -> None:
    """Die with SIGKILL here, or sleep without blocking the event loop, if the failpoint
    ``name`` is active and due."""
    point = _due(name)
    if point is None:
        return
    if point.sleep is None:
        _kill(name)
        return
    _say(f"failpoint {name} sleeping {point.sleep:g}s (pass {_PASSES[name]})")
    await asyncio.sleep(point.sleep)
    _say(f"failpoint {name} woke")

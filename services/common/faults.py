"""Failpoints: named places where a test can make the process die as if it were SIGKILLed.

Set ``KAIKU_FAILPOINTS=name[,name...]`` (``name@N`` fires at the N-th pass). Nothing is active
unless the variable is set, and a pass through an inactive failpoint costs one set look-up. Used
by the crash tests to kill a consumer at an exact moment, e.g. after the database commit and
before the offset commit.
"""

from __future__ import annotations

import os
import signal
import sys

_ACTIVE: dict[str, int] = {}
_PASSES: dict[str, int] = {}

for _item in filter(None, os.environ.get("KAIKU_FAILPOINTS", "").split(",")):
    _name, _, _nth = _item.strip().partition("@")
    _ACTIVE[_name] = int(_nth) if _nth else 1


def failpoint(name: str) -> None:
    """Die with SIGKILL here if the failpoint ``name`` is active and due."""
    if name not in _ACTIVE:
        return
    _PASSES[name] = _PASSES.get(name, 0) + 1
    if _PASSES[name] >= _ACTIVE[name]:
        sys.stderr.write(f"failpoint {name} fired: killing process {os.getpid()}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

"""Calling vendors' APIs for contact look-ups: bounded time-outs, bounded retries that honour
``Retry-After``, and a short-lived cache so a burst of events for one customer costs one call."""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import httpx

from services.trigger.ingress import LookupFailed

V = TypeVar("V")

RETRY_STATUSES = {429, 500, 502, 503, 504}


async def get_json(
    http: httpx.AsyncClient,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    auth: httpx.Auth | tuple[str, str] | None = None,
    params: Mapping[str, Any] | None = None,
    attempts: int = 3,
    max_wait: float = 5.0,
) -> dict[str, Any] | None:
    """GET ``url`` and return its JSON object; None on 404. Retries 429 and 5xx (waiting as the
    ``Retry-After`` header says, at most ``max_wait`` seconds) and connection errors; raises
    ``LookupFailed`` naming the last problem (never the credentials)."""
    problem = "no attempt"
    for attempt in range(attempts):
        try:
            response = await http.get(url, headers=headers, auth=auth, params=params)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__} calling {httpx.URL(url).host}"
            wait = min(max_wait, 0.2 * 2.0**attempt * (0.5 + random.random()))
        else:
            if response.status_code == 404:
                return None
            if response.status_code < 300:
                try:
                    body = response.json()
                except ValueError:
                    raise LookupFailed(f"{httpx.URL(url).host} answered with non-JSON") from None
                if not isinstance(body, dict):
                    raise LookupFailed(f"{httpx.URL(url).host} answered with a non-object")
                return body
            problem = f"{httpx.URL(url).host} answered {response.status_code}"
            if response.status_code not in RETRY_STATUSES:
                raise LookupFailed(problem)
            wait = _retry_after(response.headers.get("retry-after"), attempt, max_wait)
        if attempt + 1 < attempts:
            await asyncio.sleep(wait)
    raise LookupFailed(problem)


def _retry_after(value: str | None, attempt: int, max_wait: float) -> float:
    if value is not None:
        try:
            return float(min(max_wait, max(0.0, float(value))))
        except ValueError:
            pass
    return min(max_wait, 0.2 * 2.0**attempt * (0.5 + random.random()))


class TtlCache(Generic[V]):
    """A small LRU cache whose entries expire after ``ttl`` seconds."""

    def __init__(self, ttl: float = 300.0, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        self._data: OrderedDict[str, tuple[float, V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        self._data[key] = (time.monotonic() + self.ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self.size:
            self._data.popitem(last=False)

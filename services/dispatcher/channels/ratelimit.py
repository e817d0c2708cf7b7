"""Per-provider rate limits: a token bucket in front of ``send``.

Providers enforce their own limits (Twilio queues per sender, 46elks and SendGrid answer 429);
staying under them is cheaper than retrying. The bucket holds ``burst`` tokens and refills at
``rate`` per second; a send waits for a token. None means no limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from services.dispatcher.channels import Provider, SendResult

M = TypeVar("M")


class TokenBucket:
    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self.tokens = self.capacity
        self.clock = clock
        self.updated = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self) -> float:
        """Take a token and return 0, or return the seconds until one is there."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    async def take(self) -> None:
        async with self._lock:  # first come, first served
            wait = self.try_take()
            while wait > 0:
                await asyncio.sleep(wait)
                wait = self.try_take()


class RateLimited(Generic[M]):
    """A provider whose sends wait for a token."""

    def __init__(self, provider: Provider[M], bucket: TokenBucket) -> None:
        self.provider = provider
        self.bucket = bucket
        self.name = provider.name

    async def send(self, message: M) -> SendResult:
        await self.bucket.take()
        return await self.provider.send(message)

    async def aclose(self) -> None:
        await self.provider.aclose()


def limited(provider: Provider[M], rate: float | None, burst: float | None) -> Provider[M]:
    return provider if rate is None else RateLimited(provider, TokenBucket(rate, burst))

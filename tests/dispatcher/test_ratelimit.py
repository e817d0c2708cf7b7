"""The per-provider token bucket: a burst goes at once, then sends are spaced at the rate."""

from __future__ import annotations

import pytest

from services.dispatcher.channels.ratelimit import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_goes_at_once_then_the_rate_spaces_sends() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(0.5)  # the fourth waits half a second at 2/s
    clock.now += 0.5
    assert bucket.try_take() == 0.0
    clock.now += 10  # idle time refills only up to the burst
    assert [bucket.try_take() for _ in range(4)][-1] == pytest.approx(0.5)


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate=0)

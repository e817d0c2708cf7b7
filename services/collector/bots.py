"""Telling a link scanner's answer from a person's (SPEC §7). Pure: a function of the
invitation, the recent requests to its link, and ``now``.

An answer is a suspected bot when it is POSTed
- within ``KAIKU_COLLECTOR_BOT_MIN_SECONDS`` of the invitation's delivery (``too_fast``);
- within ``KAIKU_COLLECTOR_TRAP_WINDOW_SECONDS`` of a request to the hidden trap link, which
  no person sees (``trap``);
- when the score links and POSTs of the last ``KAIKU_COLLECTOR_BURST_WINDOW_SECONDS`` carry at
  least ``KAIKU_COLLECTOR_BURST_SCORES`` different scores (``burst``): a scanner opening every
  score button, or a script trying every answer.
Each answer is judged on its own: a person answering after the scanner has gone is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.collector.config import CollectorSettings
from services.collector.models import Hit, Invitation

REASONS = ("too_fast", "trap", "burst")


@dataclass(frozen=True)
class BotRules:
    min_after_delivery: timedelta
    trap_window: timedelta
    burst_window: timedelta
    burst_scores: int

    @classmethod
    def of(cls, settings: CollectorSettings) -> BotRules:
        return cls(
            timedelta(seconds=settings.bot_min_seconds),
            timedelta(seconds=settings.trap_window_seconds),
            timedelta(seconds=settings.burst_window_seconds),
            settings.burst_scores,
        )

    def judge(self, invitation: Invitation, hits: Sequence[Hit], now: datetime) -> str | None:
        """Why a POST at ``now`` looks automated, or None. ``hits`` are the link's requests
        of the burst window, this POST included."""
        trap = invitation.trap_hit_at
        if trap is not None and abs(now - trap) <= self.trap_window:
            return "trap"
        delivered = invitation.delivered_at
        if delivered is not None and now - delivered < self.min_after_delivery:
            return "too_fast"
        recent = {
            h.score
            for h in hits
            if h.kind in ("score_link", "post")
            and h.score is not None
            and now - h.at <= self.burst_window
        }
        if len(recent) >= self.burst_scores:
            return "burst"
        return None

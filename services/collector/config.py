from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import TimeZone
from services.common.program import Program


class CollectorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_COLLECTOR_", extra="ignore")

    # Customer-provided page templates that override the shipped ones.
    template_dir: Path | None = None
    # Scores with fewer answers than this carry "low_n": true.
    min_n: int = 30
    # The time zone of the reported days, weeks and months (default: the program's).
    timezone: TimeZone | None = None
    # Suspected bots (services/collector/bots.py): an answer this soon after delivery, this
    # close to a trap-link hit, or with this many different scores in the burst window.
    bot_min_seconds: float = 10.0
    trap_window_seconds: float = 120.0
    burst_window_seconds: float = 60.0
    burst_scores: int = 3
    # Close-the-loop alert webhooks (services/collector/alerting.py): attempts in all, the
    # back-off base and cap (exponential with jitter; a Retry-After is honoured), the request
    # timeout, and how often the sender looks for due alerts when nothing wakes it.
    alert_max_attempts: int = 8
    alert_retry_base_seconds: float = 30.0
    alert_retry_max_seconds: float = 3600.0
    alert_timeout_seconds: float = 10.0
    alert_poll_seconds: float = 2.0
    # How long a dashboard sign-in lasts.
    dashboard_session_hours: float = 12.0


def reporting_zone(settings: CollectorSettings, program: Program) -> ZoneInfo:
    """The time zone whose days, weeks and months the scores are reported in."""
    return ZoneInfo(settings.timezone or program.defaults.timezone or "UTC")


def local_day(at: datetime, zone: ZoneInfo) -> date:
    """The reporting day of a moment: what answers and deliveries are counted under."""
    return at.astimezone(zone).date()

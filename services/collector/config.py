from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import TimeZone


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

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class CollectorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_COLLECTOR_", extra="ignore")

    # Customer-provided page templates that override the shipped ones.
    template_dir: Path | None = None
    # Scores with fewer answers than this carry "low_n": true.
    min_n: int = 30

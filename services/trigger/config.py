from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class TriggerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_TRIGGER_", extra="ignore")

    # Most CloudEvents accepted in one POST /v1/events.
    max_batch_events: int = 1000

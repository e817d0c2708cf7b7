from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class TriggerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_TRIGGER_", extra="ignore")

    # Most CloudEvents accepted in one POST /v1/events.
    max_batch_events: int = 1000
    # The public base URL vendors call webhooks on (https://kaiku.example.com), when a proxy in
    # front changes scheme or host: HubSpot signs the full URL.
    webhook_public_url: str | None = None
    # Contact look-ups through vendor APIs: time-out of one call.
    lookup_timeout_seconds: float = 5.0

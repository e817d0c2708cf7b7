from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class DispatcherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_", extra="ignore")

    # Which provider sends email: "file" writes .eml files to the outbox folder, "smtp" sends.
    email_channel: Literal["file", "smtp"] = "file"
    outbox_dir: Path = Path("var/outbox")
    email_from: str = "kaiku surveys <surveys@kaiku.local>"
    # Domain of the Message-ID header.
    email_domain: str = "kaiku.local"
    unsubscribe_mailto: str | None = None
    # Customer-provided templates that override the shipped ones.
    template_dir: Path | None = None
    # This replica's name (the pod name on Kubernetes): claims of sends are marked with it.
    instance_id: str = socket.gethostname()
    # A send claimed longer ago than this by a replica that is gone is "in doubt".
    sending_lease_seconds: float = 300.0
    # Due sends claimed per round, and sent concurrently.
    claim_batch: int = 100
    send_concurrency: int = 20
    poll_seconds: float = 1.0
    max_attempts: int = 6


class SmtpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_SMTP_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 25
    username: str | None = None
    password: SecretStr | None = None
    # "none", "starttls" (upgrade on port 587) or "tls" (implicit TLS on port 465)
    tls: Literal["none", "starttls", "tls"] = "none"
    timeout_seconds: float = 30.0

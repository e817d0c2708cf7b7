"""The dispatcher's settings: which providers send, how, and how fast.

Choosing a provider is a setting (``KAIKU_EMAIL_PROVIDER``, ``KAIKU_SMS_PROVIDER``); each
provider reads its own ``KAIKU_<PROVIDER>_*`` settings. Secrets are ``SecretStr`` so they never
appear in a repr or a log line.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

EmailProviderName = Literal["file", "smtp", "sendgrid", "mailgun", "webhook"]
SmsProviderName = Literal["none", "file", "twilio", "46elks", "webhook"]


class DispatcherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_", extra="ignore")

    # Which provider sends email: "file" writes .eml files to the outbox folder (the embedded
    # default), "smtp", "sendgrid" and "mailgun" send, "webhook" posts to your own system.
    email_provider: EmailProviderName = "file"
    # Which provider sends SMS: "none" fails SMS invitations (no provider configured).
    sms_provider: SmsProviderName = "file"
    outbox_dir: Path = Path("var/outbox")
    email_from: str = "kaiku surveys <surveys@kaiku.local>"
    # Domain of the Message-ID header.
    email_domain: str = "kaiku.local"
    unsubscribe_mailto: str | None = None
    # SMS sender: an alphanumeric id (max 11 characters) or a number; the provider's default
    # (Twilio needs one of the two: this or KAIKU_TWILIO_MESSAGING_SERVICE_SID) when unset.
    sms_from: str | None = None
    # An SMS template that renders to more segments than this fails `kaiku check` and the send.
    sms_max_segments: int = 2
    # The public base URL providers call back on (…/v1/provider-events/{provider}); the
    # survey links' KAIKU_PUBLIC_URL when unset. Twilio signs the full URL.
    provider_callback_url: str | None = None
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
    # Transient failures are retried with exponential back-off (base doubling, capped, with
    # jitter) this many attempts in all.
    max_attempts: int = 6
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 3600.0


class _ProviderSettings(BaseSettings):
    # Sends per second through this provider (a token bucket); None for no limit.
    rate_per_second: float | None = None
    burst: float | None = None
    timeout_seconds: float = 30.0


class SmtpSettings(_ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_SMTP_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 25
    username: str | None = None
    password: SecretStr | None = None
    # "none", "starttls" (upgrade on port 587) or "tls" (implicit TLS on port 465)
    tls: Literal["none", "starttls", "tls"] = "none"
    # Verify the server's certificate (turn off only for a test server).
    validate_certs: bool = True
    # A CA bundle to verify the server with, instead of the system's.
    ca_file: Path | None = None
    # Messages sent over one connection before it is closed with QUIT (1: a new connection for
    # every message).
    messages_per_connection: int = Field(default=100, ge=1)
    # An idle connection unused for longer than this is closed, not reused. Servers must wait at
    # least 5 minutes (RFC 5321 section 4.5.3.2.7), but many close sooner.
    idle_seconds: float = Field(default=30.0, gt=0)


class SendGridSettings(_ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_SENDGRID_", extra="ignore")

    api_key: SecretStr | None = None
    # https://api.eu.sendgrid.com for EU data residency.
    base_url: str = "https://api.sendgrid.com"
    # The Signed Event Webhook's public key (base64, from the SendGrid console); events are
    # refused unless their ECDSA signature verifies with it.
    event_public_key: str | None = None
    tolerance_seconds: float = 600.0


class MailgunSettings(_ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_MAILGUN_", extra="ignore")

    api_key: SecretStr | None = None
    domain: str | None = None
    # https://api.eu.mailgun.net for the EU region.
    base_url: str = "https://api.mailgun.net"
    # The HTTP webhook signing key (Mailgun console → Webhooks); separate from the API key.
    webhook_signing_key: SecretStr | None = None
    tolerance_seconds: float = 600.0


class TwilioSettings(_ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_TWILIO_", extra="ignore")

    account_sid: str | None = None
    auth_token: SecretStr | None = None
    # Send through a messaging service instead of from KAIKU_SMS_FROM.
    messaging_service_sid: str | None = None
    base_url: str = "https://api.twilio.com"


class ElksSettings(_ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_46ELKS_", extra="ignore")

    username: str | None = None
    password: SecretStr | None = None
    base_url: str = "https://api.46elks.com"
    # 46elks does not sign its callbacks: this secret is put into the delivery-report URL
    # kaiku gives 46elks, and a report without it is refused. It is the password of HTTP Basic
    # credentials (user "kaiku"), so only A-Z a-z 0-9 . _ ~ - (e.g. `openssl rand -hex 32`); give
    # the number's sms_url the same https://kaiku:<secret>@.../v1/provider-events/46elks.
    callback_secret: SecretStr | None = None
    # Incoming SMS that are only one of these words (any case, comma-separated) opt the sender
    # out. 46elks documents none of its own: add local ones ("LOPETA", "SLUTA") if you need them.
    opt_out_keywords: str = "STOP"


class WebhookChannelSettings(_ProviderSettings):
    model_config = SettingsConfigDict(env_prefix="KAIKU_SEND_WEBHOOK_", extra="ignore")

    # The URL that receives each rendered invitation as JSON (signed the Standard Webhooks way).
    url: str | None = None
    secret: SecretStr | None = None

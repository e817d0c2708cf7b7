"""Choosing and configuring providers is settings, not code: this builds the configured email and
SMS providers (behind their rate limits) and the receipt sources of the providers that sign
their callbacks. Each provider reads its own ``KAIKU_<PROVIDER>_*`` settings and refuses to
start without what it needs."""

from __future__ import annotations

from typing import Any

from services.dispatcher.channels import Provider, ReceiptSource
from services.dispatcher.channels.ratelimit import limited
from services.dispatcher.config import (
    DispatcherSettings,
    ElksSettings,
    MailgunSettings,
    SendGridSettings,
    SmtpSettings,
    TwilioSettings,
    WebhookChannelSettings,
)

RECEIPTS_PATH = "/v1/provider-events/"


def callback_url(public_url: str, provider: str) -> str:
    return public_url.rstrip("/") + RECEIPTS_PATH + provider


def email_provider(settings: DispatcherSettings) -> Provider[Any]:
    name = settings.email_provider
    if name == "smtp":
        from services.dispatcher.channels.smtp import SmtpEmail

        smtp = SmtpSettings()
        return limited(SmtpEmail(smtp), smtp.rate_per_second, smtp.burst)
    if name == "sendgrid":
        from services.dispatcher.channels.sendgrid import SendGridEmail

        sendgrid = SendGridSettings()
        return limited(SendGridEmail(sendgrid), sendgrid.rate_per_second, sendgrid.burst)
    if name == "mailgun":
        from services.dispatcher.channels.mailgun import MailgunEmail

        mailgun = MailgunSettings()
        return limited(MailgunEmail(mailgun), mailgun.rate_per_second, mailgun.burst)
    if name == "webhook":
        from services.dispatcher.channels.webhook import WebhookChannel

        hook = WebhookChannelSettings()
        return limited(WebhookChannel(hook), hook.rate_per_second, hook.burst)
    from services.dispatcher.channels.file import FileEmail

    return FileEmail(settings.outbox_dir)


def sms_provider(settings: DispatcherSettings, public_url: str) -> Provider[Any] | None:
    name = settings.sms_provider
    if name == "none":
        return None
    if name == "twilio":
        from services.dispatcher.channels.twilio import TwilioSms

        twilio = TwilioSettings()
        provider: Provider[Any] = TwilioSms(
            twilio,
            sender=settings.sms_from,
            status_callback=callback_url(public_url, "twilio"),
        )
        return limited(provider, twilio.rate_per_second, twilio.burst)
    if name == "46elks":
        from services.dispatcher.channels.elks import ElksSms

        elks = ElksSettings()
        provider = ElksSms(
            elks,
            sender=settings.sms_from,
            delivery_report_url=callback_url(public_url, "46elks"),
        )
        return limited(provider, elks.rate_per_second, elks.burst)
    if name == "webhook":
        from services.dispatcher.channels.webhook import WebhookChannel

        hook = WebhookChannelSettings()
        return limited(WebhookChannel(hook), hook.rate_per_second, hook.burst)
    from services.dispatcher.channels.file import FileSms

    return FileSms(settings.outbox_dir)


def receipt_sources(settings: DispatcherSettings) -> dict[str, tuple[ReceiptSource, str]]:
    """The receipt webhooks of the configured providers: provider → (source, channel)."""
    sources: dict[str, tuple[ReceiptSource, str]] = {}
    if settings.email_provider == "sendgrid":
        from services.dispatcher.channels.sendgrid import SendGridReceipts

        sendgrid = SendGridSettings()
        if sendgrid.event_public_key:
            sources["sendgrid"] = (SendGridReceipts(sendgrid), "email")
    if settings.email_provider == "mailgun":
        from services.dispatcher.channels.mailgun import MailgunReceipts

        mailgun = MailgunSettings()
        if mailgun.webhook_signing_key is not None:
            sources["mailgun"] = (MailgunReceipts(mailgun), "email")
    if settings.sms_provider == "twilio":
        from services.dispatcher.channels.twilio import TwilioReceipts

        sources["twilio"] = (TwilioReceipts(TwilioSettings()), "sms")
    if settings.sms_provider == "46elks":
        from services.dispatcher.channels.elks import ElksReceipts

        elks = ElksSettings()
        if elks.callback_secret is not None:
            sources["46elks"] = (ElksReceipts(elks), "sms")
    return sources

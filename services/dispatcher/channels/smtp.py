"""SMTP (aiosmtplib): plain, STARTTLS or implicit TLS, with optional authentication.

5xx replies are permanent (the recipient or message is refused); 4xx replies and connection
problems are transient.
"""

from __future__ import annotations

import aiosmtplib

from services.dispatcher.channels import OutboundEmail, SendResult
from services.dispatcher.config import SmtpSettings


def _classify(code: int | None, what: str) -> SendResult:
    if code is not None and 500 <= code < 600:
        return SendResult("permanent", reason=f"smtp {code}: {what}")
    return SendResult("transient", reason=f"smtp {code or 'error'}: {what}")


class SmtpEmailChannel:
    name = "smtp"

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings

    async def send(self, email: OutboundEmail) -> SendResult:
        s = self.settings
        try:
            _, reply = await aiosmtplib.send(
                email.message,
                hostname=s.host,
                port=s.port,
                username=s.username,
                password=s.password.get_secret_value() if s.password else None,
                use_tls=s.tls == "tls",
                start_tls=s.tls == "starttls",
                timeout=s.timeout_seconds,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            return _classify(max(codes) if codes else None, "recipient refused")
        except aiosmtplib.SMTPResponseException as exc:
            return _classify(exc.code, "the server refused the message")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            return SendResult("transient", reason=f"smtp: {type(exc).__name__}")
        return SendResult("sent", provider_message_id=email.message["Message-ID"], reason=reply)

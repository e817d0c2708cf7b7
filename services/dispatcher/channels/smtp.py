"""SMTP (aiosmtplib): plain, STARTTLS (port 587) or implicit TLS (port 465), optional AUTH.

Certificates are verified by default, against the system's CAs or ``KAIKU_SMTP_CA_FILE``;
``KAIKU_SMTP_VALIDATE_CERTS=false`` turns that off (for a test server only).

How a send is classified, by where it stopped:

====================================  =========  ===========================================
what happened                         outcome    suppress
====================================  =========  ===========================================
250 after DATA                        sent       (``provider_message_id`` is the Message-ID)
no connection, TLS failure, timeout,  transient
a dropped connection
any 4xx reply (421, 450, 451, 452)    transient
AUTH refused with 5xx (535)           permanent  none: it is our configuration, not the
                                                 recipient's address
AUTH not offered by the server        permanent  none (configuration)
SMTPUTF8 needed but not offered, an   permanent  none
address unfit for a command line
RCPT refused, 5xx with 5.1.1, 5.1.2,  permanent  ``hard_bounce``: the address does not exist
5.1.3, 5.1.6 or 5.1.10 (RFC 3463,                (bad mailbox, bad system, bad syntax,
RFC 7505)                                        moved, null MX)
any other 5xx (MAIL, RCPT, DATA, a    permanent  none: 5.7.x policy and spam refusals, 5.1.8
greeting): 554 5.7.1, 550 without an             sender problems, a bare 550 with no
enhanced code, 553 5.1.8, ...                    enhanced status say nothing certain about
                                                 the recipient's mailbox
====================================  =========  ===========================================

Reasons quote the server's reply (they end up in logs and in the sends table), with every
email address in it replaced by ``<address>``: receiving servers often echo the recipient.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Sequence

import aiosmtplib

from services.dispatcher.channels import OutboundEmail, SendResult, SuppressReason, log_outcome
from services.dispatcher.config import SmtpSettings

log = logging.getLogger(__name__)

# RFC 3463 X.1.y for the destination mailbox, plus X.1.10 (RFC 7505, the domain takes no mail):
# the recipient address itself is wrong. X.1.0 (other), X.1.4 (ambiguous), X.1.7 and X.1.8
# (the sender's address) are not about a mailbox that does not exist.
_BAD_MAILBOX_DETAILS = frozenset({1, 2, 3, 6, 10})
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
_ADDRESS = re.compile(r"<?[^\s<>\"'(),;:\[\]]+@[^\s<>\"'(),;:\[\]]+>?")
_MAX_REPLY = 200


def tls_context(settings: SmtpSettings) -> ssl.SSLContext:
    """The client context for STARTTLS and implicit TLS: verifying, against ``ca_file`` when set
    (instead of the system's CAs), unless ``validate_certs`` is off."""
    cafile = str(settings.ca_file) if settings.ca_file is not None else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if not settings.validate_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def enhanced_status(message: str) -> tuple[int, int, int] | None:
    """The RFC 3463 enhanced status code a reply text starts with (``5.1.1 ...``), if any."""
    match = _ENHANCED.match(message)
    if match is None:
        return None
    klass, subject, detail = match.groups()
    return int(klass), int(subject), int(detail)


def is_bad_mailbox(code: int, message: str) -> bool:
    """A permanent refusal that says the recipient's address does not exist."""
    status = enhanced_status(message)
    return (
        500 <= code < 600
        and status is not None
        and status[0] == 5
        and status[1] == 1
        and status[2] in _BAD_MAILBOX_DETAILS
    )


def _reply(message: str) -> str:
    """A server's reply text, safe to log: first line, no email addresses, bounded."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    text = _ADDRESS.sub("<address>", first)
    return text if len(text) <= _MAX_REPLY else text[:_MAX_REPLY] + "..."


def _by_code(code: int, what: str, suppress: SuppressReason | None = None) -> SendResult:
    if 500 <= code < 600:
        return SendResult("permanent", reason=what, suppress=suppress)
    return SendResult("transient", reason=what)


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind an exception (aiosmtplib wraps the implicit-TLS one), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _refused(refusals: Sequence[aiosmtplib.SMTPRecipientRefused]) -> SendResult:
    """Every recipient refused at RCPT (a single one for an invitation)."""
    if not refusals:
        return SendResult("transient", reason="smtp: recipients refused")
    worst = refusals[0]
    # One 4xx among them means the server may take the message later.
    for refusal in refusals:
        if not 500 <= refusal.code < 600:
            worst = refusal
            break
    what = f"smtp {worst.code}: recipient refused: {_reply(worst.message)}"
    hard = all(is_bad_mailbox(r.code, r.message) for r in refusals)
    return _by_code(worst.code, what, "hard_bounce" if hard else None)


class SmtpEmail:
    """Sends each email over a connection of its own (no pooling)."""

    name = "smtp"

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        # Built once: a missing or unreadable CA file fails at start-up, not at the first send.
        self._tls = tls_context(settings) if settings.tls != "none" else None
        if settings.tls != "none" and not settings.validate_certs:
            log.warning("smtp: the server's certificate is not verified (validate_certs is off)")
        if settings.username is not None and settings.tls == "none":
            log.warning("smtp: credentials are configured without TLS; they cross in clear text")

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout_seconds,
            use_tls=s.tls == "tls",
            # False, not None: "none" means no opportunistic upgrade either.
            start_tls=s.tls == "starttls",
            tls_context=self._tls,
        )

    async def send(self, message: OutboundEmail) -> SendResult:
        result = await self._send(message)
        log_outcome(log, self.name, message.invitation_id, result)
        return result

    async def _send(self, message: OutboundEmail) -> SendResult:
        s = self.settings
        client = self._client()
        stage = "connect"
        try:
            async with client:
                if s.username is not None:
                    stage = "login"
                    password = s.password.get_secret_value() if s.password is not None else ""
                    await client.login(s.username, password)
                stage = "send"
                _, reply = await client.send_message(message.message)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return _refused(exc.recipients)
        except aiosmtplib.SMTPAuthenticationError as exc:
            # 535 (credentials), 534 and 538 (mechanism): fix KAIKU_SMTP_USERNAME/PASSWORD.
            what = f"smtp {exc.code}: authentication failed: {_reply(exc.message)}"
            return _by_code(exc.code, what)
        except aiosmtplib.SMTPResponseException as exc:
            # MAIL FROM, DATA, the greeting, HELO, STARTTLS: nothing certain about the mailbox.
            return _by_code(exc.code, f"smtp {exc.code} at {stage}: {_reply(exc.message)}")
        except ssl.SSLError as exc:
            return self._tls_failure(exc)
        except aiosmtplib.SMTPNotSupported as exc:
            # An address that needs SMTPUTF8 and a server that does not offer it.
            return SendResult("permanent", reason=f"smtp: cannot send: {_reply(str(exc))}")
        except ValueError as exc:
            if stage != "send":
                raise  # aiosmtplib refused how the client is set up: a bug
            # An address with characters that cannot go on an SMTP command line.
            return SendResult("permanent", reason=f"smtp: cannot send: {_reply(str(exc))}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            tls = _tls_error(exc)
            if tls is not None:
                return self._tls_failure(tls)
            if isinstance(exc, TimeoutError):
                return SendResult("transient", reason=f"smtp: timed out at {stage}")
            if stage == "login" and not isinstance(exc, ConnectionError):
                # The server offers no AUTH (often: only after STARTTLS): configuration.
                return SendResult("permanent", reason=f"smtp: cannot log in: {_reply(str(exc))}")
            detail = _reply(str(exc)) or type(exc).__name__
            return SendResult("transient", reason=f"smtp: {detail}")
        return SendResult(
            "sent",
            provider_message_id=message.message["Message-ID"],
            reason=_reply(reply) or None,
        )

    def _tls_failure(self, exc: ssl.SSLError) -> SendResult:
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = exc.verify_message or exc.reason or "verification failed"
            return SendResult(
                "transient",
                reason=f"smtp: TLS certificate not trusted ({detail}); "
                "see KAIKU_SMTP_CA_FILE and KAIKU_SMTP_VALIDATE_CERTS",
            )
        return SendResult("transient", reason=f"smtp: TLS failed ({exc.reason or exc})")

    async def aclose(self) -> None:
        """Nothing to close: every send has a connection of its own."""

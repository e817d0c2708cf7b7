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

Connections are reused. A send takes the most recently used idle connection, or opens one
(connect, EHLO, STARTTLS, AUTH), and gives it back when it is done, so there are at most as
many connections as sends under way at once (``KAIKU_SEND_CONCURRENCY``). One is closed with QUIT
after ``KAIKU_SMTP_MESSAGES_PER_CONNECTION`` messages (1: a connection per message) and, unused,
after ``KAIKU_SMTP_IDLE_SECONDS``. One idle for more than ``CHECK_IDLE_SECONDS`` is checked with
NOOP first: if the server has closed it meanwhile, the send opens a new connection instead of
failing. A message is never sent again on another connection: once MAIL has gone out, a
dropped connection is a transient failure as in the table above. After a refusal (MAIL, RCPT or
DATA) aiosmtplib resets the envelope with RSET and the connection is given back, unless the
reply was 421 (the server is closing it); after a failed AUTH it is closed with QUIT; after a
dropped connection, a time-out, a TLS failure or anything unexpected it is closed. ``aclose()``
sends QUIT on every idle connection. The EHLO name is looked up (``socket.getfqdn``) once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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

# A connection idle for longer than this is checked with NOOP before it carries a message.
CHECK_IDLE_SECONDS = 2.0
# The longest that NOOP check, or a QUIT, may take (capped by ``timeout_seconds``).
BRIEF_TIMEOUT_SECONDS = 5.0

# What becomes of a connection after a send: back to the pool, closed with QUIT, or just closed.
_After = Literal["keep", "quit", "close"]
# Refusals after which aiosmtplib has reset the envelope (RSET): the connection can carry on.
_RESET_AFTER = (
    aiosmtplib.SMTPSenderRefused,
    aiosmtplib.SMTPRecipientsRefused,
    aiosmtplib.SMTPDataError,
)
# The server is closing the connection (RFC 5321 section 3.8).
_CLOSING = 421


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


@dataclass(eq=False)
class _Connection:
    client: aiosmtplib.SMTP
    last_used: float
    # Messages (mail transactions) begun on it.
    messages: int = 0
    # NOOP before its next message, however briefly idle (after a refusal: the server may have
    # answered the RSET by closing).
    check: bool = False


class SmtpEmail:
    """Sends email over a small pool of reused connections (see the module's docstring)."""

    name = "smtp"

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings
        # Built once: a missing or unreadable CA file fails at start-up, not at the first send.
        self._tls = tls_context(settings) if settings.tls != "none" else None
        if settings.tls != "none" and not settings.validate_certs:
            log.warning("smtp: the server's certificate is not verified (validate_certs is off)")
        if settings.username is not None and settings.tls == "none":
            log.warning("smtp: credentials are configured without TLS; they cross in clear text")
        # Idle connections, the most recently used last (so also sorted by last use).
        self._idle: list[_Connection] = []
        self._hostname: asyncio.Task[str] | None = None
        self._closed = False

    def _client(self, local_hostname: str) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout_seconds,
            use_tls=s.tls == "tls",
            # False, not None: "none" means no opportunistic upgrade either.
            start_tls=s.tls == "starttls",
            tls_context=self._tls,
            # Else aiosmtplib looks it up (socket.getfqdn, in a thread) for every connection.
            local_hostname=local_hostname,
        )

    async def _local_hostname(self) -> str:
        """The name this host gives in EHLO: looked up once, in a thread (it may ask DNS)."""
        if self._hostname is None:
            self._hostname = asyncio.create_task(asyncio.to_thread(socket.getfqdn))
        # Shielded: a cancelled send must not cancel the look-up the others wait for.
        return await asyncio.shield(self._hostname)

    @property
    def _brief_timeout(self) -> float:
        return min(self.settings.timeout_seconds, BRIEF_TIMEOUT_SECONDS)

    async def send(self, message: OutboundEmail) -> SendResult:
        result = await self._send(message)
        log_outcome(log, self.name, message.invitation_id, result)
        return result

    async def _send(self, message: OutboundEmail) -> SendResult:
        s = self.settings
        stage = "connect"
        conn: _Connection | None = None
        # Closed unless a branch below says otherwise: also on cancellation and on a bug.
        after: _After = "close"
        try:
            conn = await self._reuse()
            if conn is None:
                client = self._client(await self._local_hostname())
                await client.connect()  # closes the client itself when it fails
                conn = _Connection(client, time.monotonic())
                if s.username is not None:
                    stage = "login"
                    password = s.password.get_secret_value() if s.password is not None else ""
                    await client.login(s.username, password)
            stage = "send"
            conn.messages += 1
            _, reply = await conn.client.send_message(message.message)
            after = "keep"
        except aiosmtplib.SMTPRecipientsRefused as exc:
            after = self._after_refusal(conn, exc, [r.code for r in exc.recipients])
            return _refused(exc.recipients)
        except aiosmtplib.SMTPAuthenticationError as exc:
            after = self._after_refusal(conn, exc, [exc.code])
            # 535 (credentials), 534 and 538 (mechanism): fix KAIKU_SMTP_USERNAME/PASSWORD.
            what = f"smtp {exc.code}: authentication failed: {_reply(exc.message)}"
            return _by_code(exc.code, what)
        except aiosmtplib.SMTPResponseException as exc:
            after = self._after_refusal(conn, exc, [exc.code])
            # MAIL FROM, DATA, the greeting, HELO, STARTTLS: nothing certain about the mailbox.
            return _by_code(exc.code, f"smtp {exc.code} at {stage}: {_reply(exc.message)}")
        except ssl.SSLError as exc:
            return self._tls_failure(exc)
        except aiosmtplib.SMTPNotSupported as exc:
            # An address that needs SMTPUTF8 and a server that does not offer it.
            after = "quit"
            return SendResult("permanent", reason=f"smtp: cannot send: {_reply(str(exc))}")
        except ValueError as exc:
            if stage != "send":
                raise  # aiosmtplib refused how the client is set up: a bug
            # An address with characters that cannot go on an SMTP command line.
            after = "quit"
            return SendResult("permanent", reason=f"smtp: cannot send: {_reply(str(exc))}")
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            tls = _tls_error(exc)
            if tls is not None:
                return self._tls_failure(tls)
            if isinstance(exc, TimeoutError):
                return SendResult("transient", reason=f"smtp: timed out at {stage}")
            if stage == "login" and not isinstance(exc, ConnectionError):
                # The server offers no AUTH (often: only after STARTTLS): configuration.
                after = "quit"
                return SendResult("permanent", reason=f"smtp: cannot log in: {_reply(str(exc))}")
            detail = _reply(str(exc)) or type(exc).__name__
            return SendResult("transient", reason=f"smtp: {detail}")
        finally:
            if conn is not None:
                await self._release(conn, after)
        return SendResult(
            "sent",
            provider_message_id=message.message["Message-ID"],
            reason=_reply(reply) or None,
        )

    @staticmethod
    def _after_refusal(conn: _Connection | None, exc: Exception, codes: list[int]) -> _After:
        """A refused MAIL, RCPT or DATA leaves a connection fit for the next message (aiosmtplib
        has sent RSET); a refused AUTH or EHLO, or a 421, does not."""
        if conn is None or not conn.client.is_connected or _CLOSING in codes:
            return "close"
        if isinstance(exc, _RESET_AFTER):
            conn.check = True
            return "keep"
        return "quit"

    async def _reuse(self) -> _Connection | None:
        """The most recently used idle connection, if one is fit for a message."""
        self._drop_stale(time.monotonic())
        while self._idle:
            conn = self._idle.pop()
            idle = time.monotonic() - conn.last_used
            if not conn.client.is_connected:
                conn.client.close()
                continue
            if idle > CHECK_IDLE_SECONDS or conn.check:
                try:
                    await conn.client.noop(timeout=self._brief_timeout)
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    # Nothing of the message has been sent: a new connection can carry it.
                    detail = _reply(str(exc)) or type(exc).__name__
                    log.debug("smtp: an idle connection is gone (%s); opening another", detail)
                    conn.client.close()
                    return None
                except BaseException:
                    conn.client.close()
                    raise
                conn.check = False
            return conn
        return None

    async def _release(self, conn: _Connection, after: _After) -> None:
        """Give the connection back to the pool, or close it (with QUIT unless it is broken)."""
        s = self.settings
        if after == "close" or not conn.client.is_connected:
            conn.client.close()
            return
        if after == "keep" and conn.messages < s.messages_per_connection and not self._closed:
            conn.last_used = time.monotonic()
            self._idle.append(conn)
            self._drop_stale(conn.last_used)
            return
        await self._quit(conn.client)

    def _drop_stale(self, now: float) -> None:
        """Close the idle connections unused for longer than ``idle_seconds`` (at the bottom of
        the stack: it is sorted by last use)."""
        stale = 0
        while (
            stale < len(self._idle)
            and now - self._idle[stale].last_used > self.settings.idle_seconds
        ):
            self._idle[stale].client.close()
            stale += 1
        del self._idle[:stale]

    async def _quit(self, client: aiosmtplib.SMTP) -> None:
        try:
            await client.quit(timeout=self._brief_timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass  # the server is gone or slow to say goodbye: close all the same
        finally:
            client.close()

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
        """QUIT every idle connection (briefly; errors are ignored). A send still under way
        closes its connection when it ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._quit(conn.client) for conn in idle))

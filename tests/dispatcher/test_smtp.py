"""The SMTP channel against real SMTP servers (aiosmtpd): plain, STARTTLS, implicit TLS, AUTH,
and how refusals, TLS failures and dead servers are classified."""

from __future__ import annotations

import asyncio
import email
import email.policy
import ipaddress
import logging
import ssl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from services.dispatcher.channels import EmailProvider, OutboundEmail, SendResult
from services.dispatcher.channels.smtp import SmtpEmail
from services.dispatcher.config import SmtpSettings
from services.embedded import free_port

SENDER = "kaiku surveys <surveys@kaiku.test>"
ADDRESS = "maija.meikalainen@example.com"
USERNAME = "kaiku-relay"
PASSWORD = "correct horse battery staple"


def outbound(to: str = ADDRESS) -> OutboundEmail:
    invitation_id = str(uuid.uuid4())
    headers = {
        "Date": formatdate(usegmt=True),
        "Message-ID": f"<{invitation_id}@kaiku.test>",
        "List-Unsubscribe": "<https://surveys.example.com/u/0abcdefghijklmnop>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Auto-Submitted": "auto-generated",
    }
    subject, text, html = "How did we do?", "Answer: https://x.test/s/1", "<p>Answer</p>"
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = subject
    for name, value in headers.items():
        msg[name] = value
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return OutboundEmail(
        invitation_id=invitation_id,
        sender=SENDER,
        to=to,
        subject=subject,
        text=text,
        html=html,
        headers=headers,
        message=msg,
        locale="fi",
        survey_id="nps-delivery",
        customer_id="cust-1",
    )


# -- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def self_signed(directory: Path, name: str) -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost, usable as its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_path, key_path)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return self_signed(tmp_path_factory.mktemp("tls"), "smtp-server")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A CA that did not sign the server's certificate."""
    return self_signed(tmp_path_factory.mktemp("other-ca"), "someone-else")


# -- servers --------------------------------------------------------------------------------------


@dataclass
class MailServer:
    """An aiosmtpd handler that keeps what it receives and refuses as it is told to."""

    mail_reply: str | None = None
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    messages: list[EmailMessage] = field(default_factory=list)
    recipients: list[list[str]] = field(default_factory=list)
    over_tls: list[bool] = field(default_factory=list)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply:
            return self.data_reply
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append(msg)
        self.recipients.append(list(envelope.rcpt_tos))
        assert server.transport is not None
        self.over_tls.append(server.transport.get_extra_info("ssl_object") is not None)
        return "250 2.0.0 Ok: queued"


@contextmanager
def serve(handler: MailServer, **smtp: Any) -> Iterator[int]:
    """Run ``handler`` on a free port; ``smtp`` goes to aiosmtpd (TLS, AUTH)."""
    port = free_port()
    controller = Controller(
        handler, hostname="127.0.0.1", port=port, server_hostname="localhost", **smtp
    )
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USERNAME.encode()
        and auth_data.password == PASSWORD.encode()
    )
    # handled=False: aiosmtpd answers a failure with 535 itself.
    return AuthResult(success=ok, handled=False)


async def send(settings: SmtpSettings, message: OutboundEmail | None = None) -> SendResult:
    channel: EmailProvider = SmtpEmail(settings)
    try:
        return await channel.send(message or outbound())
    finally:
        await channel.aclose()


# -- sending --------------------------------------------------------------------------------------


async def test_plain_delivers_the_message_with_its_list_headers() -> None:
    server = MailServer()
    message = outbound()
    with serve(server) as port:
        result = await send(SmtpSettings(host="127.0.0.1", port=port), message)

    assert result.outcome == "sent", result.reason
    assert result.provider_message_id == message.headers["Message-ID"]
    [arrived] = server.messages
    assert server.recipients == [[ADDRESS]]
    assert server.over_tls == [False]
    for name in ("List-Unsubscribe", "List-Unsubscribe-Post", "Message-ID"):
        assert arrived[name] == message.headers[name], name
    assert arrived["Date"].datetime == parsedate_to_datetime(message.headers["Date"])
    assert arrived["To"] == ADDRESS
    assert arrived["Subject"] == "How did we do?"


async def test_starttls_verifies_the_server_with_the_ca_file(certificate: Certificate) -> None:
    server = MailServer()
    smtp = {"tls_context": certificate.server_context(), "require_starttls": True}
    with serve(server, **smtp) as port:
        result = await send(
            SmtpSettings(host="127.0.0.1", port=port, tls="starttls", ca_file=certificate.cert)
        )

    assert result.outcome == "sent", result.reason
    assert server.over_tls == [True]


async def test_implicit_tls_verifies_the_server_with_the_ca_file(certificate: Certificate) -> None:
    server = MailServer()
    with serve(server, ssl_context=certificate.server_context()) as port:
        result = await send(
            SmtpSettings(host="127.0.0.1", port=port, tls="tls", ca_file=certificate.cert)
        )

    assert result.outcome == "sent", result.reason
    assert server.over_tls == [True]
    assert server.messages[0]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


@pytest.mark.parametrize("tls", ["starttls", "tls"])
@pytest.mark.parametrize("ca", ["system", "other"])
async def test_an_untrusted_certificate_is_transient_and_nothing_is_sent(
    certificate: Certificate, other_ca: Certificate, tls: str, ca: str
) -> None:
    server = MailServer()
    smtp: dict[str, Any] = (
        {"tls_context": certificate.server_context()}
        if tls == "starttls"
        else {"ssl_context": certificate.server_context()}
    )
    ca_file = other_ca.cert if ca == "other" else None
    with serve(server, **smtp) as port:
        result = await send(SmtpSettings(host="127.0.0.1", port=port, tls=tls, ca_file=ca_file))

    assert result.outcome == "transient"
    assert result.reason is not None
    assert "TLS" in result.reason and "certificate" in result.reason, result.reason
    assert server.messages == []


@pytest.mark.parametrize("tls", ["starttls", "tls"])
async def test_validate_certs_off_accepts_a_self_signed_server(
    certificate: Certificate, tls: str
) -> None:
    server = MailServer()
    smtp: dict[str, Any] = (
        {"tls_context": certificate.server_context()}
        if tls == "starttls"
        else {"ssl_context": certificate.server_context()}
    )
    with serve(server, **smtp) as port:
        result = await send(
            SmtpSettings(host="127.0.0.1", port=port, tls=tls, validate_certs=False)
        )

    assert result.outcome == "sent", result.reason
    assert server.over_tls == [True]


def test_a_missing_ca_file_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        SmtpEmail(SmtpSettings(tls="starttls", ca_file=tmp_path / "missing.pem"))


# -- authentication -------------------------------------------------------------------------------


def auth_server(certificate: Certificate) -> dict[str, Any]:
    return {
        "tls_context": certificate.server_context(),
        "require_starttls": True,
        "auth_required": True,
        "auth_require_tls": True,
        "authenticator": authenticator,
    }


async def test_auth_with_the_right_password_sends(certificate: Certificate) -> None:
    server = MailServer()
    with serve(server, **auth_server(certificate)) as port:
        result = await send(
            SmtpSettings(
                host="127.0.0.1",
                port=port,
                tls="starttls",
                ca_file=certificate.cert,
                username=USERNAME,
                password=SecretStr(PASSWORD),
            )
        )

    assert result.outcome == "sent", result.reason
    assert len(server.messages) == 1


async def test_auth_with_a_wrong_password_is_permanent_but_not_a_suppression(
    certificate: Certificate,
) -> None:
    server = MailServer()
    with serve(server, **auth_server(certificate)) as port:
        result = await send(
            SmtpSettings(
                host="127.0.0.1",
                port=port,
                tls="starttls",
                ca_file=certificate.cert,
                username=USERNAME,
                password=SecretStr("wrong " + PASSWORD),
            )
        )

    assert result.outcome == "permanent"
    assert result.suppress is None
    assert result.reason is not None
    assert result.reason.startswith("smtp 535"), result.reason
    assert "authentication" in result.reason
    assert PASSWORD not in result.reason
    assert server.messages == []


async def test_a_server_that_requires_auth_without_credentials_is_permanent(
    certificate: Certificate,
) -> None:
    with serve(MailServer(), **auth_server(certificate)) as port:
        result = await send(
            SmtpSettings(host="127.0.0.1", port=port, tls="starttls", ca_file=certificate.cert)
        )

    assert result.outcome == "permanent", result.reason
    assert result.suppress is None
    assert result.reason is not None and result.reason.startswith("smtp 530")


async def test_credentials_for_a_server_that_offers_no_auth_are_permanent() -> None:
    with serve(MailServer()) as port:
        result = await send(
            SmtpSettings(
                host="127.0.0.1", port=port, username=USERNAME, password=SecretStr(PASSWORD)
            )
        )

    assert result.outcome == "permanent", result.reason
    assert result.suppress is None
    assert result.reason is not None and "cannot log in" in result.reason


# -- refusals -------------------------------------------------------------------------------------

REFUSALS = [
    # (stage, reply, outcome, suppress)
    (
        "rcpt",
        f"550 5.1.1 <{ADDRESS}>: Recipient address rejected: User unknown",
        "permanent",
        "hard_bounce",
    ),
    ("rcpt", "553 5.1.3 Bad recipient address syntax", "permanent", "hard_bounce"),
    ("rcpt", "550 5.1.2 Host unknown", "permanent", "hard_bounce"),
    ("rcpt", "556 5.1.10 Recipient address has null MX", "permanent", "hard_bounce"),
    # Policy, not the mailbox: no suppression.
    ("rcpt", f"550 5.7.1 <{ADDRESS}>: Relay access denied", "permanent", None),
    ("rcpt", "554 5.7.1 Service unavailable; client host blocked", "permanent", None),
    # No enhanced status: a bare 550 is used for policy as often as for unknown users.
    ("rcpt", "550 Requested action not taken: mailbox unavailable", "permanent", None),
    ("rcpt", f"451 4.7.1 <{ADDRESS}>: Recipient address rejected: Greylisted", "transient", None),
    ("rcpt", "452 4.2.2 Mailbox full", "transient", None),
    # 5.1.8 is about our sender address: our configuration.
    ("mail", "553 5.1.8 Sender address rejected: Domain not found", "permanent", None),
    ("mail", "451 4.3.0 Temporary lookup failure", "transient", None),
    ("data", "554 5.7.1 Message rejected as spam", "permanent", None),
    ("data", "451 4.3.0 Error: queue file write error", "transient", None),
    # Only a refusal of the recipient (RCPT) suppresses.
    ("data", "550 5.1.1 User unknown", "permanent", None),
]


@pytest.mark.parametrize(("stage", "reply", "outcome", "suppress"), REFUSALS)
async def test_refusals_are_classified(
    stage: str, reply: str, outcome: str, suppress: str | None
) -> None:
    server = MailServer()
    if stage == "mail":
        server.mail_reply = reply
    elif stage == "rcpt":
        server.rcpt_replies[ADDRESS] = reply
    else:
        server.data_reply = reply
    with serve(server) as port:
        result = await send(SmtpSettings(host="127.0.0.1", port=port))

    assert (result.outcome, result.suppress) == (outcome, suppress), result.reason
    assert result.reason is not None
    assert result.reason.startswith(f"smtp {reply[:3]}"), result.reason
    # Servers echo the recipient; reasons end up in logs and in the sends table.
    assert ADDRESS not in result.reason
    assert server.messages == []


async def test_one_refused_recipient_among_others_still_sends() -> None:
    """aiosmtplib raises only when every recipient is refused."""
    server = MailServer(rcpt_replies={"gone@example.com": "550 5.1.1 User unknown"})
    message = outbound()
    message.message["Cc"] = "gone@example.com"
    with serve(server) as port:
        result = await send(SmtpSettings(host="127.0.0.1", port=port), message)

    assert result.outcome == "sent", result.reason
    assert server.recipients == [[ADDRESS]]


# -- no server ------------------------------------------------------------------------------------


async def test_no_server_is_transient() -> None:
    result = await send(SmtpSettings(host="127.0.0.1", port=free_port(), timeout_seconds=5))

    assert result.outcome == "transient"
    assert result.reason is not None and result.reason.startswith("smtp:")


async def test_a_server_that_never_greets_times_out_as_transient() -> None:
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        result = await send(SmtpSettings(host="127.0.0.1", port=port, timeout_seconds=0.3))
    finally:
        for writer in connections:
            writer.close()
        listener.close()
        await listener.wait_closed()

    assert result.outcome == "transient"
    assert result.reason == "smtp: timed out at connect"


# -- logging --------------------------------------------------------------------------------------


async def test_no_address_or_password_in_any_log_line(
    caplog: pytest.LogCaptureFixture, certificate: Certificate
) -> None:
    caplog.set_level(logging.DEBUG)
    bounce = MailServer(rcpt_replies={ADDRESS: f"550 5.1.1 <{ADDRESS}>: User unknown"})
    with serve(bounce) as port:
        results = [await send(SmtpSettings(host="127.0.0.1", port=port))]
    with serve(MailServer(), **auth_server(certificate)) as port:
        for password in (PASSWORD, "wrong " + PASSWORD):
            settings = SmtpSettings(
                host="127.0.0.1",
                port=port,
                tls="starttls",
                ca_file=certificate.cert,
                username=USERNAME,
                password=SecretStr(password),
            )
            results.append(await send(settings))
    results.append(
        await send(
            SmtpSettings(
                host="127.0.0.1", port=free_port(), username=USERNAME, password=SecretStr(PASSWORD)
            )
        )
    )

    assert [r.outcome for r in results] == ["permanent", "sent", "permanent", "transient"]
    # aiosmtpd's own log ("mail.log") is the test server's, not kaiku's.
    ours = [r for r in caplog.records if not r.name.startswith("mail.")]
    assert any(r.name == "services.dispatcher.channels.smtp" for r in ours)
    for record in ours:
        line = record.getMessage()
        assert ADDRESS not in line, line
        assert PASSWORD not in line, line

"""The SMTP channel reuses its connections: against a real SMTP server (aiosmtpd) that notes which
connection carried each message, and servers that close connections or stop answering."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import ValidationError

from services.dispatcher.channels import SendResult
from services.dispatcher.channels import smtp as smtp_channel
from services.dispatcher.channels.smtp import SmtpEmail
from services.dispatcher.config import SmtpSettings
from services.embedded import free_port
from tests.dispatcher.test_smtp import ADDRESS, MailServer, outbound

GONE = "gone@example.com"


@dataclass
class Recorder(MailServer):
    """``MailServer`` noting the connection each message arrived on, and the NOOPs and QUITs it
    was sent. ``mail_replies`` and ``data_replies`` answer the next MAIL commands and messages
    in turn (then 250)."""

    mail_replies: list[str] = field(default_factory=list)
    data_replies: list[str] = field(default_factory=list)
    # aiosmtpd's protocol object of each connection, in the order they said EHLO.
    connections: list[SMTP] = field(default_factory=list)
    # Per message: its Message-ID and the index of the connection that carried it.
    arrived: list[tuple[str, int]] = field(default_factory=list)
    noops: int = 0
    quits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does when there is no hook
        with self._lock:
            if not any(c is server for c in self.connections):
                self.connections.append(server)
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_replies:
            return self.mail_replies.pop(0)
        return await super().handle_MAIL(server, session, envelope, address, options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_replies:
            return self.data_replies.pop(0)
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        message_id = next(
            line.split(b":", 1)[1].strip().decode()
            for line in raw.splitlines()
            if line.lower().startswith(b"message-id:")
        )
        with self._lock:
            index = next(i for i, c in enumerate(self.connections) if c is server)
            self.arrived.append((message_id, index))
        return await super().handle_DATA(server, session, envelope)

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        with self._lock:
            self.noops += 1
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._lock:
            self.quits += 1
        return "221 Bye"

    def per_connection(self) -> list[int]:
        """How many messages each connection carried."""
        with self._lock:
            counts = [0] * len(self.connections)
            for _, index in self.arrived:
                counts[index] += 1
            return counts

    def message_ids(self) -> list[str]:
        with self._lock:
            return [message_id for message_id, _ in self.arrived]


@dataclass
class Server:
    handler: Recorder
    port: int
    controller: Controller

    async def hang_up(self) -> None:
        """Close every open connection as Postfix does when a client idles past its time-out."""
        done = threading.Event()

        def close_all() -> None:
            for server in self.handler.connections:
                transport = server.transport
                if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
                    transport.write(b"421 4.4.2 kaiku.test Error: timeout exceeded\r\n")
                    transport.close()
            done.set()

        self.controller.loop.call_soon_threadsafe(close_all)
        assert await asyncio.to_thread(done.wait, 5), "the server did not close its connections"


@contextmanager
def serve(handler: Recorder | None = None) -> Iterator[Server]:
    handler = handler or Recorder()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield Server(handler, port, controller)
    finally:
        controller.stop()


@dataclass
class Middlebox:
    """A TCP relay in front of the server that can forget the flows it relays without closing
    them, as a NAT or a firewall does with an idle connection: what the client sends on a
    forgotten flow goes nowhere and no answer comes back. New flows are relayed again."""

    upstream: int
    port: int = 0
    _forgotten: set[int] = field(default_factory=set)
    _flows: int = 0
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def forget(self) -> None:
        self._forgotten.update(range(self._flows))

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flow = self._flows
        self._flows += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(flow, reader, up_writer), self._pipe(flow, up_reader, writer)
        )

    async def _pipe(
        self, flow: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                if flow not in self._forgotten:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def send_all(channel: SmtpEmail, count: int, concurrency: int) -> list[SendResult]:
    """``count`` sends, at most ``concurrency`` at once (as the scheduler sends)."""
    gate = asyncio.Semaphore(concurrency)
    messages = [outbound() for _ in range(count)]

    async def one(i: int) -> SendResult:
        async with gate:
            return await channel.send(messages[i])

    return await asyncio.gather(*(one(i) for i in range(count)))


def settings(port: int, **more: object) -> SmtpSettings:
    return SmtpSettings.model_validate({"host": "127.0.0.1", "port": port, **more})


# -- reuse ----------------------------------------------------------------------------------------


async def test_concurrent_sends_share_as_many_connections_as_are_sent_at_once() -> None:
    with serve() as server:
        channel = SmtpEmail(settings(server.port))
        try:
            results = await send_all(channel, 50, concurrency=5)
        finally:
            await channel.aclose()

    assert [r.outcome for r in results] == ["sent"] * 50, {r.reason for r in results}
    # Each message arrived, once.
    ids = server.handler.message_ids()
    assert len(ids) == len(set(ids)) == 50
    assert set(ids) == {r.provider_message_id for r in results}
    assert 1 <= len(server.handler.connections) <= 5, server.handler.per_connection()


@pytest.mark.parametrize(
    ("per_connection", "carried"), [(1, [1, 1, 1, 1, 1]), (2, [2, 2, 1]), (100, [5])]
)
async def test_a_connection_carries_at_most_messages_per_connection(
    per_connection: int, carried: list[int]
) -> None:
    with serve() as server:
        channel = SmtpEmail(settings(server.port, messages_per_connection=per_connection))
        try:
            results = await send_all(channel, 5, concurrency=1)
        finally:
            await channel.aclose()

    assert [r.outcome for r in results] == ["sent"] * 5
    assert server.handler.per_connection() == carried
    # Every connection ended with QUIT: the full ones at once, the last one at aclose().
    assert server.handler.quits == len(carried)


async def test_a_connection_idle_longer_than_idle_seconds_is_not_reused() -> None:
    with serve() as server:
        channel = SmtpEmail(settings(server.port, idle_seconds=0.05))
        try:
            first = await channel.send(outbound())
            await asyncio.sleep(0.1)
            second = await channel.send(outbound())
        finally:
            await channel.aclose()

    assert (first.outcome, second.outcome) == ("sent", "sent")
    assert server.handler.per_connection() == [1, 1]


async def test_aclose_says_quit_on_every_idle_connection() -> None:
    with serve() as server:
        channel = SmtpEmail(settings(server.port))
        results = await send_all(channel, 3, concurrency=3)
        assert server.handler.quits == 0
        await channel.aclose()

        assert [r.outcome for r in results] == ["sent"] * 3
        assert len(server.handler.connections) == 3
        assert server.handler.quits == 3


# -- connections that died while idle ------------------------------------------------------------


async def test_a_connection_the_server_closed_while_idle_costs_no_failed_send(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(smtp_channel, "CHECK_IDLE_SECONDS", 0.0)
    with serve() as server:
        channel = SmtpEmail(settings(server.port))
        try:
            first = await channel.send(outbound())
            await server.hang_up()
            second = await channel.send(outbound())
        finally:
            await channel.aclose()

    assert (first.outcome, second.outcome) == ("sent", "sent"), second.reason
    assert server.handler.per_connection() == [1, 1]


async def test_a_connection_that_silently_died_is_replaced_after_a_noop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing tells the client that a NAT forgot its idle connection: NOOP gets no answer."""
    caplog.set_level(logging.DEBUG, logger="services.dispatcher.channels.smtp")
    monkeypatch.setattr(smtp_channel, "CHECK_IDLE_SECONDS", 0.0)
    monkeypatch.setattr(smtp_channel, "BRIEF_TIMEOUT_SECONDS", 0.2)
    with serve() as server:
        middlebox = Middlebox(upstream=server.port)
        await middlebox.start()
        # Without the NOOP check the second send would wait this long and fail.
        channel = SmtpEmail(settings(middlebox.port, timeout_seconds=10))
        try:
            first = await channel.send(outbound())
            middlebox.forget()
            second = await channel.send(outbound())
        finally:
            await channel.aclose()
            await middlebox.close()

    assert (first.outcome, second.outcome) == ("sent", "sent"), second.reason
    assert server.handler.per_connection() == [1, 1]
    # Each message arrived, once.
    assert server.handler.message_ids() == [first.provider_message_id, second.provider_message_id]
    for record in caplog.records:
        assert ADDRESS not in record.getMessage()


# -- refusals -------------------------------------------------------------------------------------


async def test_a_refused_recipient_leaves_the_connection_usable() -> None:
    handler = Recorder(rcpt_replies={GONE: f"550 5.1.1 <{GONE}>: Recipient address rejected"})
    with serve(handler) as server:
        channel = SmtpEmail(settings(server.port))
        try:
            bounced = await channel.send(outbound(GONE))
            sent = await channel.send(outbound())
        finally:
            await channel.aclose()

    assert (bounced.outcome, bounced.suppress) == ("permanent", "hard_bounce"), bounced.reason
    assert sent.outcome == "sent", sent.reason
    assert server.handler.per_connection() == [1]


@pytest.mark.parametrize("stage", ["mail", "data"])
async def test_after_a_421_the_next_message_goes_over_a_new_connection(stage: str) -> None:
    """421: the server is closing the connection, so it is not reused."""
    reply = "421 4.7.0 kaiku.test Too many messages, closing"
    handler = Recorder(mail_replies=[reply]) if stage == "mail" else Recorder(data_replies=[reply])
    with serve(handler) as server:
        channel = SmtpEmail(settings(server.port))
        try:
            refused = await channel.send(outbound())
            sent = await channel.send(outbound())
        finally:
            await channel.aclose()

    assert refused.outcome == "transient", refused.reason
    assert sent.outcome == "sent", sent.reason
    assert server.handler.per_connection() == [0, 1]


# -- settings -------------------------------------------------------------------------------------


def test_reuse_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAIKU_SMTP_MESSAGES_PER_CONNECTION", "1")
    monkeypatch.setenv("KAIKU_SMTP_IDLE_SECONDS", "4.5")
    s = SmtpSettings()
    assert (s.messages_per_connection, s.idle_seconds) == (1, 4.5)


@pytest.mark.parametrize(("name", "value"), [("messages_per_connection", 0), ("idle_seconds", 0)])
def test_reuse_settings_out_of_range_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValidationError, match=name):
        SmtpSettings.model_validate({name: value})

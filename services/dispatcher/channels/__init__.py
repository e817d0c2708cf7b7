"""Providers behind one small Protocol: ``async def send(message) -> SendResult``."""

from __future__ import annotations

from dataclasses import dataclass
from email.message import EmailMessage
from typing import Literal, Protocol

Outcome = Literal["sent", "transient", "permanent"]


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    provider_message_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class OutboundEmail:
    invitation_id: str
    message: EmailMessage


class EmailChannel(Protocol):
    name: str

    async def send(self, email: OutboundEmail) -> SendResult: ...

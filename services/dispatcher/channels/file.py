"""The ``file`` channel: one ``.eml`` per email in the outbox folder (the embedded default).

The file is named after the invitation and written atomically, so a repeated send overwrites
rather than duplicates.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from services.dispatcher.channels import OutboundEmail, SendResult


class FileEmailChannel:
    name = "file"

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox

    def _write(self, email: OutboundEmail) -> Path:
        self.outbox.mkdir(parents=True, exist_ok=True)
        path = self.outbox / f"{email.invitation_id}.eml"
        tmp = path.with_suffix(".eml.tmp")
        tmp.write_bytes(email.message.as_bytes())
        os.replace(tmp, path)
        return path

    async def send(self, email: OutboundEmail) -> SendResult:
        try:
            path = await asyncio.to_thread(self._write, email)
        except OSError as exc:
            return SendResult("transient", reason=f"cannot write the outbox: {exc.strerror}")
        return SendResult("sent", provider_message_id=path.name)

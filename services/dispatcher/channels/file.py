"""The ``file`` channel: the outbox folder as a sink for local development and tests.

An email becomes ``<invitation_id>.eml`` (the whole MIME message), an SMS becomes
``<invitation_id>.sms.json``. Each file is named after its invitation and written atomically (a
temporary file in the same folder, then a rename), so a repeated send overwrites rather than
duplicates and a reader never sees half a file. A write that fails (a full disk, a folder that
cannot be created) is transient.

The outbox holds contact details (the address, the phone number) by design: it stands in for
the provider that would receive them.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

from services.dispatcher.channels import OutboundEmail, OutboundSms, SendResult


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that the file is either the old one or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per write (two writers of one invitation never share it), created with
    # the usual permissions (umask), hidden from a reader globbing *.eml.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def _write(path: Path, data: bytes) -> SendResult:
    try:
        await asyncio.to_thread(write_atomically, path, data)
    except OSError as exc:
        return SendResult("transient", reason=f"cannot write the outbox: {exc.strerror or exc}")
    return SendResult("sent", provider_message_id=path.name)


class FileEmail:
    name = "file"

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox

    async def send(self, message: OutboundEmail) -> SendResult:
        path = self.outbox / f"{message.invitation_id}.eml"
        return await _write(path, message.message.as_bytes())

    async def aclose(self) -> None:
        """Nothing to close."""


class FileSms:
    name = "file"

    def __init__(self, outbox: Path) -> None:
        self.outbox = outbox

    async def send(self, message: OutboundSms) -> SendResult:
        path = self.outbox / f"{message.invitation_id}.sms.json"
        document = {
            "invitation_id": message.invitation_id,
            "to": message.to,
            "body": message.body,
            "encoding": message.encoding,
            "segments": message.segments,
            "sender": message.sender,
            "locale": message.locale,
            "survey_id": message.survey_id,
        }
        data = json.dumps(document, ensure_ascii=False, indent=2).encode() + b"\n"
        return await _write(path, data)

    async def aclose(self) -> None:
        """Nothing to close."""

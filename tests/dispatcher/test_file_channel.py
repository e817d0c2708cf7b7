"""The file channel: one file per invitation in the outbox, written atomically."""

from __future__ import annotations

import email
import email.policy
import json
import uuid
from email.message import EmailMessage
from pathlib import Path

from services.dispatcher.channels import EmailProvider, OutboundEmail, OutboundSms, SmsProvider
from services.dispatcher.channels.file import FileEmail, FileSms

SENDER = "kaiku surveys <surveys@kaiku.test>"
ADDRESS = "maija.meikalainen@example.com"
PHONE = "+358401234567"


def outbound_email(invitation_id: str, subject: str = "How did we do?") -> OutboundEmail:
    headers = {
        "Message-ID": f"<{invitation_id}@kaiku.test>",
        "List-Unsubscribe": "<https://surveys.example.com/u/0abcdefghijklmnop>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = ADDRESS
    msg["Subject"] = subject
    for name, value in headers.items():
        msg[name] = value
    msg.set_content("Answer here")
    msg.add_alternative("<p>Answer here</p>", subtype="html")
    return OutboundEmail(
        invitation_id=invitation_id,
        sender=SENDER,
        to=ADDRESS,
        subject=subject,
        text="Answer here",
        html="<p>Answer here</p>",
        headers=headers,
        message=msg,
    )


def outbound_sms(
    invitation_id: str, body: str = "Miten onnistuimme? https://x.test/s/1"
) -> OutboundSms:
    return OutboundSms(
        invitation_id=invitation_id,
        to=PHONE,
        body=body,
        encoding="UCS-2",
        segments=2,
        sender="Kaiku",
        locale="fi",
        survey_id="nps-delivery",
        customer_id="cust-1",
    )


def read_eml(path: Path) -> EmailMessage:
    msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def test_an_email_becomes_one_eml_file(tmp_path: Path) -> None:
    invitation_id = str(uuid.uuid4())
    channel: EmailProvider = FileEmail(tmp_path / "outbox")

    result = await channel.send(outbound_email(invitation_id))
    await channel.aclose()

    assert result.outcome == "sent", result.reason
    path = tmp_path / "outbox" / f"{invitation_id}.eml"
    assert result.provider_message_id == path.name
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == [path.name]
    msg = read_eml(path)
    assert msg["To"] == ADDRESS
    assert msg["Subject"] == "How did we do?"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Message-ID"] == f"<{invitation_id}@kaiku.test>"


async def test_an_sms_becomes_one_json_file(tmp_path: Path) -> None:
    invitation_id = str(uuid.uuid4())
    channel: SmsProvider = FileSms(tmp_path)

    result = await channel.send(outbound_sms(invitation_id))
    await channel.aclose()

    assert result.outcome == "sent", result.reason
    path = tmp_path / f"{invitation_id}.sms.json"
    assert result.provider_message_id == path.name
    assert json.loads(path.read_text(encoding="utf-8")) == {
        "invitation_id": invitation_id,
        "to": PHONE,
        "body": "Miten onnistuimme? https://x.test/s/1",
        "encoding": "UCS-2",
        "segments": 2,
        "sender": "Kaiku",
        "locale": "fi",
        "survey_id": "nps-delivery",
    }


async def test_sending_an_invitation_again_overwrites_its_files(tmp_path: Path) -> None:
    invitation_id = str(uuid.uuid4())
    emails, sms = FileEmail(tmp_path), FileSms(tmp_path)

    await emails.send(outbound_email(invitation_id, subject="First"))
    await sms.send(outbound_sms(invitation_id, body="first"))
    second = await emails.send(outbound_email(invitation_id, subject="Second"))
    second_sms = await sms.send(outbound_sms(invitation_id, body="second"))

    assert (second.outcome, second_sms.outcome) == ("sent", "sent")
    # No duplicates and no temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"{invitation_id}.eml",
        f"{invitation_id}.sms.json",
    ]
    assert read_eml(tmp_path / f"{invitation_id}.eml")["Subject"] == "Second"
    document = json.loads((tmp_path / f"{invitation_id}.sms.json").read_text(encoding="utf-8"))
    assert document["body"] == "second"


async def test_an_unwritable_outbox_is_transient(tmp_path: Path) -> None:
    # A regular file where the folder should be: mkdir fails even for root.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    outbox = blocker / "outbox"

    email_result = await FileEmail(outbox).send(outbound_email(str(uuid.uuid4())))
    sms_result = await FileSms(outbox).send(outbound_sms(str(uuid.uuid4())))

    for result in (email_result, sms_result):
        assert result.outcome == "transient"
        assert result.reason is not None and result.reason.startswith("cannot write the outbox")


async def test_the_outbox_is_created_when_missing(tmp_path: Path) -> None:
    invitation_id = str(uuid.uuid4())
    outbox = tmp_path / "var" / "outbox"

    result = await FileSms(outbox).send(outbound_sms(invitation_id))

    assert result.outcome == "sent", result.reason
    assert (outbox / f"{invitation_id}.sms.json").is_file()

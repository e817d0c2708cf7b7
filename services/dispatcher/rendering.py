"""The invitation email: subject, HTML and plain-text bodies, and the MIME message around them.

Templates are Jinja2 in a sandbox with ``StrictUndefined`` (a misspelt variable fails the render
instead of sending an email with a hole in it). HTML templates are autoescaped, text ones not.
A customer's own templates (``template_dir``) are searched before the shipped ones in
``templates/``; the localized texts live in ``templates/strings.yaml``.

The template context deliberately holds no contact details (email address, phone): a template
has no use for them, and a customer-provided template must not be able to leak them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import Policy
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment

from services.common.events import InvitationRequested
from services.common.program import SUPPORTED_LOCALES, Survey

TEMPLATES = Path(__file__).parent / "templates"
HTML_TEMPLATE = "email/invitation.html.j2"
TEXT_TEMPLATE = "email/invitation.txt.j2"
DEFAULT_LOCALE = "en"


def _load_strings(path: Path) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of locale to texts")
    return data


STRINGS: dict[str, dict[str, Any]] = _load_strings(TEMPLATES / "strings.yaml")


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


def resolve_locale(value: str | None) -> str:
    """The supported locale of a language tag ("fi", "sv-FI", "en_GB"), else English."""
    primary = re.split(r"[-_]", value or "", maxsplit=1)[0].lower()
    return primary if primary in SUPPORTED_LOCALES else DEFAULT_LOCALE


def _pick(texts: dict[str, str] | None, locale: str) -> str | None:
    """The text in ``locale``, else in English, else the first one there is."""
    if not texts:
        return None
    return texts.get(locale) or texts.get(DEFAULT_LOCALE) or next(iter(texts.values()))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def survey_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/s/{quote(token, safe='')}"


def unsubscribe_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/u/{quote(token, safe='')}"


class Renderer:
    """Renders invitation emails from the shipped templates or a customer's overrides."""

    def __init__(self, public_url: str, template_dir: Path | None = None) -> None:
        self.public_url = public_url.rstrip("/")
        loader: BaseLoader = FileSystemLoader(TEMPLATES)
        if template_dir is not None:
            loader = ChoiceLoader([FileSystemLoader(template_dir), loader])
        self.env = SandboxedEnvironment(
            loader=loader,
            undefined=StrictUndefined,
            autoescape=select_autoescape(["html", "html.j2"]),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )

    def context(self, invitation: InvitationRequested, survey: Survey) -> dict[str, Any]:
        """What the templates see. No email address or phone number, by design."""
        locale = resolve_locale(invitation.locale)
        texts = STRINGS[locale]
        question = _pick(survey.question, locale)
        if question is None:
            raise ValueError(f"survey {survey.id!r} has no question")
        low, high = survey.scale
        low_label: str = texts["scale"][survey.metric]["low"]
        high_label: str = texts["scale"][survey.metric]["high"]
        link = survey_url(self.public_url, invitation.token)
        scores = []
        for score in range(low, high + 1):
            label = texts["score_label"].format(score=score, low=low, high=high)
            if score == low:
                label = f"{label} ({low_label})"
            elif score == high:
                label = f"{label} ({high_label})"
            scores.append({"score": score, "url": f"{link}?score={score}", "label": label})
        customer = invitation.customer
        return {
            "locale": locale,
            "t": texts,
            "subject": _one_line(_pick(survey.title, locale) or texts["subject"]),
            "question": question,
            "followup": _pick(survey.followup, locale),
            "survey": {"id": survey.id, "metric": survey.metric},
            "scores": scores,
            "cell_width": f"{100 / len(scores):.2f}%",
            "low": low,
            "high": high,
            "low_label": low_label,
            "high_label": high_label,
            "survey_url": link,
            "unsubscribe_url": unsubscribe_url(self.public_url, invitation.token),
            "expires_at": invitation.expires_at,
            "customer": {
                "id": customer.id,
                "account_id": customer.account_id,
                "locale": customer.locale,
                "timezone": customer.timezone,
            },
            "context": invitation.context.model_dump(),
        }

    def email(self, invitation: InvitationRequested, survey: Survey) -> RenderedEmail:
        context = self.context(invitation, survey)
        return RenderedEmail(
            subject=context["subject"],
            html=self.env.get_template(HTML_TEMPLATE).render(context),
            text=self.env.get_template(TEXT_TEMPLATE).render(context),
        )


class _ListHeader(str):
    """A header of comma-separated items, folded only between items and never encoded.

    The standard policies turn an unstructured header with a word longer than the line (a long
    URL) into RFC 2047 encoded words, which mail clients do not decode in List-Unsubscribe.
    """

    name: str

    def __new__(cls, name: str, items: list[str]) -> _ListHeader:
        header = super().__new__(cls, ", ".join(items))
        header.name = name
        return header

    def fold(self, *, policy: Policy) -> str:
        separator = "," + policy.linesep + " "
        return f"{self.name}: {separator.join(self.split(', '))}{policy.linesep}"


def build_message(
    rendered: RenderedEmail,
    *,
    invitation: InvitationRequested,
    sender: str,
    public_url: str,
    unsubscribe_mailto: str | None = None,
    domain: str = "kaiku.local",
) -> EmailMessage:
    """The email of an invitation: multipart/alternative (text, then HTML) with list headers.

    The Message-ID derives from the invitation, so a resend of the same invitation is
    recognisable as such.
    """
    to = invitation.customer.email
    if to is None:
        raise ValueError(f"invitation {invitation.invitation_id} has no email address")
    unsubscribe = [f"<{unsubscribe_url(public_url, invitation.token)}>"]
    if unsubscribe_mailto:
        address = unsubscribe_mailto.removeprefix("mailto:")
        unsubscribe.append(f"<mailto:{address}?subject=unsubscribe>")

    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = _one_line(rendered.subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = f"<{invitation.invitation_id}@{domain}>"
    msg["List-Unsubscribe"] = _ListHeader("List-Unsubscribe", unsubscribe)
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Kaiku-Invitation"] = str(invitation.invitation_id)
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    # After the bodies: setting content clears the Content-* headers.
    msg["Content-Language"] = resolve_locale(invitation.locale)
    return msg

"""The invitation messages: email (subject, HTML and text bodies, the MIME message) and SMS.

Templates are Jinja2 in a sandbox with ``StrictUndefined`` (a misspelt variable fails the render
instead of sending a message with a hole in it). HTML templates (``*.html.j2``) are autoescaped,
text ones not. The localized texts live in ``templates/strings.yaml``.

Which template renders a message: for each part (email ``html`` and ``txt``, SMS ``txt``) the
first of these names that exists, where ``<channel>`` is ``email`` or ``sms``, ``<survey_id>``
the survey's id and ``<locale>`` the recipient's resolved locale (``fi``, ``sv`` or ``en``)::

    <channel>/<survey_id>/invitation.<locale>.<ext>.j2
    <channel>/<survey_id>/invitation.<ext>.j2
    <channel>/invitation.<locale>.<ext>.j2
    <channel>/invitation.<ext>.j2

Each name is looked for in the customer's template directory (``KAIKU_TEMPLATE_DIR``) first, then
in the shipped ``templates/``. kaiku ships only the last, generic names, so any template of the
customer's wins over a shipped one. For example ``sms/support-csat/invitation.fi.txt.j2`` changes
the Finnish SMS of the survey ``support-csat`` only, and ``email/invitation.html.j2`` the HTML of
every email. A renderer keeps the templates it has loaded (reloading one whose file changed): a
new file that shadows a template already loaded by the same name is used after a restart.

Every template sees the same context (``Renderer.context``); ``reminder`` is true for the
survey's one reminder. The context deliberately holds no contact details (email address, phone):
a template has no use for them, and a customer-provided template must not be able to leak them.
An SMS is rendered, then its whitespace collapsed to single spaces and typographic punctuation
made plain; a text longer than ``KAIKU_SMS_MAX_SEGMENTS`` segments raises ``TemplateTooLong``.
"""

from __future__ import annotations

import re
import traceback
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import EmailPolicy, Policy
from email.utils import formatdate
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import yaml
from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    select_autoescape,
)
from jinja2.sandbox import SandboxedEnvironment

from services.common.events import Customer, InvitationRequested, SurveyContext
from services.common.program import SUPPORTED_LOCALES, Survey
from services.dispatcher.channels import OutboundEmail, OutboundSms
from services.dispatcher.sms import Encoding, normalize_phone, plain_punctuation, segments

TEMPLATES = Path(__file__).parent / "templates"
# The shipped templates (the last name of each lookup).
HTML_TEMPLATE = "email/invitation.html.j2"
TEXT_TEMPLATE = "email/invitation.txt.j2"
SMS_TEMPLATE = "sms/invitation.txt.j2"
DEFAULT_LOCALE = "en"

Channel = Literal["email", "sms"]


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


@dataclass(frozen=True)
class RenderedSms:
    text: str
    encoding: Encoding
    segments: int
    locale: str


class TemplateTooLong(ValueError):
    """A rendered SMS takes more segments than allowed (``KAIKU_SMS_MAX_SEGMENTS``)."""

    def __init__(
        self, *, survey_id: str, locale: str, segments: int, limit: int, encoding: Encoding
    ) -> None:
        super().__init__(
            f"the SMS of survey {survey_id!r} in locale {locale!r} is {segments} {encoding} "
            f"segments, more than the limit of {limit} (KAIKU_SMS_MAX_SEGMENTS): shorten the "
            "question or the template"
        )
        self.survey_id = survey_id
        self.locale = locale
        self.segments = segments
        self.limit = limit
        self.encoding = encoding


def resolve_locale(value: str | None) -> str:
    """The supported locale of a language tag ("fi", "sv-FI", "en_GB"), else English."""
    primary = re.split(r"[-_]", value or "", maxsplit=1)[0].lower()
    return primary if primary in SUPPORTED_LOCALES else DEFAULT_LOCALE


def template_names(channel: Channel, survey_id: str, locale: str, ext: str) -> list[str]:
    """The names a template is looked up by, most specific first (see the module docstring)."""
    return [
        f"{channel}/{survey_id}/invitation.{locale}.{ext}.j2",
        f"{channel}/{survey_id}/invitation.{ext}.j2",
        f"{channel}/invitation.{locale}.{ext}.j2",
        f"{channel}/invitation.{ext}.j2",
    ]


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
    """Renders invitations from the shipped templates or a customer's overrides."""

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

    def template(self, channel: Channel, survey_id: str, locale: str, ext: str) -> Template:
        """The template of one part of a message (see the lookup in the module docstring)."""
        return self.env.select_template(template_names(channel, survey_id, locale, ext))

    def context(
        self, invitation: InvitationRequested, survey: Survey, *, reminder: bool = False
    ) -> dict[str, Any]:
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
        subject = _one_line(_pick(survey.title, locale) or texts["subject"])
        if reminder:
            subject = texts["reminder_subject"].format(subject=subject)
        customer = invitation.customer
        return {
            "locale": locale,
            "t": texts,
            "reminder": reminder,
            "subject": subject,
            "question": question,
            "followup": _pick(survey.followup, locale),
            "survey": {"id": survey.id, "metric": survey.metric},
            "scores": scores,
            "cell_width": f"{100 / len(scores):.2f}%",
            "low": low,
            "high": high,
            "low_label": low_label,
            "high_label": high_label,
            "answer_prompt": texts["sms_answer"].format(low=low, high=high),
            "survey_url": link,
            # A link no person sees (hidden in the HTML part); only link scanners follow it, and
            # the collector then keeps answers made around that moment apart as suspected bots.
            "trap_url": f"{link}/trap",
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

    def email(
        self, invitation: InvitationRequested, survey: Survey, *, reminder: bool = False
    ) -> RenderedEmail:
        context = self.context(invitation, survey, reminder=reminder)
        locale = context["locale"]
        return RenderedEmail(
            subject=context["subject"],
            html=self.template("email", survey.id, locale, "html").render(context),
            text=self.template("email", survey.id, locale, "txt").render(context),
        )

    def sms(
        self, invitation: InvitationRequested, survey: Survey, *, reminder: bool = False
    ) -> RenderedSms:
        """The SMS text (one line) with its encoding and segment count; no limit applied."""
        context = self.context(invitation, survey, reminder=reminder)
        locale = context["locale"]
        rendered = self.template("sms", survey.id, locale, "txt").render(context)
        text = plain_punctuation(_one_line(rendered))
        encoding, count = segments(text)
        return RenderedSms(text=text, encoding=encoding, segments=count, locale=locale)

    def outbound_email(
        self,
        invitation: InvitationRequested,
        survey: Survey,
        *,
        sender: str,
        unsubscribe_mailto: str | None,
        domain: str,
        reminder: bool = False,
    ) -> OutboundEmail:
        """The email of an invitation (or of its reminder), ready for any email provider.

        ``ValueError`` when the customer has no email address.
        """
        if invitation.customer.email is None:
            raise ValueError(f"invitation {invitation.invitation_id} has no email address")
        rendered = self.email(invitation, survey, reminder=reminder)
        message = build_message(
            rendered,
            invitation=invitation,
            sender=sender,
            public_url=self.public_url,
            unsubscribe_mailto=unsubscribe_mailto,
            domain=domain,
            reminder=reminder,
        )
        return OutboundEmail(
            invitation_id=str(invitation.invitation_id),
            sender=sender,
            to=invitation.customer.email,
            subject=_one_line(rendered.subject),
            text=rendered.text,
            html=rendered.html,
            headers=message_headers(message),
            message=message,
            locale=resolve_locale(invitation.locale),
            survey_id=survey.id,
            customer_id=invitation.customer.id,
        )

    def outbound_sms(
        self,
        invitation: InvitationRequested,
        survey: Survey,
        *,
        sender: str | None,
        max_segments: int,
        reminder: bool = False,
    ) -> OutboundSms:
        """The SMS of an invitation (or of its reminder), ready for any SMS provider.

        ``ValueError`` when the customer has no valid phone number (the message never contains
        the number), ``TemplateTooLong`` when the text takes more than ``max_segments``.
        """
        phone = invitation.customer.phone
        if phone is None:
            raise ValueError(f"invitation {invitation.invitation_id} has no phone number")
        try:
            to = normalize_phone(phone)
        except ValueError as exc:
            raise ValueError(f"invitation {invitation.invitation_id}: {exc}") from None
        rendered = self.sms(invitation, survey, reminder=reminder)
        if rendered.segments > max_segments:
            raise TemplateTooLong(
                survey_id=survey.id,
                locale=rendered.locale,
                segments=rendered.segments,
                limit=max_segments,
                encoding=rendered.encoding,
            )
        return OutboundSms(
            invitation_id=str(invitation.invitation_id),
            to=to,
            body=rendered.text,
            encoding=rendered.encoding,
            segments=rendered.segments,
            sender=sender,
            locale=rendered.locale,
            survey_id=survey.id,
            customer_id=invitation.customer.id,
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


class _FoldOnce:
    """A header that folds itself once per kind of policy (an invitation's headers are folded
    again by every flatten, and the same header object serves many messages)."""

    def fold(self, *, policy: Policy) -> str:
        folds: dict[tuple[object, ...], str] = self.__dict__.setdefault("_folds", {})
        key = (type(policy), policy.linesep, policy.max_line_length, getattr(policy, "utf8", False))
        folded = folds.get(key)
        if folded is None:
            folded = folds[key] = super().fold(policy=policy)  # type: ignore[misc]
        return folded


class _HeaderClasses(HeaderRegistry):
    """The standard header registry, building each header's class once (the stdlib's builds a
    new class with ``type()`` for every header set), with folds kept (``_FoldOnce``)."""

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            standard = self.registry.get(key, self.default_class)
            cls = type("_" + standard.__name__, (_FoldOnce, standard, self.base_class), {})
            self._classes[key] = cls
        return cls


class _Policy(EmailPolicy):
    """``email.policy.default`` that parses a header value it has seen recently only once: the
    sender, the subject of each survey and locale, the MIME parts' headers repeat in every
    invitation (headers are immutable, so messages can share them)."""

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        if type(value) is str:
            return _parsed(self, name, value)
        return super().header_store_parse(name, value)


@lru_cache(maxsize=4096)
def _parsed(policy: _Policy, name: str, value: str) -> tuple[str, Any]:
    return EmailPolicy.header_store_parse(policy, name, value)


# The headers and folding of every invitation: email.policy.default's, only cheaper.
POLICY = _Policy(header_factory=_HeaderClasses())


def message_id(invitation: InvitationRequested, domain: str, *, reminder: bool = False) -> str:
    """The Message-ID of an invitation's email (``.r1`` for its reminder): deterministic, so a
    resend of the same email is recognisable as such."""
    return f"<{invitation.invitation_id}{'.r1' if reminder else ''}@{domain}>"


def build_message(
    rendered: RenderedEmail,
    *,
    invitation: InvitationRequested,
    sender: str,
    public_url: str,
    unsubscribe_mailto: str | None = None,
    domain: str = "kaiku.local",
    reminder: bool = False,
) -> EmailMessage:
    """The email of an invitation: multipart/alternative (text, then HTML) with list headers.

    The Message-ID derives from the invitation, so a resend of the same invitation is
    recognisable as such; a reminder has its own and refers to the invitation's
    (``In-Reply-To``, ``References``), so mail clients thread the two.
    """
    to = invitation.customer.email
    if to is None:
        raise ValueError(f"invitation {invitation.invitation_id} has no email address")
    unsubscribe = [f"<{unsubscribe_url(public_url, invitation.token)}>"]
    if unsubscribe_mailto:
        address = unsubscribe_mailto.removeprefix("mailto:")
        unsubscribe.append(f"<mailto:{address}?subject=unsubscribe>")

    msg = EmailMessage(policy=POLICY)
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = _one_line(rendered.subject)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = message_id(invitation, domain, reminder=reminder)
    if reminder:
        original = message_id(invitation, domain)
        msg["In-Reply-To"] = original
        msg["References"] = original
    msg["List-Unsubscribe"] = _ListHeader("List-Unsubscribe", unsubscribe)
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Kaiku-Invitation"] = str(invitation.invitation_id)
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    # "=_" never occurs in quoted-printable text, so the boundary needs no search of the parts
    # (the generator's own check compiles a regular expression per message).
    msg.set_boundary(f"=_kaiku_{uuid.uuid4().hex}")
    # After the bodies: setting content clears the Content-* headers.
    msg["Content-Language"] = resolve_locale(invitation.locale)
    return msg


# Headers that are OutboundEmail fields of their own or describe the MIME structure.
_NOT_EXTRA = {"from", "to", "subject", "mime-version", "content-type", "content-transfer-encoding"}


def message_headers(message: EmailMessage) -> dict[str, str]:
    """The headers of ``message`` an HTTP API passes on (Message-ID, Date, List-Unsubscribe, ...),
    unfolded, in the message's order; not From, To, Subject or the MIME structure."""
    return {
        name: re.sub(r"\r?\n[ \t]+", " ", str(value))
        for name, value in message.items()
        if name.lower() not in _NOT_EXTRA
    }


# -- kaiku check and kaiku preview ------------------------------------------------------------

# A token of the longest length an invitation allows, and a plausible production address: what
# `kaiku check` counts SMS segments with when KAIKU_PUBLIC_URL is not set.
LONGEST_TOKEN = "0" * 32
PLAUSIBLE_PUBLIC_URL = "https://feedback.example-company.com"


def sample_invitation(
    survey: Survey,
    *,
    channel: Channel,
    locale: str,
    token: str = LONGEST_TOKEN,
    invitation_id: uuid.UUID | None = None,
) -> InvitationRequested:
    """A made-up invitation to ``survey`` with long-but-plausible values in every field a
    template can see: what `kaiku check` renders every template with, and `kaiku preview`."""
    now = datetime.now(UTC).replace(microsecond=0)
    customer = Customer(
        id="customer-2f8e1c0a-9b7d-4c3e-a1f5-6d2b8e4c7a90",
        email="firstname.lastname@example.com",
        phone="+358401234567",
        locale=locale,
        timezone="Europe/Helsinki",
        account_id="account-5d1f9a7e-0c3b-4e8d-b2a6-8f4c1e7d3b52",
    )
    return InvitationRequested(
        invitation_id=invitation_id or uuid.UUID("00000000-0000-4000-8000-000000000000"),
        token=token,
        survey_id=survey.id,
        trigger_id="sample-trigger",
        metric=survey.metric,
        event_id="sample-event",
        event_source="kaiku://sample",
        event_type="ticket.solved",
        event_time=now,
        customer=customer,
        channel=channel,
        locale=locale,
        send_at=now,
        expires_at=now + survey.link_expiry,
        requested_at=now,
        context=SurveyContext(
            touchpoint="customer-support",
            channel="email",
            team="Customer Support, Invoicing and Payments",
            agent="agent-000000000012",
            case_id="CASE-2026-0000098213",
            account_id=customer.account_id,
        ),
    )


def template_error(exc: Exception) -> str:
    """What went wrong in a template, with the template's file and line where Jinja knows them."""
    if isinstance(exc, TemplateSyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}: {exc.message}"
    if isinstance(exc, TemplateNotFound):
        return f"no template of {', '.join(str(name) for name in exc.templates)}"
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename.endswith(".j2"):
            where = f"{frame.f_code.co_filename}:{lineno}"
    return f"{where}: {exc}" if where else str(exc)


def check_templates(renderer: Renderer, survey: Survey, *, max_segments: int) -> list[str]:
    """Render every message ``survey`` can send (each of its channels, every locale, and the
    reminder if it has one) with a long sample invitation: one line per problem, naming survey,
    channel and locale (an SMS over ``max_segments``, a template that fails to render)."""
    problems = []
    for channel in survey.channels:
        for locale in SUPPORTED_LOCALES:
            for reminder in (False, True) if survey.reminder else (False,):
                what = f"survey {survey.id!r}, {channel}, {locale}" + (
                    ", reminder" if reminder else ""
                )
                invitation = sample_invitation(survey, channel=channel, locale=locale)
                try:
                    if channel == "email":
                        renderer.email(invitation, survey, reminder=reminder)
                        continue
                    sms = renderer.sms(invitation, survey, reminder=reminder)
                except (TemplateError, ValueError) as exc:
                    problems.append(f"{what}: the template fails: {template_error(exc)}")
                    continue
                if sms.segments > max_segments:
                    problems.append(
                        f"{what}: the SMS is {sms.segments} {sms.encoding} segments, more than "
                        f"the limit of {max_segments} (KAIKU_SMS_MAX_SEGMENTS); "
                        f"{len(sms.text)} characters: {sms.text}"
                    )
    return problems

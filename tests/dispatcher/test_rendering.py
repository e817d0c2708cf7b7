"""The invitation email: templates, localized texts, escaping and the MIME message."""

from __future__ import annotations

import email
import email.policy
import re
import string
import uuid
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from jinja2 import UndefinedError

from services.common.events import Customer, InvitationRequested
from services.common.program import Program, Survey, load_program
from services.dispatcher.rendering import (
    STRINGS,
    RenderedEmail,
    Renderer,
    build_message,
    resolve_locale,
)

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_URL = "https://surveys.example.com"
TOKEN = "0abcdefghijklmnop_qrstuvwxy-z"
EMAIL = "maija.meikalainen@example.com"
PHONE = "+358401234567"
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def program() -> Program:
    return load_program(ROOT / "deploy/local/program.yaml")


@pytest.fixture
def renderer() -> Renderer:
    return Renderer(PUBLIC_URL)


def invitation(
    survey: Survey, *, locale: str = "en", customer_id: str = "cust-1", email: str | None = EMAIL
) -> InvitationRequested:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    return InvitationRequested(
        invitation_id=uuid.UUID("6f1c2a8e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"),
        token=TOKEN,
        survey_id=survey.id,
        trigger_id="some-trigger",
        metric=survey.metric,
        event_id="evt-1",
        event_source="crm",
        event_type="order.delivered",
        customer=Customer(id=customer_id, email=email, phone=PHONE, account_id="acc-1"),
        channel="email",
        locale=locale,
        send_at=now,
        expires_at=now + timedelta(days=14),
        requested_at=now,
    )


def ces_survey() -> Survey:
    return Survey(
        id="support-ces",
        metric="ces",
        question={
            "fi": "Kuinka helppoa asiasi hoitaminen oli?",
            "sv": "Hur lätt var det att få hjälp med ditt ärende?",
            "en": "How easy was it to get your issue resolved?",
        },
    )


def nps_survey(program: Program) -> Survey:
    return program.survey("relationship-nps")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.links: list[dict[str, str | None]] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.extend(attrs)
        if tag == "a":
            self.links.append(dict(attrs))


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def _keys(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        keys: set[str] = set()
        for key, value in node.items():
            keys |= _keys(value, f"{prefix}{key}.") | {f"{prefix}{key}"}
        return keys
    return set()


def _leaves(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out |= _leaves(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): node}


def _fields(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def test_every_locale_has_every_text_with_the_same_placeholders() -> None:
    assert set(STRINGS) == {"fi", "sv", "en"}
    reference = _keys(STRINGS["en"])
    english = _leaves(STRINGS["en"])
    for locale, texts in STRINGS.items():
        assert _keys(texts) == reference, locale
        for key, text in _leaves(texts).items():
            assert isinstance(text, str), (locale, key)
            assert text.strip(), (locale, key)
            assert _fields(text) == _fields(english[key]), (locale, key)
    for metric in ("nps", "csat", "ces"):
        assert set(STRINGS["en"]["scale"][metric]) == {"low", "high"}


@pytest.mark.parametrize(
    ("survey_id", "scores"),
    [("relationship-nps", range(0, 11)), ("support-csat", range(1, 6)), ("ces", range(1, 8))],
)
def test_score_links_match_the_scale(
    program: Program, renderer: Renderer, survey_id: str, scores: range
) -> None:
    survey = ces_survey() if survey_id == "ces" else program.survey(survey_id)
    rendered = renderer.email(invitation(survey), survey)
    links = [a["href"] for a in parse(rendered.html).links]
    score_links = [h for h in links if h and "?score=" in h]
    assert score_links == [f"{PUBLIC_URL}/s/{TOKEN}?score={n}" for n in scores]
    assert f"{PUBLIC_URL}/s/{TOKEN}" in links
    assert f"{PUBLIC_URL}/u/{TOKEN}" in links
    # Every button has an accessible label.
    buttons = [a for a in parse(rendered.html).links if "?score=" in (a["href"] or "")]
    assert all(a.get("aria-label") for a in buttons)
    # The text part lists the same links, one per line.
    for n in scores:
        assert f"{n} – {PUBLIC_URL}/s/{TOKEN}?score={n}\n" in rendered.text
    assert f"{PUBLIC_URL}/s/{TOKEN}\n" in rendered.text
    assert f"{PUBLIC_URL}/u/{TOKEN}" in rendered.text
    assert f"?score={scores.stop}" not in rendered.html + rendered.text
    assert f"?score={scores.start - 1}" not in rendered.html + rendered.text


@pytest.mark.parametrize(
    ("metric", "low", "high"),
    [
        ("nps", "Not at all likely", "Extremely likely"),
        ("csat", "Very dissatisfied", "Very satisfied"),
        ("ces", "Very difficult", "Very easy"),
    ],
)
def test_scale_end_labels(
    program: Program, renderer: Renderer, metric: str, low: str, high: str
) -> None:
    survey = {
        "nps": program.survey("relationship-nps"),
        "csat": program.survey("support-csat"),
        "ces": ces_survey(),
    }[metric]
    rendered = renderer.email(invitation(survey), survey)
    assert low in rendered.html
    assert high in rendered.html
    assert low in rendered.text


@pytest.mark.parametrize("locale", ["fi", "sv", "en"])
def test_each_locale_renders_its_own_texts(
    program: Program, renderer: Renderer, locale: str
) -> None:
    survey = nps_survey(program)
    rendered = renderer.email(invitation(survey, locale=locale), survey)
    assert survey.question[locale] in rendered.html
    assert survey.question[locale] in rendered.text
    assert survey.title is not None
    assert rendered.subject == survey.title[locale]
    assert f'<html lang="{locale}"' in rendered.html
    texts = STRINGS[locale]
    for text in (texts["intro"], texts["unsubscribe"], texts["scale"]["nps"]["low"]):
        assert text.replace("'", "&#39;") in rendered.html
        assert text in rendered.text
    for other in {"fi", "sv", "en"} - {locale}:
        assert survey.question[other] not in rendered.html


def test_finnish_wording(program: Program, renderer: Renderer) -> None:
    survey = nps_survey(program)
    rendered = renderer.email(invitation(survey, locale="fi"), survey)
    assert "Kiitos, että asioit kanssamme. Vastaaminen vie alle minuutin." in rendered.text
    assert "Erittäin epätodennäköisesti" in rendered.html
    assert "Erittäin todennäköisesti" in rendered.html


@pytest.mark.parametrize(
    ("tag", "expected"),
    [("fi", "fi"), ("sv-FI", "sv"), ("en_GB", "en"), ("FI", "fi"), ("de", "en"), ("", "en")],
)
def test_locale_resolution(tag: str, expected: str) -> None:
    assert resolve_locale(tag) == expected


def test_unsupported_locale_falls_back_to_english(program: Program, renderer: Renderer) -> None:
    survey = nps_survey(program)
    rendered = renderer.email(invitation(survey, locale="de"), survey)
    assert survey.question["en"] in rendered.html
    assert '<html lang="en"' in rendered.html


def test_question_and_subject_fallbacks(renderer: Renderer) -> None:
    english = Survey(id="s1", metric="csat", question={"en": "How was it?", "fi": "Miten meni?"})
    rendered = renderer.email(invitation(english, locale="sv"), english)
    assert "How was it?" in rendered.html
    assert rendered.subject == STRINGS["sv"]["subject"]

    finnish_only = Survey(
        id="s2", metric="csat", question={"fi": "Miten meni?"}, title={"fi": "Palaute"}
    )
    rendered = renderer.email(invitation(finnish_only, locale="en"), finnish_only)
    assert "Miten meni?" in rendered.html
    assert rendered.subject == "Palaute"


def test_html_is_a_self_contained_email_document(program: Program, renderer: Renderer) -> None:
    survey = nps_survey(program)
    html = renderer.email(invitation(survey), survey).html
    assert html.startswith("<!DOCTYPE html>")
    page = parse(html)
    assert page.tags[:2] == ["html", "head"]
    assert ("charset", "utf-8") in page.attrs
    assert ("name", "viewport") in page.attrs
    assert {"table", "body", "title"} <= set(page.tags)
    assert not {"style", "script", "link", "img", "iframe", "form"} & set(page.tags)
    assert not re.search(r"\bon[a-z]+=", html)  # no event handlers
    assert "javascript:" not in html
    assert not any(name == "class" for name, _ in page.attrs)  # no stylesheet to refer to
    assert all(a.get("style") for a in page.links)  # buttons and links are styled inline


def test_customer_data_is_escaped_in_html(program: Program, tmp_path: Path) -> None:
    survey = nps_survey(program)
    hostile = invitation(survey, customer_id=HOSTILE)
    built_in = Renderer(PUBLIC_URL).email(hostile, survey)
    assert "<script" not in built_in.html
    # A customer's template that does show the id gets it escaped in HTML, verbatim in text.
    (tmp_path / "email").mkdir()
    (tmp_path / "email/invitation.html.j2").write_text(
        "<p>{{ customer.id }} {{ question }}</p>", encoding="utf-8"
    )
    (tmp_path / "email/invitation.txt.j2").write_text("{{ customer.id }}", encoding="utf-8")
    custom = Renderer(PUBLIC_URL, tmp_path).email(hostile, survey)
    assert "<script>" not in custom.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in custom.html
    assert custom.text == HOSTILE


def test_missing_variable_raises(renderer: Renderer) -> None:
    with pytest.raises(UndefinedError):
        renderer.env.from_string("Hello {{ no_such_thing }}").render(question="q")
    with pytest.raises(UndefinedError):
        renderer.env.from_string("{{ customer.nickname }}").render(customer={"id": "1"})


def test_contact_details_are_not_in_the_template_context(
    program: Program, renderer: Renderer, tmp_path: Path
) -> None:
    survey = nps_survey(program)
    inv = invitation(survey)
    rendered = renderer.email(inv, survey)
    for body in (rendered.html, rendered.text, rendered.subject):
        assert EMAIL not in body
        assert PHONE not in body
    assert EMAIL not in repr(renderer.context(inv, survey))
    assert PHONE not in repr(renderer.context(inv, survey))
    # Nor can a customer's template reach them.
    (tmp_path / "email").mkdir()
    (tmp_path / "email/invitation.txt.j2").write_text("{{ customer.email }}", encoding="utf-8")
    with pytest.raises(UndefinedError):
        Renderer(PUBLIC_URL, tmp_path).email(inv, survey)


def test_sandbox_refuses_unsafe_access(renderer: Renderer) -> None:
    from jinja2.exceptions import SecurityError

    with pytest.raises(SecurityError):
        renderer.env.from_string("{{ ''.__class__.__mro__ }}").render()


def test_override_directory_takes_precedence(program: Program, tmp_path: Path) -> None:
    survey = nps_survey(program)
    (tmp_path / "email").mkdir()
    (tmp_path / "email/invitation.txt.j2").write_text(
        "Custom: {{ question }} {{ survey_url }}", encoding="utf-8"
    )
    rendered = Renderer(PUBLIC_URL, tmp_path).email(invitation(survey), survey)
    assert rendered.text == f"Custom: {survey.question['en']} {PUBLIC_URL}/s/{TOKEN}"
    # The HTML template is not overridden: the shipped one is used.
    assert rendered.html.startswith("<!DOCTYPE html>")


def _message(program: Program, **kwargs: Any) -> tuple[InvitationRequested, Any]:
    survey = nps_survey(program)
    inv = invitation(survey, locale=kwargs.pop("locale", "fi"))
    rendered = Renderer(PUBLIC_URL).email(inv, survey)
    msg = build_message(
        rendered,
        invitation=inv,
        sender="Kaiku <surveys@kaiku.local>",
        public_url=kwargs.pop("public_url", PUBLIC_URL),
        **kwargs,
    )
    return inv, msg


def test_build_message(program: Program) -> None:
    inv, msg = _message(
        program, unsubscribe_mailto="unsubscribe@example.com", domain="mail.example.com"
    )
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert parsed["From"] == "Kaiku <surveys@kaiku.local>"
    assert parsed["To"] == EMAIL
    assert parsed["Subject"] == "Suosittelisitko meitä?"
    assert parsed["Date"].datetime.tzinfo is not None
    assert parsed["Message-ID"] == f"<{inv.invitation_id}@mail.example.com>"
    assert parsed["List-Unsubscribe"] == (
        f"<{PUBLIC_URL}/u/{TOKEN}>, <mailto:unsubscribe@example.com?subject=unsubscribe>"
    )
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert parsed["Auto-Submitted"] == "auto-generated"
    assert parsed["X-Kaiku-Invitation"] == str(inv.invitation_id)
    assert parsed["Content-Language"] == "fi"
    assert parsed.get_content_type() == "multipart/alternative"
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    text, html = (p.get_content() for p in parts)
    assert f"{PUBLIC_URL}/s/{TOKEN}?score=9" in text
    assert "Kuinka todennäköisesti suosittelisit" in html
    assert EMAIL not in text
    assert EMAIL not in html
    assert parsed.get_body(("html",)) is not None


def test_message_id_is_deterministic(program: Program) -> None:
    _, first = _message(program)
    _, second = _message(program)
    expected = f"<{first['X-Kaiku-Invitation']}@kaiku.local>"
    assert first["Message-ID"] == second["Message-ID"] == expected


def test_list_unsubscribe_without_mailto(program: Program) -> None:
    _, msg = _message(program)
    assert msg["List-Unsubscribe"] == f"<{PUBLIC_URL}/u/{TOKEN}>"


def test_long_urls_in_headers_survive_smtp_folding(program: Program) -> None:
    long_url = "https://surveys.a-rather-long-subdomain.customer-company.example.com/kaiku"
    _, msg = _message(program, public_url=long_url, unsubscribe_mailto="mailto:u@example.com")
    for policy in (email.policy.default, email.policy.SMTP):
        raw = msg.as_bytes(policy=policy)
        assert b"=?utf-8?" not in raw.split(b"List-Unsubscribe:", 1)[1].split(b"\n", 1)[0]
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert parsed["List-Unsubscribe"] == (
            f"<{long_url}/u/{TOKEN}>, <mailto:u@example.com?subject=unsubscribe>"
        )
        assert all(len(line) <= 998 for line in raw.splitlines())


def test_build_message_needs_an_email_address(program: Program) -> None:
    survey = nps_survey(program)
    inv = invitation(survey, email=None)
    rendered = RenderedEmail(subject="s", html="<p>h</p>", text="t")
    with pytest.raises(ValueError, match="no email address"):
        build_message(rendered, invitation=inv, sender="s@kaiku.local", public_url=PUBLIC_URL)


def test_subject_is_one_line(program: Program) -> None:
    inv = invitation(nps_survey(program))
    rendered = RenderedEmail(subject="Hello\r\nBcc: x@example.com", html="<p>h</p>", text="t")
    msg = build_message(rendered, invitation=inv, sender="s@kaiku.local", public_url=PUBLIC_URL)
    assert msg["Subject"] == "Hello Bcc: x@example.com"
    assert msg["Bcc"] is None

"""The invitation email and SMS: templates and their lookup, localized texts, reminders,
escaping, the MIME message and the outbound messages the providers take."""

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
from services.common.program import Program, Reminder, Survey, load_program
from services.dispatcher.rendering import (
    STRINGS,
    RenderedEmail,
    Renderer,
    TemplateTooLong,
    build_message,
    check_templates,
    resolve_locale,
)
from services.dispatcher.sms import is_gsm7, segments

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


def test_messages_share_no_state(program: Program, renderer: Renderer) -> None:
    """Header values are parsed once and shared between messages: each message still carries
    its own recipient, subject, language and boundary, flattened as an SMTP client does."""
    survey = nps_survey(program)
    people = [(f"person{i}@example.com", ("fi", "sv", "en")[i % 3]) for i in range(6)]
    boundaries = set()
    for address, locale in people * 2:
        inv = invitation(survey, locale=locale, email=address)
        rendered = renderer.email(inv, survey)
        msg = build_message(rendered, invitation=inv, sender="s@kaiku.local", public_url=PUBLIC_URL)
        raw = msg.as_bytes(policy=email.policy.SMTP)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert parsed["To"] == address
        assert parsed["Subject"] == rendered.subject
        assert parsed["Content-Language"] == locale
        boundary = parsed.get_boundary()
        assert boundary is not None and boundary.startswith("=_")
        boundaries.add(boundary)
        text, html = (p.get_content() for p in parsed.iter_parts())
        assert text.split() == rendered.text.split()
        assert "<html" in html
        assert address not in text
    assert len(boundaries) == len(people) * 2


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


# -- SMS, per-survey templates, reminders and the outbound builders ------------------------------

SENDER = "Kaiku <surveys@kaiku.local>"
OPT_OUT = {
    "fi": "Vastaa STOP, jos et halua enää kyselyjä.",
    "sv": "Svara STOP om du inte vill få fler enkäter.",
    "en": "Reply STOP to opt out.",
}


def sms_survey(question: dict[str, str] | None = None, survey_id: str = "support-ces") -> Survey:
    return Survey(
        id=survey_id,
        metric="ces",
        question=question or ces_survey().question,
        channels=["sms", "email"],
    )


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("locale", ["fi", "sv", "en"])
def test_sms_in_each_locale(program: Program, renderer: Renderer, locale: str) -> None:
    for survey in (nps_survey(program), program.survey("support-csat"), ces_survey()):
        sms = renderer.sms(invitation(survey, locale=locale), survey)
        assert sms.locale == locale
        assert sms.text.startswith(survey.question[locale] + " ")
        assert f" {PUBLIC_URL}/s/{TOKEN} " in sms.text  # the short link, never glued to text
        assert "?score=" not in sms.text
        assert sms.text.endswith(" " + OPT_OUT[locale])
        low, high = survey.scale
        assert f"({low}-{high}):" in sms.text
        assert "\n" not in sms.text
        assert "  " not in sms.text
        assert (sms.encoding, sms.segments) == segments(sms.text)
        assert sms.encoding == "GSM-7"
        assert sms.segments <= 2


@pytest.mark.parametrize("locale", ["fi", "sv", "en"])
@pytest.mark.parametrize("reminder", [False, True])
def test_shipped_sms_fits_two_segments_with_the_longest_link(
    program: Program, locale: str, reminder: bool
) -> None:
    renderer = Renderer("https://feedback.customer-company-name.example.com")
    for survey in program.surveys:
        inv = invitation(survey, locale=locale).model_copy(update={"token": "x" * 32})
        sms = renderer.sms(inv, survey, reminder=reminder)
        assert sms.encoding == "GSM-7"
        assert sms.segments <= 2, sms.text


def test_sms_punctuation_is_made_plain(renderer: Renderer) -> None:
    survey = sms_survey({"en": "How was our \u201cExpress\u201d service \u2013 honestly\u2026?"})
    sms = renderer.sms(invitation(survey), survey)
    assert sms.text.startswith('How was our "Express" service - honestly...? ')
    assert sms.encoding == "GSM-7"


def test_sms_outside_gsm7_is_ucs2(renderer: Renderer) -> None:
    survey = sms_survey({"en": "Kuinka sujui asiointi Škoda-liikkeessä?"})
    sms = renderer.sms(invitation(survey), survey)
    assert sms.encoding == "UCS-2"
    assert sms.segments == segments(sms.text)[1] >= 2


def test_outbound_sms(renderer: Renderer) -> None:
    survey = sms_survey()
    inv = invitation(survey, locale="sv-FI")
    sms = renderer.outbound_sms(inv, survey, sender="Kaiku", max_segments=2)
    assert sms.invitation_id == str(inv.invitation_id)
    assert sms.to == PHONE
    assert sms.body == renderer.sms(inv, survey).text
    assert sms.body.startswith(survey.question["sv"])
    assert (sms.encoding, sms.segments) == segments(sms.body)
    assert sms.sender == "Kaiku"
    assert (sms.locale, sms.survey_id, sms.customer_id) == ("sv", survey.id, "cust-1")
    assert PHONE not in sms.body
    assert EMAIL not in sms.body


def test_outbound_sms_over_the_limit(renderer: Renderer) -> None:
    long = "How satisfied were you with " + "the quick and friendly service, " * 8 + "overall?"
    survey = sms_survey({"en": long, "fi": "Miten meni?"}, survey_id="long-one")
    with pytest.raises(TemplateTooLong) as info:
        renderer.outbound_sms(invitation(survey), survey, sender=None, max_segments=2)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'long-one'" in message
    assert "'en'" in message
    assert "3 GSM-7 segments" in message
    assert "limit of 2" in message
    assert (info.value.segments, info.value.limit, info.value.locale) == (3, 2, "en")
    # The same text is fine where more segments are allowed, and the Finnish one anyway.
    assert renderer.outbound_sms(invitation(survey), survey, sender=None, max_segments=3)
    fi = invitation(survey, locale="fi")
    assert renderer.outbound_sms(fi, survey, sender=None, max_segments=1).segments == 1


def test_outbound_sms_needs_a_valid_phone_number(renderer: Renderer) -> None:
    survey = sms_survey()
    no_phone = invitation(survey).model_copy(
        update={"customer": Customer(id="cust-1", email=EMAIL)}
    )
    with pytest.raises(ValueError, match="no phone number"):
        renderer.outbound_sms(no_phone, survey, sender=None, max_segments=2)
    # Well-formed E.164, but no such number: refused, without the number in the error.
    invalid = invitation(survey).model_copy(
        update={"customer": Customer(id="cust-1", phone="+999401234567")}
    )
    with pytest.raises(ValueError, match="not a valid phone number") as info:
        renderer.outbound_sms(invalid, survey, sender=None, max_segments=2)
    assert "401234567" not in str(info.value)
    assert str(invalid.invitation_id) in str(info.value)


def test_template_lookup_order(tmp_path: Path) -> None:
    survey = sms_survey()
    other = sms_survey(survey_id="other-survey")

    def text(s: Survey, locale: str) -> str:
        # A renderer of its own each time: a renderer keeps the templates it has loaded.
        return Renderer(PUBLIC_URL, tmp_path).sms(invitation(s, locale=locale), s).text

    assert text(survey, "fi").endswith(OPT_OUT["fi"])  # nothing overridden: the shipped one
    write(tmp_path, "sms/invitation.txt.j2", "generic {{ locale }}")
    assert text(survey, "fi") == "generic fi"
    write(tmp_path, "sms/invitation.fi.txt.j2", "generic Finnish")
    assert text(survey, "fi") == "generic Finnish"
    assert text(survey, "sv") == "generic sv"
    write(tmp_path, f"sms/{survey.id}/invitation.txt.j2", "survey {{ survey.id }} {{ locale }}")
    assert text(survey, "fi") == f"survey {survey.id} fi"
    assert text(survey, "sv") == f"survey {survey.id} sv"
    write(tmp_path, f"sms/{survey.id}/invitation.fi.txt.j2", "survey, Finnish")
    assert text(survey, "fi") == "survey, Finnish"
    assert text(survey, "sv") == f"survey {survey.id} sv"
    # Other surveys are not affected by a survey's own templates.
    assert text(other, "fi") == "generic Finnish"
    assert text(other, "en") == "generic en"
    # The locale is the resolved one: "fi-FI" finds the Finnish template.
    assert text(survey, "fi-FI") == "survey, Finnish"


def test_per_survey_email_template(program: Program, tmp_path: Path) -> None:
    survey = nps_survey(program)
    write(tmp_path, f"email/{survey.id}/invitation.sv.html.j2", "<p>{{ question }} & co</p>")
    write(tmp_path, f"email/{survey.id}/invitation.txt.j2", "{{ reminder }} {{ question }}")
    renderer = Renderer(PUBLIC_URL, tmp_path)
    swedish = renderer.email(invitation(survey, locale="sv"), survey)
    assert swedish.html == f"<p>{survey.question['sv']} & co</p>"  # the template's own &
    assert swedish.text == f"False {survey.question['sv']}"
    english = renderer.email(invitation(survey, locale="en"), survey, reminder=True)
    assert english.html.startswith("<!DOCTYPE html>")  # the shipped HTML
    assert english.text == f"True {survey.question['en']}"
    # A per-survey HTML template is autoescaped like the shipped one.
    hostile = Survey(id=survey.id, metric="nps", question={"sv": HOSTILE})
    html = renderer.email(invitation(hostile, locale="sv"), hostile).html
    assert "&lt;script&gt;" in html
    assert "<script>" not in html


def test_undefined_variable_in_a_customer_template(tmp_path: Path) -> None:
    survey = sms_survey()
    write(tmp_path, f"sms/{survey.id}/invitation.txt.j2", "{{ question }} {{ shop_name }}")
    renderer = Renderer(PUBLIC_URL, tmp_path)
    with pytest.raises(UndefinedError, match="shop_name"):
        renderer.sms(invitation(survey), survey)
    with pytest.raises(UndefinedError):
        renderer.outbound_sms(invitation(survey), survey, sender=None, max_segments=2)


def test_sms_templates_cannot_reach_contact_details(tmp_path: Path) -> None:
    survey = sms_survey()
    inv = invitation(survey)
    renderer = Renderer(PUBLIC_URL, tmp_path)
    for reminder in (False, True):
        context = renderer.context(inv, survey, reminder=reminder)
        assert PHONE not in repr(context)
        assert EMAIL not in repr(context)
        assert "401234567" not in repr(context)
    for expression in ("customer.phone", "customer.email", "phone", "to"):
        write(tmp_path, "sms/invitation.txt.j2", "{{ " + expression + " }}")
        with pytest.raises(UndefinedError):
            renderer.sms(inv, survey)


@pytest.mark.parametrize(
    ("locale", "subject", "sms_start"),
    [
        ("fi", "Muistutus: Suosittelisitko meitä?", "Muistutus: Kuinka todennäköisesti"),
        ("sv", "Påminnelse: Skulle du rekommendera oss?", "Påminnelse: Hur troligt"),
        ("en", "Reminder: Would you recommend us?", "Reminder: How likely"),
    ],
)
def test_reminders_say_so(
    program: Program, renderer: Renderer, locale: str, subject: str, sms_start: str
) -> None:
    survey = nps_survey(program)
    inv = invitation(survey, locale=locale)
    first = renderer.email(inv, survey)
    again = renderer.email(inv, survey, reminder=True)
    assert again.subject == subject
    assert first.subject != again.subject
    texts = STRINGS[locale]
    assert again.text.startswith(texts["reminder_intro"] + "\n")
    assert first.text.startswith(texts["intro"] + "\n")
    assert texts["reminder_intro"] in again.html
    assert texts["intro"] not in again.html
    # Otherwise the same email: question, buttons and links.
    assert survey.question[locale] in again.html
    assert parse(first.html).links == parse(again.html).links
    sms_first = renderer.sms(inv, survey)
    sms_again = renderer.sms(inv, survey, reminder=True)
    assert sms_again.text.startswith(sms_start)
    assert sms_again.text.endswith(sms_first.text)
    assert sms_again.segments <= 2


def test_reminder_texts_differ_between_locales() -> None:
    for key in ("reminder_subject", "reminder_intro", "sms_reminder", "sms_answer", "sms_optout"):
        assert len({STRINGS[locale][key] for locale in ("fi", "sv", "en")}) == 3, key
    for locale in ("fi", "sv", "en"):
        assert STRINGS[locale]["reminder_intro"] != STRINGS[locale]["intro"]
        for key in ("sms_reminder", "sms_answer", "sms_optout"):
            assert is_gsm7(STRINGS[locale][key]), (locale, key)
        assert "STOP" in STRINGS[locale]["sms_optout"]


def test_outbound_email(program: Program, renderer: Renderer) -> None:
    survey = nps_survey(program)
    inv = invitation(survey, locale="fi")
    out = renderer.outbound_email(
        inv,
        survey,
        sender=SENDER,
        unsubscribe_mailto="unsubscribe@example.com",
        domain="mail.example.com",
    )
    assert out.invitation_id == str(inv.invitation_id)
    assert (out.sender, out.to, out.subject) == (SENDER, EMAIL, "Suosittelisitko meitä?")
    assert (out.locale, out.survey_id, out.customer_id) == ("fi", survey.id, "cust-1")
    rendered = renderer.email(inv, survey)
    assert (out.text, out.html) == (rendered.text, rendered.html)
    assert f"{PUBLIC_URL}/s/{TOKEN}?score=10" in out.html
    # The headers an HTTP API passes on, exactly as in the MIME message, unfolded.
    assert list(out.headers) == [
        "Date",
        "Message-ID",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Auto-Submitted",
        "X-Kaiku-Invitation",
        "Content-Language",
    ]
    assert out.headers["Message-ID"] == f"<{inv.invitation_id}@mail.example.com>"
    assert out.headers["List-Unsubscribe"] == (
        f"<{PUBLIC_URL}/u/{TOKEN}>, <mailto:unsubscribe@example.com?subject=unsubscribe>"
    )
    assert out.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert out.headers["Auto-Submitted"] == "auto-generated"
    assert out.headers["X-Kaiku-Invitation"] == str(inv.invitation_id)
    assert out.headers["Content-Language"] == "fi"
    parsed = email.message_from_bytes(out.message.as_bytes(), policy=email.policy.SMTP)
    for name, value in out.headers.items():
        assert "\n" not in value
        assert str(parsed[name]) == value, name
    assert parsed["To"] == EMAIL
    assert parsed["From"] == SENDER
    assert parsed["In-Reply-To"] is None


def test_outbound_email_of_a_reminder(program: Program, renderer: Renderer) -> None:
    survey = nps_survey(program)
    inv = invitation(survey, locale="sv")
    kwargs: dict[str, Any] = {"sender": SENDER, "unsubscribe_mailto": None, "domain": "k.example"}
    first = renderer.outbound_email(inv, survey, **kwargs)
    again = renderer.outbound_email(inv, survey, reminder=True, **kwargs)
    original = f"<{inv.invitation_id}@k.example>"
    assert first.headers["Message-ID"] == original
    assert again.headers["Message-ID"] == f"<{inv.invitation_id}.r1@k.example>"
    assert again.headers["In-Reply-To"] == again.headers["References"] == original
    assert "In-Reply-To" not in first.headers
    assert again.subject == "Påminnelse: Skulle du rekommendera oss?"
    parsed = email.message_from_bytes(again.message.as_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == again.subject
    assert parsed["In-Reply-To"] == original
    assert parsed["List-Unsubscribe"] == f"<{PUBLIC_URL}/u/{TOKEN}>"
    plain = parsed.get_body(("plain",))
    assert plain is not None
    assert STRINGS["sv"]["reminder_intro"] in plain.get_content()


def test_outbound_email_needs_an_address(program: Program, renderer: Renderer) -> None:
    survey = nps_survey(program)
    with pytest.raises(ValueError, match="no email address"):
        renderer.outbound_email(
            invitation(survey, email=None),
            survey,
            sender=SENDER,
            unsubscribe_mailto=None,
            domain="kaiku.local",
        )


def test_check_templates(program: Program, tmp_path: Path) -> None:
    renderer = Renderer(PUBLIC_URL)
    for survey in program.surveys:
        assert check_templates(renderer, survey, max_segments=2) == []
    survey = sms_survey().model_copy(update={"reminder": Reminder(after=timedelta(days=3))})
    assert check_templates(renderer, survey, max_segments=2) == []
    problems = check_templates(renderer, survey, max_segments=1)
    # The sample has the longest token: of the six SMS only the English ones fit in one.
    assert [p.split(": the SMS is 2 GSM-7 segments")[0] for p in problems] == [
        "survey 'support-ces', sms, fi",
        "survey 'support-ces', sms, fi, reminder",
        "survey 'support-ces', sms, sv",
        "survey 'support-ces', sms, sv, reminder",
    ]
    assert "(KAIKU_SMS_MAX_SEGMENTS)" in problems[0]
    assert f"{PUBLIC_URL}/s/{'0' * 32} " in problems[0]
    write(tmp_path, "email/invitation.fi.txt.j2", "{{ question }}\n{{ shop.name }}")
    problems = check_templates(Renderer(PUBLIC_URL, tmp_path), survey, max_segments=2)
    assert len(problems) == 2  # Finnish email and its reminder
    assert problems[0].startswith("survey 'support-ces', email, fi: the template fails: ")
    assert f"{tmp_path}/email/invitation.fi.txt.j2:2: 'shop' is undefined" in problems[0]

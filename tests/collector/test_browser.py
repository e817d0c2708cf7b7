"""The survey pages in real headless Chromium (Debian's ``chromium``): answered on a phone,
without JavaScript and by keyboard; the language switch, the score pre-selected by the email's
button (recorded by nothing but the POST), a changed answer, and axe-core's WCAG 2.1 A/AA checks.

The collector runs under uvicorn with its consumers, on the real broker and PostgreSQL; the
invitations reach it as in production, as ``InvitationRequested`` on ``kaiku.invitations``, and
the answers are read back through ``GET /v1/responses``.
A screenshot of each metric's page and its thank-you page lands in ``var/screenshots/``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from services.collector import repository
from services.collector.app import create_app
from services.collector.config import CollectorSettings
from services.collector.models import Invitation
from services.collector.pages import Pages
from services.common import events
from services.common.config import DatabaseSettings, HttpSettings, KafkaSettings, LinkSettings
from services.common.events import Metric
from services.common.kafka import Outgoing, Producer
from services.common.program import Program, Survey, load_program
from services.common.settings import CommonSettings
from services.common.tokens import LinkKeys
from tests.browser import PHONE, LiveServer, axe_violations, screenshot
from tests.conftest import PG_URL
from tests.support import email_invitation, eventually

ROOT = Path(__file__).resolve().parents[2]
LINK_KEYS = "b:browser-test-link-key-0123456789"
STRINGS = Pages().strings
SURVEYS: dict[str, str] = {"nps": "relationship-nps", "csat": "support-csat", "ces": "effort-ces"}
COMMENTS = {
    "fi": "Nopeaa ja ystävällistä palvelua",
    "sv": "Snabb och vänlig service",
    "en": "Quick and friendly service",
}
SCALES: dict[str, tuple[int, int]] = {"nps": (0, 10), "csat": (1, 5), "ces": (1, 7)}
CES = Survey(
    id="effort-ces",
    metric="ces",
    title={"fi": "Kuinka helppoa se oli?", "sv": "Hur enkelt var det?", "en": "How easy was it?"},
    question={
        "fi": "Kuinka helppoa asiasi hoitaminen oli?",
        "sv": "Hur enkelt var det att få ditt ärende löst?",
        "en": "How easy was it to get your issue resolved?",
    },
    followup={
        "fi": "Mikä olisi tehnyt siitä helpompaa?",
        "sv": "Vad hade gjort det enklare?",
        "en": "What would have made it easier?",
    },
)


@dataclass
class Invited:
    invitation_id: uuid.UUID
    token: str
    metric: str
    locale: str


@dataclass
class Collector:
    """The running collector: its URL, and a way to invite and to read what it stored."""

    live: LiveServer
    url: str
    sessions: async_sessionmaker[AsyncSession]
    producer: Producer
    keys: LinkKeys
    api_token: str

    def invite(self, metric: Metric, locale: str = "fi", *, expired: bool = False) -> Invited:
        """Publish an invitation as the trigger does and wait until the collector has it."""
        sent = datetime.now(UTC) - (timedelta(days=15) if expired else timedelta(0))
        message = email_invitation(
            f"cust-{uuid.uuid4().hex[:8]}",
            survey_id=SURVEYS[metric],
            metric=metric,
            locale=locale,
            send_at=sent,
        ).model_copy(update={"token": self.keys.issue()})
        self.live.run(
            self.producer.publish([Outgoing(events.INVITATIONS, message.customer.id, message)])
        )

        async def stored() -> Invitation | None:
            async with self.sessions() as session:
                return await repository.invitation_by_token(session, message.token)

        found: Invitation = self.live.run(
            eventually(stored, what="the invitation in the collector's database")
        )
        return Invited(found.invitation_id, found.token, metric, locale)

    def answer(self, invited: Invited) -> dict[str, Any] | None:
        """The answer to an invitation as ``GET /v1/responses`` lists it (bots included)."""
        listed = httpx.get(
            f"{self.url}/v1/responses",
            params={"survey": SURVEYS[invited.metric], "suspected_bot": "include", "limit": 500},
            headers={"Authorization": f"Bearer {self.api_token}"},
            timeout=10,
        )
        assert listed.status_code == 200, listed.text
        items = listed.json()["items"]
        found = [i for i in items if i["invitation_id"] == str(invited.invitation_id)]
        assert len(found) <= 1, f"{len(found)} answers listed for one invitation"
        return found[0] if found else None

    def link(self, invited: Invited, query: str = "") -> str:
        return f"{self.url}/s/{invited.token}{query}"


def program_with_ces() -> Program:
    program = load_program(ROOT / "deploy/local/program.yaml")
    return program.model_copy(update={"surveys": [*program.surveys, CES]})


async def _schema(statement: str) -> None:
    engine = create_async_engine(PG_URL)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def collector(broker: str) -> Iterator[Collector]:
    suffix = uuid.uuid4().hex[:12]
    kafka = KafkaSettings(
        bootstrap_servers=broker,
        topic_prefix=f"test-{suffix}.",
        enable_idempotence=False,
        partitions=1,
        poll_timeout_ms=50,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    schema = f"t_{suffix}"
    api_token = f"browser-{suffix}"
    settings = CommonSettings(
        kafka=kafka,
        database=DatabaseSettings(url=PG_URL, schema_name=schema),
        http=HttpSettings(api_token=SecretStr(api_token)),
        links=LinkSettings(link_keys=SecretStr(LINK_KEYS)),
    )
    with LiveServer() as live:
        try:
            live.run(_schema(f'CREATE SCHEMA "{schema}"'))
        except Exception as exc:
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL} (KAIKU_TEST_DATABASE_URL): {exc}")
        try:
            app = create_app(settings, CollectorSettings(bot_min_seconds=0), program_with_ces())
            url = live.serve(app)
            producer = Producer(kafka)
            live.run(producer.start())
            try:
                yield Collector(
                    live,
                    url,
                    app.state.runtime.sessions,
                    producer,
                    LinkKeys.parse(LINK_KEYS),
                    api_token,
                )
            finally:
                live.run(producer.stop())
        finally:
            live.stop()
            live.run(_schema(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def phone(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(**PHONE)
    yield context.new_page()
    context.close()


@pytest.fixture
def desktop(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    yield context
    context.close()


def score_label(page: Page, score: int) -> Any:
    return page.locator(f"label[for='score-{score}']")


def checked(page: Page) -> list[str]:
    values = page.locator("input[name=score]:checked").evaluate_all("els => els.map(e => e.value)")
    return [str(v) for v in values]


def expect_thanks(page: Page, invited: Invited, locale: str) -> None:
    expect(page).to_have_url(re.compile(rf"/s/{invited.token}/thanks\?lang={locale}$"))
    expect(page.locator("html")).to_have_attribute("lang", locale)
    expect(page.get_by_role("heading", level=1)).to_have_text(STRINGS[locale]["thanks_title"])


@pytest.mark.parametrize(
    ("metric", "locale", "score"), [("nps", "fi", 9), ("csat", "sv", 2), ("ces", "en", 6)]
)
def test_answering_on_a_phone(
    collector: Collector, phone: Page, metric: Metric, locale: str, score: int
) -> None:
    invited = collector.invite(metric, locale)
    phone.goto(collector.link(invited))
    expect(phone.locator("html")).to_have_attribute("lang", locale)
    low, high = SCALES[metric]
    radios = phone.locator("input[name=score]")
    expect(radios).to_have_count(high - low + 1)
    assert [radios.nth(i).get_attribute("value") for i in (0, -1)] == [str(low), str(high)]
    expect(phone.locator("label[for=comment]")).to_contain_text(STRINGS[locale]["optional"])
    # Mobile-first: the scale fits the phone's width, nothing scrolls sideways.
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390

    score_label(phone, score).tap()
    assert checked(phone) == [str(score)]
    phone.get_by_role("textbox").tap()
    phone.keyboard.type(COMMENTS[locale])
    screenshot(phone, f"survey-{metric}")
    phone.get_by_role("button", name=STRINGS[locale]["send"]).tap()

    expect_thanks(phone, invited, locale)
    expect(phone.get_by_text(f"{score}/{high}")).to_be_visible()
    screenshot(phone, f"thanks-{metric}")
    stored = collector.answer(invited)
    assert stored is not None
    assert (stored["score"], stored["comment"], stored["metric"], stored["locale"]) == (
        score,
        COMMENTS[locale],
        metric,
        locale,
    )
    assert (stored["suspected_bot"], stored["revision"]) == (False, 1)


def test_answering_without_javascript(collector: Collector, browser: Browser) -> None:
    context = browser.new_context(**PHONE, java_script_enabled=False)
    try:
        page = context.new_page()
        invited = collector.invite("csat", "fi")
        page.goto(collector.link(invited))
        score_label(page, 4).click()
        page.get_by_role("textbox").fill("Toimii ilman JavaScriptiä")
        page.get_by_role("button", name=STRINGS["fi"]["send"]).click()
        expect_thanks(page, invited, "fi")
    finally:
        context.close()
    stored = collector.answer(invited)
    assert stored is not None
    assert (stored["score"], stored["comment"], stored["suspected_bot"]) == (
        4,
        "Toimii ilman JavaScriptiä",
        False,
    )


def outline(page: Page, selector: str) -> tuple[str, float]:
    style = page.locator(selector).evaluate(
        "e => { const s = getComputedStyle(e); return [s.outlineStyle, s.outlineWidth]; }"
    )
    return style[0], float(style[1].removesuffix("px"))


def test_answering_by_keyboard(collector: Collector, desktop: BrowserContext) -> None:
    page = desktop.new_page()
    invited = collector.invite("ces", "sv")
    page.goto(collector.link(invited))
    active = "document.activeElement"
    # Tab past the language links to the score group: focus lands on its first radio.
    for _ in range(6):
        page.keyboard.press("Tab")
        if page.evaluate(f"{active}.name") == "score":
            break
    assert page.evaluate(f"{active}.id") == "score-1"
    style, width = outline(page, "label[for='score-1']")
    assert style != "none" and width >= 2, "the focused score shows no focus outline"

    for _ in range(4):
        page.keyboard.press("ArrowRight")
    assert checked(page) == ["5"]
    assert page.evaluate(f"{active}.id") == "score-5"
    style, width = outline(page, "label[for='score-5']")
    assert style != "none" and width >= 2, "the chosen score shows no focus outline"
    assert outline(page, "label[for='score-1']")[0] == "none"

    page.keyboard.press("Tab")
    assert page.evaluate(f"{active}.id") == "comment"
    page.keyboard.type("Med tangentbordet")
    page.keyboard.press("Tab")
    assert page.evaluate(f"{active}.type") == "submit"
    style, width = outline(page, "button[type=submit]")
    assert style != "none" and width >= 2, "the send button shows no focus outline"
    page.keyboard.press("Enter")

    expect_thanks(page, invited, "sv")
    stored = collector.answer(invited)
    assert stored is not None
    assert (stored["score"], stored["comment"], stored["suspected_bot"]) == (
        5,
        "Med tangentbordet",
        False,
    )


def test_language_switch_keeps_the_score_from_the_email_and_a_get_records_nothing(
    collector: Collector, desktop: BrowserContext
) -> None:
    page = desktop.new_page()
    invited = collector.invite("nps", "fi")
    page.goto(collector.link(invited, "?score=8"))  # a score button in the email
    expect(page.locator("html")).to_have_attribute("lang", "fi")
    assert checked(page) == ["8"]
    for locale in ("sv", "en"):
        page.get_by_role("link", name=STRINGS[locale]["lang_name"]).click()
        expect(page.locator("html")).to_have_attribute("lang", locale)
        expect(page.get_by_role("link", name=STRINGS[locale]["lang_name"])).to_have_attribute(
            "aria-current", "true"
        )
        expect(page.get_by_role("button", name=STRINGS[locale]["send"])).to_be_visible()
        assert checked(page) == ["8"]
    assert collector.answer(invited) is None, "opening the pages recorded an answer"

    page.get_by_role("button", name=STRINGS["en"]["send"]).click()
    expect_thanks(page, invited, "en")
    stored = collector.answer(invited)
    assert stored is not None
    assert (stored["score"], stored["comment"], stored["suspected_bot"]) == (8, None, False)


def test_a_changed_answer_replaces_the_first(collector: Collector, desktop: BrowserContext) -> None:
    page = desktop.new_page()
    invited = collector.invite("nps", "en")
    page.goto(collector.link(invited))
    score_label(page, 9).click()
    page.get_by_role("textbox").fill("Great")
    page.get_by_role("button", name="Send").click()
    expect_thanks(page, invited, "en")
    first = collector.answer(invited)
    assert first is not None and (first["score"], first["revision"]) == (9, 1)

    page.get_by_role("link", name=STRINGS["en"]["change_answer"]).click()
    assert checked(page) == ["9"]
    expect(page.get_by_role("textbox")).to_have_value("Great")
    score_label(page, 4).click()
    page.get_by_role("textbox").fill("Actually, the parcel was late")
    page.get_by_role("button", name="Send").click()
    expect_thanks(page, invited, "en")
    expect(page.get_by_text("4/10")).to_be_visible()

    last = collector.answer(invited)
    assert last is not None
    assert last["response_id"] == first["response_id"]  # still one answer: the last one counts
    assert (last["score"], last["comment"], last["revision"], last["suspected_bot"]) == (
        4,
        "Actually, the parcel was late",
        2,
        False,
    )


def test_pages_pass_axe_wcag_21_aa_and_targets_are_44px(collector: Collector, phone: Page) -> None:
    found: list[str] = []

    def check(name: str) -> None:
        report = axe_violations(phone)
        if report:
            found.append(f"{name}: {report}")
        small = phone.evaluate(
            """() => [...document.querySelectorAll('a[href], button, .opt label, textarea')]
                .filter(e => e.offsetParent !== null)
                .map(e => [e.outerHTML.slice(0, 80), e.getBoundingClientRect()])
                .filter(([, r]) => r.width < 44 || r.height < 44)
                .map(([html, r]) => `${html} (${r.width}x${r.height})`)"""
        )
        if small:
            found.append(f"{name}: targets smaller than 44x44 px: {small}")

    for metric, locale in (("nps", "fi"), ("csat", "sv"), ("ces", "en")):
        invited = collector.invite(metric, locale)  # type: ignore[arg-type]
        phone.goto(collector.link(invited, "?score=3"))
        check(f"survey page ({metric})")
        phone.set_viewport_size({"width": 320, "height": 640})  # reflow (WCAG 1.4.10)
        width = phone.evaluate("document.documentElement.scrollWidth")
        if width > 320:
            found.append(f"survey page ({metric}) scrolls sideways at 320 px: {width} px wide")
        check(f"survey page ({metric}) at 320 px")
        phone.set_viewport_size(PHONE["viewport"])
    phone.goto(collector.link(invited))
    phone.get_by_role("button", name="Send").click()  # neither score nor comment
    expect(phone.get_by_role("alert")).to_have_text(STRINGS["en"]["error_empty"])
    check("survey page with an error")
    score_label(phone, 2).click()
    phone.get_by_role("button", name="Send").click()
    expect_thanks(phone, invited, "en")
    check("thank-you page")

    phone.goto(f"{collector.url}/u/{invited.token}")
    check("unsubscribe page")
    phone.get_by_role("button", name=STRINGS["en"]["unsubscribe_button"]).click()
    expect(phone.get_by_role("heading", level=1)).to_have_text(STRINGS["en"]["unsubscribed_title"])
    check("unsubscribed page")

    expired = collector.invite("nps", "sv", expired=True)
    for path, status, name in (
        ("/s/not-a-token", 400, "damaged link"),
        (f"/s/{collector.keys.issue()}", 404, "unknown link"),
        (f"/s/{expired.token}", 410, "expired link"),
    ):
        response = phone.goto(collector.url + path)
        assert response is not None and response.status == status, path
        check(f"{name} page ({status})")
    screenshot(phone, "expired")
    assert not found, "\n\n".join(found)

"""The dashboard in real headless Chromium: sign-in, the scores with their intervals, the
detractor queue (a comment with markup shown as text, never run), suspected bots, the live update
over server-sent events, axe-core's WCAG 2.1 A/AA checks, and a screenshot in var/screenshots/.
"""

from __future__ import annotations

import httpx
from playwright.sync_api import Browser, Page, expect

from tests.browser import axe_violations, screenshot
from tests.collector.test_browser import Collector, collector  # noqa: F401  (the fixture)

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)> huono palvelu'


def answer(collector: Collector, score: int, comment: str = "") -> None:  # noqa: F811
    invited = collector.invite("nps", "fi")
    posted = httpx.post(
        collector.link(invited),
        data={"score": str(score), "comment": comment},
        follow_redirects=False,
        timeout=10,
    )
    assert posted.status_code == 303, posted.text


def sign_in(page: Page, collector: Collector) -> None:  # noqa: F811
    page.goto(f"{collector.url}/dashboard")
    expect(page).to_have_url(f"{collector.url}/dashboard/login")  # redirected: no session
    page.get_by_label("API token").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.get_by_label("API token").fill(collector.api_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{collector.url}/dashboard")


def test_dashboard_without_a_session_is_refused(collector: Collector) -> None:  # noqa: F811
    plain = httpx.get(f"{collector.url}/dashboard", timeout=10)
    assert plain.status_code == 401 and plain.json()["error"]["code"] == "unauthorized"
    forged = httpx.get(
        f"{collector.url}/dashboard",
        cookies={"kaiku_dashboard": "9999999999.0000"},
        timeout=10,
    )
    assert forged.status_code == 401
    events = httpx.get(f"{collector.url}/dashboard/events", timeout=10)
    assert events.status_code == 401
    bearer = httpx.get(
        f"{collector.url}/dashboard",
        headers={"Authorization": f"Bearer {collector.api_token}"},
        timeout=10,
    )
    assert bearer.status_code == 200 and "Detractor queue" in bearer.text


def test_dashboard_shows_scores_queue_and_updates_live(
    collector: Collector,  # noqa: F811
    browser: Browser,
) -> None:
    answer(collector, 10)
    answer(collector, 9)
    answer(collector, 3, XSS)
    dialogs: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        sign_in(page, collector)
        card = page.locator("section.card", has=page.locator("#s-relationship-nps"))
        # 2 promoters, 1 detractor of 3: NPS 33.3, with its interval and the few-answers flag.
        expect(card.locator(".big")).to_have_text("33.3")
        expect(card.locator(".ci")).to_contain_text("n = 3")
        expect(card.locator(".ci")).to_contain_text("few answers")
        expect(card.locator("svg.chart")).to_be_visible()
        # The detractor is in the queue, its comment shown as the text it is.
        queue = page.locator("table[aria-labelledby=queue] td.comment")
        expect(queue.first).to_have_text(XSS)
        assert page.locator("table[aria-labelledby=queue] img").count() == 0
        assert dialogs == [], f"a comment's markup ran: {dialogs}"
        assert axe_violations(page) == ""
        screenshot(page, "dashboard")

        # Live: another answer arrives; the page updates itself (no reload: the marker stays).
        page.evaluate("window.__kaikuMarker = 1")
        answer(collector, 0, "kamala kokemus")
        expect(card.locator(".ci")).to_contain_text("n = 4", timeout=15_000)
        expect(card.locator(".big")).to_have_text("0.0")
        expect(page.locator("table[aria-labelledby=queue] td.comment").first).to_have_text(
            "kamala kokemus"
        )
        assert page.evaluate("window.__kaikuMarker") == 1, "the page reloaded instead"
        assert dialogs == []
    finally:
        context.close()

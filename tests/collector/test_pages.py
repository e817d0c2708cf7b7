"""The collector's survey pages: structure, accessibility, locales and escaping."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from services.collector.pages import KINDS, SUPPORTED, TEMPLATE_DIR, Pages, pick_locale
from services.common.program import Program, Survey, load_program

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "aBCDEFGHIJKLMNOPQRSTUVWXYZ012"
ACTION = f"/s/{TOKEN}"


VOID = {"input", "meta", "br", "img", "link", "hr"}


class Tags(HTMLParser):
    """Every element: its tag, attributes and (whitespace-normalized) text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None], list[str]]] = []
        self._open: list[tuple[str, list[str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        text: list[str] = []
        self.elements.append((tag, dict(attrs), text))
        if tag not in VOID:
            self._open.append((tag, text))

    def handle_endtag(self, tag: str) -> None:
        if any(t == tag for t, _ in self._open):
            while self._open and self._open.pop()[0] != tag:
                pass

    def handle_data(self, data: str) -> None:
        for _, text in self._open:
            text.append(data)

    def _matching(
        self, tag: str, attrs: dict[str, str | None]
    ) -> list[tuple[dict[str, str | None], str]]:
        return [
            (a, " ".join("".join(text).split()))
            for t, a, text in self.elements
            if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())
        ]

    def find(self, tag: str, **attrs: str | None) -> list[dict[str, str | None]]:
        return [a for a, _ in self._matching(tag, attrs)]

    def text(self, tag: str, **attrs: str | None) -> list[str]:
        return [text for _, text in self._matching(tag, attrs)]


@pytest.fixture(scope="module")
def program() -> Program:
    return load_program(ROOT / "deploy/local/program.yaml")


@pytest.fixture(scope="module")
def pages() -> Pages:
    return Pages()


@pytest.fixture(scope="module")
def ces() -> Survey:
    return Survey(
        id="effort-ces",
        metric="ces",
        question={
            "en": "How easy was it to get your issue resolved?",
            "fi": "Kuinka helppoa asiasi hoitaminen oli?",
            "sv": "Hur enkelt var det att få ditt ärende löst?",
        },
    )


def surveys(program: Program, ces: Survey) -> dict[str, Survey]:
    return {
        "nps": program.survey("relationship-nps"),
        "csat": program.survey("support-csat"),
        "ces": ces,
    }


def render(pages: Pages, survey: Survey, **kwargs: object) -> str:
    args: dict[str, object] = {
        "survey": survey,
        "token": TOKEN,
        "locale": "en",
        "selected": None,
        "action_url": ACTION,
    }
    args.update(kwargs)
    return pages.survey(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("metric", "values"),
    [("nps", list(range(11))), ("csat", [1, 2, 3, 4, 5]), ("ces", [1, 2, 3, 4, 5, 6, 7])],
)
def test_radios_match_the_scale(
    pages: Pages, program: Program, ces: Survey, metric: str, values: list[int]
) -> None:
    doc = Tags(render(pages, surveys(program, ces)[metric]))
    radios = doc.find("input", type="radio")
    assert [r["value"] for r in radios] == [str(v) for v in values]
    assert all(r["name"] == "score" for r in radios)
    assert [r["id"] for r in radios] == [f"score-{v}" for v in values]
    assert not any("checked" in r for r in radios)
    assert doc.find("div", class_=f"scale scale-{len(values)}")


@pytest.mark.parametrize("metric", ["nps", "csat", "ces"])
def test_every_radio_has_a_label_and_the_ends_are_described(
    pages: Pages, program: Program, ces: Survey, metric: str
) -> None:
    html = render(pages, surveys(program, ces)[metric])
    doc = Tags(html)
    radios = doc.find("input", type="radio")
    label_for = {a["for"] for a in doc.find("label")}
    assert all(r["id"] in label_for for r in radios)
    assert radios[0]["aria-describedby"] == "scale-low"
    assert radios[-1]["aria-describedby"] == "scale-high"
    assert doc.find("span", id="scale-low") and doc.find("span", id="scale-high")
    ends = {
        "nps": ("Not at all likely", "Extremely likely"),
        "csat": ("Very dissatisfied", "Very satisfied"),
        "ces": ("Very difficult", "Very easy"),
    }[metric]
    assert all(end in html for end in ends)


@pytest.mark.parametrize(("metric", "selected"), [("nps", 0), ("nps", 10), ("csat", 4), ("ces", 7)])
def test_selected_score_is_checked(
    pages: Pages, program: Program, ces: Survey, metric: str, selected: int
) -> None:
    doc = Tags(render(pages, surveys(program, ces)[metric], selected=selected))
    checked = [r["value"] for r in doc.find("input", type="radio") if "checked" in r]
    assert checked == [str(selected)]


def test_out_of_scale_selection_checks_nothing(pages: Pages, ces: Survey) -> None:
    doc = Tags(render(pages, ces, selected=0))
    assert not [r for r in doc.find("input", type="radio") if "checked" in r]
    assert "score=0" not in render(pages, ces, selected=0)


@pytest.mark.parametrize("locale", SUPPORTED)
@pytest.mark.parametrize("survey_id", ["relationship-nps", "support-csat"])
def test_question_and_lang_per_locale(
    pages: Pages, program: Program, locale: str, survey_id: str
) -> None:
    survey = program.survey(survey_id)
    doc = Tags(render(pages, survey, locale=locale))
    assert doc.find("html")[0]["lang"] == locale
    assert doc.text("h1") == [survey.question[locale]]
    assert doc.text("legend") == [survey.question[locale]]
    assert survey.followup is not None
    assert survey.followup[locale] in doc.text("label", for_="comment")[0]
    assert doc.find("input", type="hidden", name="locale", value=locale)
    assert doc.find("button", type="submit")
    assert doc.text("button") == [pages.strings[locale]["send"]]
    assert doc.find("h1", id="question")[0].get("lang") is None


@pytest.mark.parametrize("locale", SUPPORTED)
def test_ces_survey_in_each_locale(pages: Pages, ces: Survey, locale: str) -> None:
    doc = Tags(render(pages, ces, locale=locale))
    assert doc.text("h1") == [ces.question[locale]]
    # No follow-up question in the survey: the generic one, localized.
    assert pages.strings[locale]["followup_default"] in doc.text("label", for_="comment")[0]
    assert pages.strings[locale]["scale_low_ces"] in doc.text("span")


def test_missing_question_locale_falls_back_to_english_marked_with_lang(pages: Pages) -> None:
    survey = Survey(id="en-only", metric="csat", question={"en": "How was it?"})
    doc = Tags(render(pages, survey, locale="fi"))
    assert doc.find("html")[0]["lang"] == "fi"
    assert doc.text("h1") == ["How was it?"]
    assert doc.find("h1")[0]["lang"] == "en"
    assert "Haluatko kertoa meille vielä jotain?" in doc.text("label", for_="comment")[0]


def test_unsupported_locale_renders_english(pages: Pages, ces: Survey) -> None:
    assert Tags(render(pages, ces, locale="de")).find("html")[0]["lang"] == "en"


def test_page_structure(pages: Pages, program: Program) -> None:
    html = render(pages, program.survey("relationship-nps"), selected=3, comment="ok")
    doc = Tags(html)
    assert html.startswith("<!doctype html>")
    assert doc.find("meta", name="viewport")
    assert len(doc.find("main")) == 1
    assert len(doc.find("h1")) == 1
    assert len(doc.find("fieldset")) == 1 and len(doc.find("legend")) == 1
    form = doc.find("form")[0]
    assert form["method"] == "post" and form["action"] == ACTION
    textarea = doc.find("textarea")[0]
    assert textarea["id"] == "comment" and textarea["name"] == "comment"
    assert textarea["maxlength"] == "5000"
    assert doc.find("label", for_="comment")
    assert doc.text("textarea") == ["ok"]
    assert not doc.find("script")
    assert "http://" not in html and "https://" not in html  # no external assets
    assert "<style>" in html
    assert "input:checked + label" in html and "input:focus-visible + label" in html
    assert "display:none" not in html.split("<style>")[1].split("</style>")[0]
    assert not doc.find("div", role="alert")


def test_honeypot_link(pages: Pages, ces: Survey) -> None:
    html = render(pages, ces)
    assert (
        f'<a href="{ACTION}/trap" tabindex="-1" aria-hidden="true" style="display:none" '
        'rel="nofollow">.</a>'
    ) in html


def test_comment_is_escaped(pages: Pages, ces: Survey) -> None:
    html = render(pages, ces, comment='</textarea><script>alert("x")</script>')
    assert "<script>" not in html
    assert "&lt;/textarea&gt;&lt;script&gt;" in html
    assert Tags(html).text("textarea") == ['</textarea><script>alert("x")</script>']


def test_question_and_error_are_escaped(pages: Pages) -> None:
    survey = Survey(id="x", metric="csat", question={"en": "<b>Bold</b>?"})
    html = render(pages, survey, error="<i>bad</i>")
    assert "<b>" not in html and "&lt;b&gt;Bold&lt;/b&gt;?" in html
    assert "<i>" not in html


@pytest.mark.parametrize("locale", SUPPORTED)
@pytest.mark.parametrize("error", ["score", "empty"])
def test_error_keys_are_localized_in_an_alert(
    pages: Pages, ces: Survey, locale: str, error: str
) -> None:
    html = render(pages, ces, locale=locale, error=error)
    doc = Tags(html)
    alerts = doc.find("div", role="alert")
    assert len(alerts) == 1
    assert doc.text("div", role="alert") == [pages.strings[locale][f"error_{error}"]]
    assert html.index('role="alert"') < html.index("<form")
    assert doc.text("title")[0].startswith(pages.strings[locale]["error_prefix"] + ":")


def test_error_text_is_shown_as_given(pages: Pages, ces: Survey) -> None:
    doc = Tags(render(pages, ces, error="Something specific"))
    assert doc.text("div", role="alert") == ["Something specific"]


@pytest.mark.parametrize("locale", SUPPORTED)
def test_language_switch_carries_the_score(pages: Pages, ces: Survey, locale: str) -> None:
    html = render(pages, ces, locale=locale, selected=5)
    switch = [a for a in Tags(html).find("a") if a.get("hreflang")]
    assert [a["href"] for a in switch] == [f"?lang={code}&score=5" for code in SUPPORTED]
    assert [a["lang"] for a in switch] == list(SUPPORTED)
    assert [a["hreflang"] for a in switch] == list(SUPPORTED)
    assert [a.get("aria-current") for a in switch] == [
        "true" if code == locale else None for code in SUPPORTED
    ]
    assert "?lang=fi&amp;score=5" in html
    assert ">Suomi<" in html and ">Svenska<" in html and ">English<" in html


def test_language_switch_without_score(pages: Pages, ces: Survey) -> None:
    switch = [a for a in Tags(render(pages, ces)).find("a") if a.get("hreflang")]
    assert [a["href"] for a in switch] == [f"?lang={code}" for code in SUPPORTED]


def test_all_strings_exist_in_all_locales(pages: Pages) -> None:
    raw = yaml.safe_load((TEMPLATE_DIR / "strings.yaml").read_text(encoding="utf-8"))
    assert set(raw) == set(SUPPORTED)
    keys = set(raw["en"])
    for locale in SUPPORTED:
        assert set(raw[locale]) == keys, locale
        assert all(isinstance(v, str) and v.strip() for v in raw[locale].values()), locale
    assert pages.strings == raw
    for metric in ("nps", "csat", "ces"):
        assert {f"scale_low_{metric}", f"scale_high_{metric}"} <= keys
    for kind in KINDS:
        assert {f"{kind}_title", f"{kind}_text"} <= keys


def test_texts_differ_between_locales(pages: Pages) -> None:
    fi, sv, en = (pages.strings[c] for c in ("fi", "sv", "en"))
    assert fi["send"] == "Lähetä" and sv["send"] == "Skicka" and en["send"] == "Send"
    for key in ("thanks_title", "expired_text", "not_found_text", "error_empty"):
        assert len({fi[key], sv[key], en[key]}) == 3, key


@pytest.mark.parametrize("locale", SUPPORTED)
@pytest.mark.parametrize("kind", KINDS)
def test_message_pages(pages: Pages, locale: str, kind: str) -> None:
    doc = Tags(pages.message(locale=locale, kind=kind))
    strings = pages.strings[locale]
    assert doc.find("html")[0]["lang"] == locale
    assert len(doc.find("main")) == 1
    assert doc.text("h1") == [" ".join(strings[f"{kind}_title"].split())]
    assert doc.text("title") == doc.text("h1")
    assert " ".join(strings[f"{kind}_text"].split()) in doc.text("p")


def test_message_kinds_differ(pages: Pages) -> None:
    assert len({pages.message(locale="en", kind=k) for k in KINDS}) == len(KINDS)


def test_unknown_message_kind(pages: Pages) -> None:
    with pytest.raises(ValueError, match="unknown page kind"):
        pages.message(locale="en", kind="nope")


@pytest.mark.parametrize("locale", SUPPORTED)
def test_thanks_page(pages: Pages, program: Program, locale: str) -> None:
    html = pages.thanks(
        survey=program.survey("relationship-nps"), token=TOKEN, locale=locale, score=9
    )
    doc = Tags(html)
    strings = pages.strings[locale]
    assert doc.find("html")[0]["lang"] == locale
    assert doc.text("h1") == [strings["thanks_title"]]
    assert doc.find("a", href=f"/s/{TOKEN}?lang={locale}")
    assert strings["change_answer"] in doc.text("a")
    assert strings["change_note"] in doc.text("p")
    assert "9/10" in html


def test_thanks_without_score(pages: Pages, ces: Survey) -> None:
    html = pages.thanks(survey=ces, token=TOKEN, locale="sv", score=None)
    assert "Tack för ditt svar!" in html
    assert "None" not in html and "Ditt betyg" not in html


@pytest.mark.parametrize(
    ("requested", "fallback", "expected"),
    [
        ("fi", "en", "fi"),
        ("fi-FI", "en", "fi"),
        ("sv_SE", "en", "sv"),
        ("SV-fi", "en", "sv"),
        (" EN-gb ", "fi", "en"),
        ("de", "fi", "fi"),
        ("de-DE", "sv", "sv"),
        (None, "sv", "sv"),
        ("", "fi", "fi"),
        ("de", "de", "en"),
        (None, "fr-FR", "en"),
        ("xx", "fi-FI", "fi"),
        ("de-DE,sv;q=0.8,en;q=0.9", "fi", "en"),
        ("de-DE,sv-SE;q=0.9,en;q=0.5", "fi", "sv"),
        ("fi;q=0,de", "sv", "sv"),
    ],
)
def test_pick_locale(requested: str | None, fallback: str, expected: str) -> None:
    assert pick_locale(requested, fallback) == expected


def test_override_directory_is_searched_first(tmp_path: Path, ces: Survey) -> None:
    (tmp_path / "message.html.j2").write_text(
        '{% extends "base.html.j2" %}{% block title %}{{ title }}{% endblock %}'
        "{% block main %}<h1>Custom: {{ title }}</h1>{% endblock %}",
        encoding="utf-8",
    )
    (tmp_path / "strings.yaml").write_text("en:\n  send: Submit\n", encoding="utf-8")
    custom = Pages(tmp_path)
    assert "<h1>Custom: This link has expired</h1>" in custom.message(locale="en", kind="expired")
    assert ">Submit<" in render(custom, ces)
    assert ">Skicka<" in render(custom, ces, locale="sv")


def test_override_strings_must_keep_every_locale_complete(tmp_path: Path) -> None:
    (tmp_path / "strings.yaml").write_text("en:\n  extra: Extra\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing"):
        Pages(tmp_path)


def test_missing_override_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Pages(tmp_path / "nope")

"""The collector's server-rendered pages: the survey, the thank-you page and notices.

Rendering only; the routes live in ``api.py``. Pages are plain HTML that work without
JavaScript (the survey is a form POSTed to ``action_url``), with all UI texts in
``templates/strings.yaml`` in Finnish, Swedish and English.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from jinja2 import BaseLoader, ChoiceLoader, FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from services.common.program import Survey

SUPPORTED: tuple[str, ...] = ("fi", "sv", "en")
KINDS: tuple[str, ...] = ("not_found", "expired", "tampered", "invalid")
TEMPLATE_DIR = Path(__file__).parent / "templates"
STRINGS_FILE = "strings.yaml"

# ``error`` values that name a localized text; anything else is shown as given.
_ERRORS = {"score": "error_score", "empty": "error_empty"}


def _base_tag(tag: str) -> str:
    """The base language of a tag: "fi-FI", "sv_SE", " EN " -> "fi", "sv", "en"."""
    return tag.strip().replace("_", "-").split("-", 1)[0].lower()


def _ranked(value: str) -> list[str]:
    """The language tags of one tag or an Accept-Language header, best first."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate(value[:500].split(",")):
        tag, _, params = part.partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, number = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(number)
                except ValueError:
                    quality = 0.0
        if quality > 0 and tag.strip():
            ranked.append((-quality, index, _base_tag(tag)))
    return [tag for _, _, tag in sorted(ranked)]


def pick_locale(requested: str | None, fallback: str) -> str:
    """The supported locale for ``requested`` ("fi-FI" -> "fi"), else ``fallback``, else "en".

    ``requested`` may also be an Accept-Language header ("sv-SE,sv;q=0.9,en;q=0.8").
    """
    for tag in _ranked(requested or ""):
        if tag in SUPPORTED:
            return tag
    fallback_tag = _base_tag(fallback or "")
    return fallback_tag if fallback_tag in SUPPORTED else "en"


def _read_strings(path: Path) -> dict[str, dict[str, str]]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the strings must be a mapping of locale to texts")
    strings: dict[str, dict[str, str]] = {}
    for locale, texts in raw.items():
        if locale not in SUPPORTED:
            raise ValueError(f"{path}: unknown locale {locale!r} (supported: fi, sv, en)")
        if not isinstance(texts, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in texts.items()
        ):
            raise ValueError(f"{path}: {locale}: the texts must map names to strings")
        strings[locale] = dict(texts)
    return strings


def load_strings(override_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """The shipped UI strings, with those of ``override_dir/strings.yaml`` (if any) on top.

    Raises ValueError unless every locale has exactly the same keys.
    """
    strings = _read_strings(TEMPLATE_DIR / STRINGS_FILE)
    if override_dir is not None and (override_dir / STRINGS_FILE).is_file():
        for locale, texts in _read_strings(override_dir / STRINGS_FILE).items():
            strings.setdefault(locale, {}).update(texts)
    keys = set().union(*(strings.get(locale, {}).keys() for locale in SUPPORTED))
    for locale in SUPPORTED:
        missing = sorted(keys - strings.get(locale, {}).keys())
        if missing:
            raise ValueError(f"UI strings missing in {locale!r}: {', '.join(missing)}")
    return strings


def _localized(
    texts: Mapping[str, str] | None, locale: str, *, any_locale: bool
) -> tuple[str, str] | None:
    """(text, its locale) in ``locale``, else English, else (if ``any_locale``) any locale."""
    if not texts:
        return None
    for code in (locale, "en"):
        if texts.get(code):
            return texts[code], code
    if any_locale:
        code = next(iter(texts))
        return texts[code], code
    return None


class Pages:
    """Renders the collector's pages; templates in ``template_dir`` override the shipped ones."""

    def __init__(self, template_dir: Path | None = None) -> None:
        loaders: list[BaseLoader] = []
        if template_dir is not None:
            template_dir = Path(template_dir)
            if not template_dir.is_dir():
                raise ValueError(f"template directory {template_dir} does not exist")
            loaders.append(FileSystemLoader(str(template_dir)))
        loaders.append(FileSystemLoader(str(TEMPLATE_DIR)))
        self._env = SandboxedEnvironment(
            loader=ChoiceLoader(loaders),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.strings: dict[str, dict[str, str]] = load_strings(template_dir)

    def _render(self, name: str, locale: str, **context: Any) -> str:
        return self._env.get_template(name).render(lang=locale, t=self.strings[locale], **context)

    def _languages(self, locale: str, score: int | None = None) -> list[dict[str, Any]]:
        extra = f"&score={score}" if score is not None else ""
        return [
            {
                "code": code,
                "name": self.strings[code]["lang_name"],
                "href": f"?lang={code}{extra}",
                "current": code == locale,
            }
            for code in SUPPORTED
        ]

    def survey(
        self,
        *,
        survey: Survey,
        token: str,
        locale: str,
        selected: int | None,
        comment: str = "",
        error: str | None = None,
        action_url: str,
    ) -> str:
        """The survey form. ``error`` is "score" or "empty" (localized here) or a text to show."""
        locale = pick_locale(locale, "en")
        t = self.strings[locale]
        low, high = survey.scale
        question, question_lang = _localized(survey.question, locale, any_locale=True) or (
            "",
            locale,
        )
        followup, followup_lang = _localized(survey.followup, locale, any_locale=False) or (
            t["followup_default"],
            locale,
        )
        title = _localized(survey.title, locale, any_locale=False)
        if selected is not None and not low <= selected <= high:
            selected = None
        return self._render(
            "survey.html.j2",
            locale,
            page_title=title[0] if title else question,
            question=question,
            question_lang=question_lang,
            followup=followup,
            followup_lang=followup_lang,
            scores=list(range(low, high + 1)),
            selected=selected,
            low_label=t[f"scale_low_{survey.metric}"],
            high_label=t[f"scale_high_{survey.metric}"],
            comment=comment,
            error=t[_ERRORS[error]] if error in _ERRORS else (error or None),
            action_url=action_url,
            token=token,
            languages=self._languages(locale, selected),
        )

    def thanks(self, *, survey: Survey, token: str, locale: str, score: int | None) -> str:
        """The thank-you page, with a link back to the survey to change the answer."""
        locale = pick_locale(locale, "en")
        t = self.strings[locale]
        _, high = survey.scale
        return self._render(
            "thanks.html.j2",
            locale,
            score_text=t["thanks_score"].format(score=score, high=high)
            if score is not None
            else None,
            change_url=f"/s/{quote(token, safe='')}?lang={locale}",
            token=token,
            languages=self._languages(locale),
        )

    def unsubscribe(self, *, token: str, locale: str, done: bool) -> str:
        """The unsubscribe page: a confirm button (a POST), or the confirmation once done."""
        locale = pick_locale(locale, "en")
        t = self.strings[locale]
        return self._render(
            "unsubscribe.html.j2",
            locale,
            title=t["unsubscribed_title" if done else "unsubscribe_title"],
            text=t["unsubscribed_text" if done else "unsubscribe_text"],
            done=done,
            action_url=f"/u/{quote(token, safe='')}",
            languages=None,
        )

    def message(self, *, locale: str, kind: str) -> str:
        """A notice: ``kind`` is "not_found", "expired", "tampered" or "invalid"."""
        if kind not in KINDS:
            raise ValueError(f"unknown page kind {kind!r} (one of: {', '.join(KINDS)})")
        locale = pick_locale(locale, "en")
        t = self.strings[locale]
        return self._render(
            "message.html.j2",
            locale,
            title=t[f"{kind}_title"],
            text=t[f"{kind}_text"],
            languages=None,
        )

"""Close the loop, the decision: which alert rules of the program an answer matches, and which of
them are new for it (pure; ``alerting.py`` stores and posts).

A rule's conditions all hold: the survey (or the metric) it applies to, ``score_at_most``,
``score_at_least``, and one of the ``comment_contains`` words at the start of a word of the
comment, case-insensitively ("huono" matches "Huonoa palvelua", "cancel" matches "cancelled",
"ill" does not match "will"). A suspected bot never alerts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from services.common.program import AlertRule, AlertWebhook


@dataclass(frozen=True)
class Answer:
    """What the rules look at."""

    survey_id: str
    metric: str
    score: int | None
    comment: str | None
    suspected_bot: bool = False


@cache
def _words(words: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w.casefold()) for w in words)
    return re.compile(rf"(?<!\w)(?:{alternatives})")


def matches(rule: AlertRule, answer: Answer) -> bool:
    if rule.survey is not None and rule.survey != answer.survey_id:
        return False
    if rule.metric is not None and rule.metric != answer.metric:
        return False
    if rule.score_at_most is not None or rule.score_at_least is not None:
        if answer.score is None:
            return False
        if rule.score_at_most is not None and answer.score > rule.score_at_most:
            return False
        if rule.score_at_least is not None and answer.score < rule.score_at_least:
            return False
    if rule.comment_contains:
        if not answer.comment:
            return False
        if not _words(tuple(rule.comment_contains)).search(answer.comment.casefold()):
            return False
    return True


def matching_rules(rules: Iterable[AlertRule], answer: Answer) -> list[str]:
    """The ids of the rules the answer matches, in program order (none for a suspected bot)."""
    if answer.suspected_bot:
        return []
    return [rule.id for rule in rules if matches(rule, answer)]


def split_rules(stored: str | None) -> list[str]:
    """``Response.alert_rules`` (comma-separated) as a list."""
    return [r for r in (stored or "").split(",") if r]


def new_rules(already: Sequence[str], matched: Sequence[str]) -> list[str]:
    """The matched rules that have not alerted for this answer before: a changed answer that
    still matches a rule does not alert again for it."""
    return [r for r in matched if r not in already]


def webhooks_for(webhooks: Iterable[AlertWebhook], rules: Sequence[str]) -> list[AlertWebhook]:
    """The webhooks that want an alert of any of ``rules``."""
    return [w for w in webhooks if w.rules is None or any(r in w.rules for r in rules)]

"""The survey program: surveys and triggers (fatigue, quiet hours and the rest come later).

Loaded from one YAML file and validated once at start; every error names its line and column.
"""

from __future__ import annotations

import re
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from services.common.events import Metric, SurveyChannel, TimeZone

SUPPORTED_LOCALES = ("fi", "sv", "en")
METRIC_RANGES: dict[str, tuple[int, int]] = {"nps": (0, 10), "csat": (1, 5), "ces": (1, 7)}

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _duration(value: Any) -> Any:
    """Accept "90s", "15m", "2h", "3d", "1w", ISO 8601 ("P3D") or a number of seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            try:
                return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
            except OverflowError:
                raise ValueError(f"{value.strip()} is longer than any duration") from None
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
Texts = dict[str, Annotated[str, Field(min_length=1, max_length=500)]]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,99}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reminder(_Model):
    after: Duration


class Survey(_Model):
    id: Slug
    metric: Metric
    question: Texts = Field(description="The first question, per locale")
    followup: Texts | None = Field(default=None, description="The open follow-up question")
    title: Texts | None = Field(default=None, description="Email subject, per locale")
    channels: list[SurveyChannel] = Field(default_factory=lambda: ["email"], min_length=1)  # type: ignore[arg-type]
    link_expiry: Duration = timedelta(days=14)
    reminder: Reminder | None = None
    target: float | None = None
    ignore_fatigue: bool = Field(
        default=False, description="Fatigue rules do not apply (a legal notice, say)"
    )

    @property
    def scale(self) -> tuple[int, int]:
        return METRIC_RANGES[self.metric]


OPERATORS = ("eq", "ne", "in", "not_in", "exists", "gt", "gte", "lt", "lte", "matches")
Scalar = str | int | float | bool


class Condition(_Model):
    """One test on an event field: ``{field: data.team, eq: billing}``. Exactly one operator."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    field: Annotated[
        str,
        Field(
            pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$",
            description="Dotted path into the event, e.g. data.team",
        ),
    ]
    eq: Scalar | None = None
    ne: Scalar | None = None
    in_: list[Scalar] | None = Field(default=None, alias="in")
    not_in: list[Scalar] | None = None
    exists: bool | None = None
    gt: Scalar | None = None
    gte: Scalar | None = None
    lt: Scalar | None = None
    lte: Scalar | None = None
    matches: str | None = Field(default=None, description="A regular expression (search)")

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        given = [op for op in OPERATORS if getattr(self, "in_" if op == "in" else op) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a condition needs exactly one operator of {', '.join(OPERATORS)}"
                + (f" (it has {', '.join(given)})" if given else "")
            )
        if self.matches is not None:
            try:
                re.compile(self.matches)
            except re.error as exc:
                raise ValueError(f"matches: not a regular expression: {exc}") from None
            except (OverflowError, RecursionError):  # a{99999999999}, thousands of groups
                raise ValueError("matches: the regular expression is too large") from None
        return self

    @property
    def operator(self) -> str:
        return next(
            op for op in OPERATORS if getattr(self, "in_" if op == "in" else op) is not None
        )

    @property
    def operand(self) -> Any:
        return getattr(self, "in_" if self.operator == "in" else self.operator)


class AllOf(_Model):
    all: list[When] = Field(min_length=1)


class AnyOf(_Model):
    any: list[When] = Field(min_length=1)


When = Condition | AllOf | AnyOf


class Trigger(_Model):
    id: Slug
    event: Annotated[str, Field(min_length=1, max_length=200)]
    survey: Slug
    delay: Duration = Field(default=timedelta(0), description="Wait after the event's time")
    when: When | list[When] | None = Field(
        default=None, description="Conditions on event fields; a list means all of them"
    )
    cancel_on: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="Event types that cancel a pending invitation of this trigger for the same "
        "case (a reopened ticket cancels its CSAT)",
    )
    sample: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="Share of customers in; stable: one customer is always in or out"
    )
    coalesce: Duration | None = Field(
        default=None,
        description="Qualifying events for one customer within this window give one invitation, "
        "about the latest case",
    )
    priority: int = Field(
        default=0,
        description="When several surveys qualify for a customer at once, the highest wins",
    )


VENDORS = ("zendesk", "hubspot", "freshdesk", "intercom", "salesforce", "servicenow", "generic")
Vendor = Literal[
    "zendesk", "hubspot", "freshdesk", "intercom", "salesforce", "servicenow", "generic"
]
# Canonical event fields a webhook mapping can fill; "attributes.NAME" fills data.attributes.NAME.
MAPPED_FIELDS = (
    "id",
    "type",
    "time",
    "customer_id",
    "email",
    "phone",
    "locale",
    "timezone",
    "account_id",
    "touchpoint",
    "channel",
    "team",
    "agent",
    "case_id",
    "do_not_survey",
)


class SourceConfig(_Model):
    """How one vendor's webhook payload becomes kaiku's event (over the vendor's defaults)."""

    mapping: dict[str, str] = Field(
        default_factory=dict,
        description="Canonical field (or attributes.NAME) → dotted path into the payload item; "
        "a value starting with '=' is a constant",
    )
    types: dict[str, str] = Field(
        default_factory=dict,
        description="The vendor's event type → kaiku event type; an empty value ignores it",
    )

    @model_validator(mode="after")
    def _fields(self) -> SourceConfig:
        for key in self.mapping:
            if key not in MAPPED_FIELDS and not re.fullmatch(r"attributes\.[A-Za-z0-9_]+", key):
                raise ValueError(
                    f"unknown mapping field {key!r} (one of {', '.join(MAPPED_FIELDS)} "
                    "or attributes.NAME)"
                )
        return self


class FatigueRule(_Model):
    """No more than ``limit`` surveys per ``key`` within any ``window``, counted on ``clock``."""

    id: Slug
    key: Literal["customer", "account", "contact"] = Field(
        description="Whose surveys count: the customer, the B2B account, or the contact point "
        "(email address or phone number) the survey goes to"
    )
    scope: Literal["global", "survey", "trigger"] = Field(
        description="Which surveys count: all, the same survey, or the same trigger"
    )
    channel: Literal["any", "email", "sms"] = Field(
        description="The rule applies to (and counts) surveys on this channel"
    )
    clock: Literal["invited", "delivered", "responded"] = Field(
        description="When a survey counts: once invited (sent or scheduled), once delivered, "
        "or once answered"
    )
    window: Duration
    limit: Annotated[int, Field(ge=1)]
    action: Literal["drop", "defer"] = Field(
        default="drop", description="drop the invitation, or defer it to when it is allowed"
    )
    max_defer: Duration | None = Field(
        default=None,
        description="defer: the longest this rule may postpone a send (default: its window); "
        "an invitation that would wait longer is dropped, so a key that gets more events than "
        "its limit allows never builds an ever longer queue of stale surveys",
    )

    @property
    def defer_limit(self) -> timedelta:
        return self.window if self.max_defer is None else self.max_defer


class QuietHours(_Model):
    """No sends between ``start`` and ``end`` in the recipient's local time (the span may cross
    midnight), and optionally none on Saturdays and Sundays."""

    channel: Literal["any", "email", "sms"] = "any"
    start: time
    end: time
    weekends: bool = False


class Fatigue(_Model):
    rules: list[FatigueRule] = Field(default_factory=list)
    quiet_hours: list[QuietHours] = Field(default_factory=list)
    unknown_timezone_zones: list[TimeZone] = Field(
        default_factory=lambda: ["Europe/London", "Europe/Helsinki"],
        min_length=1,
        description="When a recipient's time zone is unknown, a send must be outside quiet "
        "hours in every one of these zones (fail closed: never at night)",
    )


class CaseTracking(_Model):
    """Which event types open and close a case (by ``data.case_id``)."""

    opens: list[str] = Field(
        default_factory=lambda: [
            "ticket.created",
            "ticket.reopened",
            "case.created",
            "case.reopened",
        ]
    )
    closes: list[str] = Field(
        default_factory=lambda: ["ticket.solved", "ticket.closed", "case.closed"]
    )


class Suppression(_Model):
    """Who is never surveyed, whatever the limits say."""

    excluded_domains: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+$")]] = Field(
        default_factory=list, description="Email domains never surveyed (and their subdomains)"
    )
    open_case: CaseTracking | None = Field(
        default=None,
        description="No survey while the customer has another open case (cases are tracked "
        "from the events' case_id and these event types)",
    )
    detractor_cooldown: Duration | None = Field(
        default=None, description="No survey for this long after an unhappy answer"
    )
    detractor_max: dict[Metric, int] = Field(
        default_factory=lambda: {"nps": 6, "csat": 2, "ces": 2},  # type: ignore[arg-type]
        description="The highest score that counts as unhappy, per metric",
    )


class Quota(_Model):
    """At most ``limit`` invitations of one survey per calendar day or month (in the program's
    default time zone, else UTC): SMS costs money."""

    survey: Slug
    per: Literal["day", "month"]
    limit: Annotated[int, Field(ge=0)]


def _webhook_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (sign with secret_env instead)")
    return value


class AlertRule(_Model):
    """When an answer counts as an alert (close the loop). Every condition given must hold:
    the survey or metric it applies to, the score bounds, a word in the comment."""

    id: Slug
    survey: Slug | None = Field(default=None, description="Only answers to this survey")
    metric: Metric | None = Field(
        default=None, description="Only answers of this metric (any survey when none is named)"
    )
    score_at_most: int | None = Field(default=None, description="The score is at most this")
    score_at_least: int | None = Field(default=None, description="The score is at least this")
    comment_contains: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list,
        description="The comment contains any of these words, case-insensitively (a word "
        "matches at the start of a word in the comment: 'huono' matches 'huonoa')",
    )

    @model_validator(mode="after")
    def _some_condition(self) -> AlertRule:
        if self.score_at_most is None and self.score_at_least is None and not self.comment_contains:
            raise ValueError(
                "an alert rule needs score_at_most, score_at_least or comment_contains"
            )
        if (self.score_at_most is not None or self.score_at_least is not None) and not (
            self.survey or self.metric
        ):
            raise ValueError(
                "a score bound needs a survey or a metric (the metrics' scales differ)"
            )
        return self


class AlertWebhook(_Model):
    """A URL that receives every alert, signed the Standard Webhooks way."""

    url: Annotated[str, Field(max_length=2000), AfterValidator(_webhook_url)]
    secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]{0,99}$")] = Field(
        description="The environment variable holding the signing secret (whsec_ + base64); "
        "the secret itself is never in the program"
    )
    rules: list[Slug] | None = Field(
        default=None, description="Only alerts of these rules (default: every rule)"
    )


class Alerts(_Model):
    """Close the loop: which answers are alerts, and who is told."""

    rules: list[AlertRule] = Field(default_factory=list)
    webhooks: list[AlertWebhook] = Field(default_factory=list)


class Defaults(_Model):
    locale: Literal["fi", "sv", "en"] = "en"
    timezone: TimeZone | None = Field(
        default=None,
        description="Recipients' time zone when neither the event nor earlier events say",
    )


class Program(_Model):
    version: Literal[1] = 1
    defaults: Defaults = Defaults()
    surveys: list[Survey] = Field(min_length=1)
    triggers: list[Trigger] = Field(default_factory=list)
    sources: dict[Vendor, SourceConfig] = Field(default_factory=dict)
    fatigue: Fatigue = Fatigue()
    suppression: Suppression = Suppression()
    quotas: list[Quota] = Field(default_factory=list)
    alerts: Alerts = Alerts()

    @model_validator(mode="after")
    def _cross_references(self) -> Program:
        ids = [s.id for s in self.surveys]
        for i, survey in enumerate(self.surveys):
            if ids.count(survey.id) > 1:
                raise _at(("surveys", i, "id"), f"duplicate survey id {survey.id!r}")
            for field in ("question", "followup", "title"):
                texts = getattr(survey, field) or {}
                for locale in texts:
                    if locale not in SUPPORTED_LOCALES:
                        raise _at(
                            ("surveys", i, field, locale),
                            f"unknown locale {locale!r} (supported: fi, sv, en)",
                        )
            if self.defaults.locale not in survey.question:
                raise _at(
                    ("surveys", i, "question"),
                    f"no question in the default locale {self.defaults.locale!r}",
                )
        for i, quota in enumerate(self.quotas):
            if quota.survey not in ids:
                raise _at(("quotas", i, "survey"), f"unknown survey {quota.survey!r}")
        rule_ids = [r.id for r in self.fatigue.rules]
        for i, rule in enumerate(self.fatigue.rules):
            if rule_ids.count(rule.id) > 1:
                raise _at(("fatigue", "rules", i, "id"), f"duplicate rule id {rule.id!r}")
        trigger_ids = [t.id for t in self.triggers]
        for i, trigger in enumerate(self.triggers):
            if trigger_ids.count(trigger.id) > 1:
                raise _at(("triggers", i, "id"), f"duplicate trigger id {trigger.id!r}")
            if trigger.survey not in ids:
                raise _at(("triggers", i, "survey"), f"unknown survey {trigger.survey!r}")
        self._check_alerts()
        return self

    def _check_alerts(self) -> None:
        metrics = {s.id: s.metric for s in self.surveys}
        alert_ids = [r.id for r in self.alerts.rules]
        for i, rule in enumerate(self.alerts.rules):
            at = ("alerts", "rules", i)
            if rule.id in alert_ids[:i]:
                raise _at((*at, "id"), f"duplicate alert rule id {rule.id!r}")
            if rule.survey is not None and rule.survey not in metrics:
                raise _at((*at, "survey"), f"unknown survey {rule.survey!r}")
            metric = metrics[rule.survey] if rule.survey is not None else rule.metric
            if rule.survey is not None and rule.metric not in (None, metric):
                raise _at((*at, "metric"), f"survey {rule.survey!r} measures {metric}")
            for bound in ("score_at_most", "score_at_least"):
                value = getattr(rule, bound)
                low, high = METRIC_RANGES[metric] if metric else (0, 10)
                if value is not None and not low <= value <= high:
                    raise _at((*at, bound), f"{metric} scores are {low}-{high}")
        urls = [w.url for w in self.alerts.webhooks]
        for i, hook in enumerate(self.alerts.webhooks):
            if hook.url in urls[:i]:
                raise _at(("alerts", "webhooks", i, "url"), "the same URL is listed twice")
            for rule_id in hook.rules or []:
                if rule_id not in alert_ids:
                    raise _at(("alerts", "webhooks", i, "rules"), f"unknown rule {rule_id!r}")

    def survey(self, survey_id: str) -> Survey:
        for survey in self.surveys:
            if survey.id == survey_id:
                return survey
        raise KeyError(survey_id)

    def triggers_for(self, event_type: str) -> list[Trigger]:
        return [t for t in self.triggers if t.event == event_type]

    def cancelled_by(self, event_type: str) -> list[Trigger]:
        return [t for t in self.triggers if event_type in t.cancel_on]


class _LocatedError(ValueError):
    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _at(loc: tuple[str | int, ...], message: str) -> _LocatedError:
    return _LocatedError(loc, message)


class ProgramError(Exception):
    """The program is invalid; ``errors`` holds one "file:line:col: where: what" per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _node_at(node: yaml.Node | None, loc: tuple[str | int, ...]) -> yaml.Node | None:
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), node)
            if node is None:
                return None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node
            node = node.value[part]
        else:
            return node
    return node


def _where(source: str, root: yaml.Node | None, loc: tuple[str | int, ...]) -> str:
    node = _node_at(root, loc)
    if node is None:
        return f"{source}:1:1"
    return f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def parse_program(text: str, source: str = "<program>") -> Program:
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except RecursionError:
        raise ProgramError([f"{source}:1:1: invalid YAML: nested too deeply"]) from None
    except ValueError as exc:  # a date that is no date (2026-02-30), a number too long to read
        raise ProgramError([f"{source}:1:1: invalid YAML: {exc}"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f"{mark.line + 1}:{mark.column + 1}" if mark else "1:1"
        raise ProgramError(
            [f"{source}:{pos}: invalid YAML: {getattr(exc, 'problem', exc)}"]
        ) from exc
    if not isinstance(raw, dict):
        raise ProgramError([f"{source}:1:1: the program must be a mapping"])
    try:
        return Program.model_validate(raw)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            message = err["msg"]
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _LocatedError):
                loc, message = cause.loc, str(cause)
            where = ".".join(str(p) for p in loc) or "(program)"
            errors.append(f"{_where(source, root, loc)}: {where}: {message}")
        raise ProgramError(errors) from exc


def load_program(path: Path | str) -> Program:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProgramError([f"{path}: cannot read the program: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ProgramError([f"{path}: the program is not UTF-8 text ({exc.reason})"]) from exc
    return parse_program(text, str(path))

"""Every message on every topic, and the topic names.

The models here are the single definition of what travels over Kafka; ``schemas/`` is exported from
them (``python -m services.common.schemas``) and a test fails when the two drift apart.
"""

from __future__ import annotations

import functools
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.networks import validate_email

Metric = Literal["nps", "csat", "ces"]
SurveyChannel = Literal["email", "sms"]

# Topic names without the configurable prefix (default "kaiku.").
EVENTS = "events"
INVITATIONS = "invitations"
DELIVERIES = "deliveries"
RESPONSES = "responses"
OPTOUTS = "optouts"
DLQ = "dlq"
ALL_TOPICS = (EVENTS, INVITATIONS, DELIVERIES, RESPONSES, OPTOUTS, DLQ)

Id = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]


@functools.lru_cache(maxsize=65_536)
def _normalized_email(value: str) -> str:
    """pydantic's ``EmailStr`` check (email-validator, no DNS), remembered per address: the same
    customers come back event after event, and the check is the costliest step of decoding one."""
    return validate_email(value)[1]


# An ``EmailStr`` with the same rules, errors and JSON schema, whose check is cached.
Email = Annotated[
    str, AfterValidator(_normalized_email), WithJsonSchema({"type": "string", "format": "email"})
]
ShortText = Annotated[str, StringConstraints(max_length=200)]
PHONE_E164 = r"^\+[1-9][0-9]{6,14}$"
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")


def _check_timezone(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: "America", a folder
        raise ValueError(f"unknown IANA time zone {value!r}") from exc
    return value


def _check_locale(value: str | None) -> str | None:
    if value is None:
        return None
    if not _LOCALE.match(value):
        raise ValueError(f"not a BCP 47 language tag: {value!r}")
    return value


TimeZone = Annotated[str, AfterValidator(_check_timezone)]
Locale = Annotated[str, AfterValidator(_check_locale)]


# Deepest nesting of an event's content: deeper JSON stops parsers and serializers (pydantic's
# at about 200 levels), so an event accepted deeper could not be published or consumed.
MAX_DEPTH = 32


def why_unstorable(value: Any) -> str | None:
    """Why a message's content can never be processed, or None: a NUL character in a string
    or a key (PostgreSQL text and jsonb cannot store one), or nesting deeper than ``MAX_DEPTH``.
    Walks strings, dicts, lists and models iteratively: the input may be nested as deep as the
    JSON parser allowed."""
    pending: list[tuple[Any, str, int]] = [(value, "", 0)]
    while pending:
        node, where, depth = pending.pop()
        if depth > MAX_DEPTH:
            return f"{where}: nested more than {MAX_DEPTH} levels deep"
        if isinstance(node, BaseModel):
            node = {**node.__dict__, **(node.model_extra or {})}
        if isinstance(node, str):
            if "\x00" in node:
                return f"{where or '(message)'}: NUL characters are not allowed"
        elif isinstance(node, dict):
            for key, item in node.items():
                path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and "\x00" in key:
                    return f"{where or '(message)'}: NUL characters are not allowed"
                pending.append((item, path, depth + 1))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                pending.append((item, f"{where}.{i}" if where else str(i), depth + 1))
    return None


def json_storable(raw: bytes) -> bool:
    """True when JSON text cannot hold what ``why_unstorable`` refuses, so the walk can be
    skipped: no NUL escape (JSON allows no raw NUL) and no more brackets than ``MAX_DEPTH``
    levels. False only means "walk it"."""
    return b"\\u0000" not in raw and raw.count(b"{") + raw.count(b"[") <= MAX_DEPTH


# The validation context under which a model's walk for unstorable content is skipped.
STORABLE_JSON = {"storable_json": True}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Customer(BaseModel):
    """Who the event is about. Contact details never appear in a repr (and so never in a log)."""

    model_config = ConfigDict(extra="forbid")

    id: Id
    email: Email | None = Field(default=None, repr=False)
    phone: Annotated[str, StringConstraints(pattern=PHONE_E164)] | None = Field(
        default=None, repr=False, description="E.164, for example +358401234567"
    )
    locale: Locale | None = None
    timezone: TimeZone | None = None
    account_id: Id | None = None


class EventData(BaseModel):
    """The ``data`` of a kaiku CloudEvent."""

    model_config = ConfigDict(extra="forbid")

    customer: Customer
    touchpoint: ShortText | None = None
    channel: ShortText | None = Field(
        default=None, description="The channel of the interaction (email, phone, chat, ...)"
    )
    team: ShortText | None = None
    agent: ShortText | None = None
    case_id: ShortText | None = None
    do_not_survey: bool = False
    attributes: dict[str, Any] = Field(default_factory=dict)


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 event in structured JSON mode, as produced onto ``kaiku.events``.

    Extension attributes (lower-case alphanumeric names) are allowed at the top level.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": True})

    specversion: Literal["1.0"]
    id: Id
    source: Annotated[str, StringConstraints(min_length=1, max_length=500)]
    type: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    time: AwareDatetime | None = None
    subject: Id | None = None
    datacontenttype: Literal["application/json"] | None = None
    dataschema: str | None = None
    data: EventData

    @model_validator(mode="after")
    def _extension_names(self, info: ValidationInfo) -> CloudEvent:
        for name in self.model_extra or {}:
            if not re.fullmatch(r"[a-z0-9]{1,20}", name):
                raise ValueError(
                    f"{name!r}: CloudEvents attribute names are lower-case letters and digits"
                )
        if info.context == STORABLE_JSON:  # checked on the raw JSON (json_storable)
            return self
        problem = why_unstorable(self)
        if problem is not None:
            raise ValueError(problem)
        return self

    @property
    def customer_id(self) -> str:
        return self.data.customer.id


class SurveyContext(BaseModel):
    """The segment fields an answer is scored by, copied from the event."""

    touchpoint: str | None = None
    channel: str | None = None
    team: str | None = None
    agent: str | None = None
    case_id: str | None = None
    account_id: str | None = None


class InvitationRequested(BaseModel):
    """The trigger decided to invite a customer to a survey. Keyed by customer id."""

    type: Literal["invitation.requested"] = "invitation.requested"
    invitation_id: uuid.UUID
    token: Annotated[str, StringConstraints(min_length=8, max_length=32)]
    survey_id: Id
    trigger_id: Id
    metric: Metric
    event_id: Id
    event_source: str
    event_type: str
    event_time: AwareDatetime | None = None
    customer: Customer
    channel: SurveyChannel
    locale: str
    send_at: AwareDatetime
    expires_at: AwareDatetime
    requested_at: AwareDatetime
    context: SurveyContext = Field(default_factory=SurveyContext)
    # The recipient's time zone as the trigger resolved it for quiet hours (event, else the
    # customer's last known, else the program default); None when unknown. The dispatcher
    # checks quiet hours again in it at the moment of sending.
    timezone: TimeZone | None = None


class InvitationCancelled(BaseModel):
    """A pending invitation must not be sent (its case was reopened, a newer one replaced it, the
    customer opted out). Keyed by customer id, so it follows its request on the same partition."""

    type: Literal["invitation.cancelled"] = "invitation.cancelled"
    invitation_id: uuid.UUID
    customer_id: Id
    survey_id: Id
    reason: str
    event_id: Id | None = None
    cancelled_at: AwareDatetime


InvitationMessage = Annotated[
    InvitationRequested | InvitationCancelled, Field(discriminator="type")
]
INVITATION_MESSAGE: TypeAdapter[InvitationRequested | InvitationCancelled] = TypeAdapter(
    InvitationMessage
)

# sent: the provider accepted it; failed: it was not sent, or the provider gave up; in_doubt: the
# process stopped between starting the send and recording its outcome (never retried).
# From the providers' receipts: delivered, bounced (hard), complained (spam report), opted_out.
DeliveryStatus = Literal[
    "sent", "failed", "in_doubt", "delivered", "bounced", "complained", "opted_out"
]


class DeliveryRecorded(BaseModel):
    """What happened to one message of an invitation: the dispatcher's outcome of the send, then
    the provider's receipts. Keyed by customer id. ``kind`` tells the invitation from its
    reminder."""

    type: Literal["delivery.recorded"] = "delivery.recorded"
    invitation_id: uuid.UUID
    survey_id: Id
    customer_id: Id
    channel: SurveyChannel
    provider: str
    status: DeliveryStatus
    reason: str | None = None
    provider_message_id: str | None = None
    attempts: int = 1
    occurred_at: AwareDatetime
    kind: Literal["invitation", "reminder"] = "invitation"


class ResponseSubmitted(BaseModel):
    """A customer answered (or changed an answer). Keyed by customer id; the last one counts."""

    type: Literal["response.submitted"] = "response.submitted"
    response_id: uuid.UUID
    invitation_id: uuid.UUID
    survey_id: Id
    customer_id: Id
    metric: Metric
    score: int | None = None
    comment: str | None = Field(default=None, max_length=5000)
    locale: str
    revision: int = 1
    submitted_at: AwareDatetime
    context: SurveyContext = Field(default_factory=SurveyContext)


class OptOutRecorded(BaseModel):
    """A customer asked for no more surveys on a channel. Keyed by customer id.

    The collector does not hold contact details: the consumers that do (the dispatcher) resolve the
    contact point from the invitation. ``source`` says how it was asked: the unsubscribe page, a
    mail client's RFC 8058 one-click POST, or the provider (``reason``: a STOP reply, a hard bounce,
    a spam report, an invalid number, a recipient the provider has unsubscribed)."""

    type: Literal["optout.recorded"] = "optout.recorded"
    optout_id: uuid.UUID
    customer_id: Id
    channel: SurveyChannel
    invitation_id: uuid.UUID | None = None
    survey_id: Id | None = None
    source: Literal["unsubscribe_page", "one_click", "provider"]
    reason: (
        Literal["stop", "hard_bounce", "spam_report", "invalid_recipient", "unsubscribed"] | None
    ) = None
    occurred_at: AwareDatetime


class CustomerErased(BaseModel):
    """A customer asked to be forgotten (``DELETE /v1/customers/{id}`` at the collector): every
    service removes the customer's personal data; answers keep their scores without identity and
    opt-outs survive as salted hashes. On ``kaiku.optouts``, keyed by customer id, so it follows
    the customer's opt-outs."""

    type: Literal["customer.erased"] = "customer.erased"
    erasure_id: uuid.UUID
    customer_id: Id
    requested_at: AwareDatetime


OptOutMessage = Annotated[OptOutRecorded | CustomerErased, Field(discriminator="type")]
OPTOUT_MESSAGE: TypeAdapter[OptOutRecorded | CustomerErased] = TypeAdapter(OptOutMessage)

# One model (or tagged union) per topic. The dead-letter topic carries the original bytes.
EventMessage = CloudEvent
DeliveryMessage = DeliveryRecorded
ResponseMessage = ResponseSubmitted

TOPIC_MODELS: dict[str, Any] = {
    EVENTS: CloudEvent,
    INVITATIONS: InvitationMessage,
    DELIVERIES: DeliveryRecorded,
    RESPONSES: ResponseSubmitted,
    OPTOUTS: OptOutMessage,
}

EVENT_BATCH: TypeAdapter[list[CloudEvent]] = TypeAdapter(list[CloudEvent])

"""Fuzzing (Hypothesis) of the code that reads what outsiders send: the event decoder and the
CloudEvent model, every vendor webhook's verification, splitting and mapping, and the program
loader. Each may refuse its input only with the error it documents:

- ``decode_event`` (a record of kaiku.events, structured or binary mode): ``InvalidMessage``, which
  dead-letters the record; anything else would stop the consumer on every restart (a poison pill).
- ``CloudEvent.model_validate``: ``ValidationError``; ``parse_events`` (the body of
  ``POST /v1/events``): ``ApiError`` with a 4xx status.
- a vendor's ``verify`` and ``items``: ``WebhookError`` (401 or 400); ``to_event`` never raises:
  an item that cannot become an event is ``Unmappable`` (dead-lettered) or ``Ignored``.
- ``parse_program`` and ``load_program``: ``ProgramError``, every error naming its line and column.

Inputs are arbitrary bytes and text, arbitrary JSON (with what Python's JSON parser also accepts:
NaN, Infinity, integers of any size), and mutations of real samples: the CloudEvent of the spec,
the vendors' sample payloads of tests/trigger, and deploy/local/program.yaml. The explicit
``@example``s are the crashes these properties found (all fixed).

Deterministic (``derandomize``, no example database) and bounded: about 30 s in all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError
from starlette.datastructures import Headers

from services.common.events import CloudEvent
from services.common.http import ApiError
from services.common.kafka import InvalidMessage
from services.common.program import (
    MAPPED_FIELDS,
    Program,
    ProgramError,
    SourceConfig,
    load_program,
    parse_program,
)
from services.trigger.api import parse_events
from services.trigger.decoding import decode_event
from services.trigger.ingress import Vendor, WebhookError, WebhookRequest
from services.trigger.ingress import hubspot as hubspot_module
from services.trigger.ingress import zendesk as zendesk_module
from services.trigger.ingress.freshdesk import Freshdesk, FreshdeskSettings
from services.trigger.ingress.generic import Generic, GenericSettings
from services.trigger.ingress.hubspot import Hubspot, HubspotSettings
from services.trigger.ingress.intercom import Intercom, IntercomSettings
from services.trigger.ingress.mapping import Ignored, Unmappable, to_event
from services.trigger.ingress.salesforce import Salesforce, SalesforceSettings
from services.trigger.ingress.servicenow import ServiceNow, ServiceNowSettings
from services.trigger.ingress.zendesk import Zendesk, ZendeskSettings
from tests.trigger import (
    test_webhook_freshdesk,
    test_webhook_generic,
    test_webhook_hubspot,
    test_webhook_intercom,
    test_webhook_salesforce,
    test_webhook_servicenow,
    test_webhook_zendesk,
)

T = TypeVar("T")
E = TypeVar("E", bound=Exception)
ROOT = Path(__file__).resolve().parents[2]
PROGRAM_TEXT = (ROOT / "deploy/local/program.yaml").read_text(encoding="utf-8")


def outcome(call: Callable[[], T], documented: type[E]) -> T | E:
    """What ``call`` returned, or the documented exception it raised; any other propagates."""
    try:
        return call()
    except documented as exc:
        return exc


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- what outsiders send -----------------------------------------------------------------------

# Values that broke (or nearly broke) a parser somewhere: time zone folders, huge and non-finite
# numbers, dates at the ends of the calendar, NUL, overlong text, regular expressions and
# durations beyond the machine's limits.
TRICKY: list[Any] = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "America",
    "Europe/",
    "Europe/Helsinki",
    "../../etc/passwd",
    "0",
    "-1",
    "9" * 20,
    "9" * 400,
    "1e999",
    "NaN",
    "Infinity",
    "2026-11-20T14:03:00Z",
    "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59",
    "+358401234567",
    "+358 40 123 4567",
    "aino@example.fi",
    "not an email@",
    "x" * 300,
    "zen:event-type:ticket.status_changed",
    "99999999999w",
    "a{99999999999}",
    "(" * 600,
    0,
    -1,
    10**30,
    -(10**400),
    1.5,
    float("nan"),
    float("inf"),
    True,
    None,
    [],
    {},
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),
    st.text(max_size=24),
    st.sampled_from(TRICKY),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
LATIN1 = st.text(st.characters(max_codepoint=255), max_size=40)


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """``value`` (a JSON structure) with some of its parts dropped, replaced by arbitrary JSON or
    tricky values, or added to; the rest kept as it was, so most results stay near-valid."""
    action = draw(st.integers(0, 19))
    if action == 0:
        return draw(JSON)
    if action == 1:
        return draw(st.sampled_from(TRICKY))
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if draw(st.integers(0, 11)) == 0:
                continue  # dropped
            out[key] = draw(mutated(item))
        extra = draw(
            st.dictionaries(
                st.sampled_from([*value, "id", "type"]) | st.text(max_size=8), JSON, max_size=2
            )
        )
        return {**out, **extra}
    if isinstance(value, list):
        items = [draw(mutated(item)) for item in value if draw(st.integers(0, 11))]
        return items + draw(st.lists(JSON, max_size=2))
    return value if action > 4 else draw(SCALARS)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity included, as Python's parser reads them


@st.composite
def bytes_near(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few slices deleted, replaced or inserted, or cut short."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out)))
        cut = draw(st.integers(0, 8))
        out[at : at + cut] = draw(st.binary(max_size=8) | st.sampled_from([b"<", b"&", b"\x00"]))
    return bytes(out)


# JSON that Python's parser refuses with a RecursionError or a plain ValueError (an integer of
# more than 4300 digits), not a JSONDecodeError; and JSON nested deeper than pydantic goes.
HOSTILE_JSON = [
    b"[" * 100_000,
    b'{"a":' * 100_000,
    b"1" * 5000,
    b'{"data": {"n": ' + b"1" * 5000 + b"}}",
    b"[" * 900 + b"]" * 900,
]


# -- the event decoder -------------------------------------------------------------------------

SPEC_EVENT: dict[str, Any] = {
    "specversion": "1.0",
    "id": "zd-98213-solved",
    "source": "zendesk://acme",
    "type": "ticket.solved",
    "time": "2026-11-20T14:03:00Z",
    "subject": "cust-4411",
    "data": {
        "customer": {
            "id": "cust-4411",
            "email": "aino@example.fi",
            "phone": "+358401234567",
            "locale": "fi",
            "timezone": "Europe/Helsinki",
            "account_id": "acct-77",
        },
        "touchpoint": "support",
        "channel": "email",
        "team": "billing",
        "agent": "agent-12",
        "case_id": "98213",
        "attributes": {"priority": "high"},
    },
}


def record(
    value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic="kaiku.events",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=b"cust-4411",
        value=value,
        checksum=None,
        serialized_key_size=9,
        serialized_value_size=len(value or b""),
        headers=headers,  # aiokafka yields None for a null header value
    )


def decoded_or_refused(value: bytes | None, headers: list[tuple[str, bytes | None]]) -> None:
    event = outcome(lambda: decode_event(record(value, headers)), InvalidMessage)
    if not isinstance(event, InvalidMessage):
        assert_processable(event)


def assert_processable(event: CloudEvent) -> None:
    """What the trigger accepts it can publish, decode again, and store: PostgreSQL text and
    jsonb cannot hold NUL (the consumer would fail on the event at every restart)."""
    published = event.model_dump_json()
    assert CloudEvent.model_validate_json(published) == event
    assert "\\u0000" not in published


def binary_mode(event: Any) -> tuple[bytes | None, list[tuple[str, bytes | None]]]:
    """A mutated event in the Kafka binding's binary mode: attributes as ce_ headers."""
    if not isinstance(event, dict):
        return dumps(event), [("ce_specversion", b"1.0")]
    headers: list[tuple[str, bytes | None]] = [
        (f"ce_{name}", None if value is None else str(value).encode())
        for name, value in event.items()
        if name != "data"
    ]
    return dumps(event.get("data")), headers


HEADER_VALUES = st.one_of(st.none(), st.binary(max_size=12), st.sampled_from([b"1.0", b"\xff"]))
HEADERS = st.lists(
    st.tuples(
        st.sampled_from(["ce_specversion", "ce_id", "ce_type", "content-type", "ce_data"])
        | st.text(max_size=10),
        HEADER_VALUES,
    ),
    max_size=4,
)


@fuzz(150)
@given(value=st.none() | st.binary(max_size=200) | st.sampled_from(HOSTILE_JSON), headers=HEADERS)
@example(value=b"[" * 100_000, headers=[("ce_specversion", b"1.0")])
@example(value=b"1" * 5000, headers=[("ce_specversion", b"1.0")])
@example(value=b"{}", headers=[("ce_specversion", b"1.0"), ("ce_id", None)])
@example(value=b"{}", headers=[("ce_specversion", b"1.0"), ("content-type", None)])
def test_the_decoder_takes_any_bytes(
    value: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    decoded_or_refused(value, headers)


@fuzz(150)
@given(event=JSON | mutated(SPEC_EVENT), binary=st.booleans())
@example(
    event={**SPEC_EVENT, "data": {"customer": {"id": "c", "timezone": "America"}}}, binary=False
)
@example(event={**SPEC_EVENT, "data": {"customer": {"id": "c\x00"}}}, binary=False)
@example(event={**SPEC_EVENT, "id": "e\x00", "data": {"customer": {"id": "c"}}}, binary=True)
def test_the_decoder_takes_any_json_and_near_valid_events(event: Any, binary: bool) -> None:
    value, headers = binary_mode(event) if binary else (dumps(event), [])
    decoded_or_refused(value, headers)


@fuzz(150)
@given(event=JSON | mutated(SPEC_EVENT) | st.lists(mutated(SPEC_EVENT), max_size=3))
@example(event={**SPEC_EVENT, "data": {"customer": {"id": "c", "timezone": "America"}}})
@example(event={**SPEC_EVENT, "data": {**SPEC_EVENT["data"], "attributes": {"k": "\x00"}}})
def test_the_cloudevent_model_and_the_http_ingress_refuse_only_as_documented(event: Any) -> None:
    try:
        model = CloudEvent.model_validate(event)
    except ValidationError:
        model = None
    if model is not None:
        assert_processable(model)
    body = dumps(event)
    accepted = outcome(lambda: parse_events(body, 1000), ApiError)
    if isinstance(accepted, ApiError):
        assert 400 <= accepted.status < 500, accepted.status
    else:
        assert all(isinstance(e, CloudEvent) for e in accepted)


@pytest.mark.parametrize(
    ("body", "status"), list(zip(HOSTILE_JSON, [400, 400, 400, 400, 422], strict=True))
)
def test_the_http_ingress_refuses_json_python_cannot_read(body: bytes, status: int) -> None:
    with pytest.raises(ApiError) as refused:
        parse_events(body, 1000)
    assert refused.value.status == status


def test_an_event_nested_too_deep_to_publish_is_refused() -> None:
    """pydantic accepts ``Any`` nested as deep as the JSON parser allows, but can neither
    serialize it nor parse it back: over HTTP a 422 (not a 500 at publishing), from a webhook an
    unmappable item (dead-lettered), not an event its consumer would refuse."""
    deep: Any = "leaf"
    for _ in range(300):
        deep = {"k": deep}
    event = {**SPEC_EVENT, "data": {**SPEC_EVENT["data"], "attributes": {"deep": deep}}}
    with pytest.raises(ApiError) as refused:
        parse_events(dumps(event), 1000)
    assert refused.value.status == 422
    assert "nested more than" in refused.value.message
    item = {**test_webhook_zendesk.EVENT, "detail": {**test_webhook_zendesk.EVENT["detail"]}}
    item["detail"]["priority"] = deep
    result = to_event(SOURCES["zendesk"].vendor, item, None)
    assert isinstance(result, Unmappable), result


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"note": "a\x00b"}, "NUL characters are not allowed"),
        ({"n\x00te": "x"}, "NUL characters are not allowed"),
        ({"list": ["ok", ["a\x00"]]}, "NUL characters are not allowed"),
        ({"deep": json.loads("[" * 31 + "]" * 31)}, "nested more than 32 levels deep"),
        ({"deep": json.loads('{"k":' * 31 + "1" + "}" * 31)}, "nested more than 32 levels deep"),
    ],
)
def test_a_kafka_event_holding_what_cannot_be_stored_is_dead_lettered(
    attributes: dict[str, Any], reason: str
) -> None:
    """The consumer skips its walk for NUL and depth when the raw JSON cannot hold either; a
    record that can is still walked, and refused with the reason (not stored, not a crash)."""
    event = {**SPEC_EVENT, "data": {**SPEC_EVENT["data"], "attributes": attributes}}
    with pytest.raises(InvalidMessage) as refused:
        decode_event(record(dumps(event), []))
    assert reason in str(refused.value)
    shallow = {**SPEC_EVENT, "data": {**SPEC_EVENT["data"], "attributes": {"deep": [[["x"]]]}}}
    assert decode_event(record(dumps(shallow), [])).data.attributes == {"deep": [[["x"]]]}


# -- vendor webhooks ---------------------------------------------------------------------------

SECRET = "hostile-webhook-secret-0123456789"
BASE = "http://kaiku.test/v1/webhooks/"


def generic_headers(body: bytes, stamp: str, signed: bool, noise: str) -> dict[str, str]:
    try:
        ts = str(int(stamp))
    except ValueError:
        ts = stamp
    key = SECRET.encode()
    signature = base64.b64encode(
        hmac.new(key, f"msg_1.{ts}.".encode() + body, hashlib.sha256).digest()
    ).decode()
    return {
        "content-type": "application/json",
        "webhook-id": "msg_1",
        "webhook-timestamp": stamp,
        "webhook-signature": f"v1,{signature}" if signed else noise,
    }


def zendesk_headers(body: bytes, stamp: str, signed: bool, noise: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        zendesk_module.TIMESTAMP_HEADER: stamp,
        zendesk_module.SIGNATURE_HEADER: zendesk_module.sign(SECRET, stamp, body)
        if signed
        else noise,
        zendesk_module.INVOCATION_HEADER: noise,
    }


def hubspot_headers(body: bytes, stamp: str, signed: bool, noise: str) -> dict[str, str]:
    signature = hubspot_module.sign(SECRET, "POST", BASE + "hubspot", body, stamp.strip())
    return {
        "content-type": "application/json",
        hubspot_module.TIMESTAMP_HEADER: stamp,
        hubspot_module.SIGNATURE_HEADER: signature if signed else noise,
    }


def intercom_headers(body: bytes, stamp: str, signed: bool, noise: str) -> dict[str, str]:
    signature = "sha1=" + hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    return {"content-type": "application/json", "x-hub-signature": signature if signed else noise}


def shared_secret_headers(body: bytes, stamp: str, signed: bool, noise: str) -> dict[str, str]:
    if signed:
        return {"content-type": "application/json", "x-kaiku-webhook-secret": SECRET}
    return {"content-type": "application/json", "authorization": f"Basic {noise}"}


@dataclass(frozen=True)
class Source:
    vendor: Vendor
    samples: list[Any]  # payloads as the vendor sends them (JSON structures)
    headers: Callable[[bytes, str, bool, str], dict[str, str]]


SOURCES: dict[str, Source] = {
    "generic": Source(
        Generic(GenericSettings(webhook_secret=SecretStr(SECRET))),
        [json.loads(test_webhook_generic.BODY)],
        generic_headers,
    ),
    "zendesk": Source(
        Zendesk(ZendeskSettings(webhook_secret=SecretStr(SECRET), subdomain="acme")),
        [test_webhook_zendesk.EVENT, json.loads(test_webhook_zendesk.TRIGGER_BODY)],
        zendesk_headers,
    ),
    "hubspot": Source(
        Hubspot(HubspotSettings(webhook_secret=SecretStr(SECRET))),
        [
            test_webhook_hubspot.DOCS_BATCH,
            json.loads(test_webhook_hubspot.DOCS_V1_BODY),
            [test_webhook_hubspot.TICKET_CLOSED, test_webhook_hubspot.THREAD_CLOSED],
        ],
        hubspot_headers,
    ),
    "intercom": Source(
        Intercom(IntercomSettings(webhook_secret=SecretStr(SECRET), workspace="acme")),
        [test_webhook_intercom.notification()],
        intercom_headers,
    ),
    "freshdesk": Source(
        Freshdesk(FreshdeskSettings(webhook_secret=SecretStr(SECRET), domain="acme")),
        [test_webhook_freshdesk.PAYLOAD, test_webhook_freshdesk.PAYLOAD["freshdesk_webhook"]],
        shared_secret_headers,
    ),
    "servicenow": Source(
        ServiceNow(ServiceNowSettings(webhook_secret=SecretStr(SECRET), instance="acme")),
        [test_webhook_servicenow.PAYLOAD, [test_webhook_servicenow.PAYLOAD]],
        shared_secret_headers,
    ),
}
SALESFORCE = Salesforce(
    SalesforceSettings(
        webhook_secret=SecretStr(SECRET), organization_id=test_webhook_salesforce.ORG
    )
)


def paths(value: Any, prefix: str = "") -> list[str]:
    """Every dotted path into a sample (what a program's ``sources.<vendor>.mapping`` names)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in [f"{prefix}{k}", *paths(v, f"{prefix}{k}.")]]
    if isinstance(value, list):
        return [
            p for i, v in enumerate(value) for p in [f"{prefix}{i}", *paths(v, f"{prefix}{i}.")]
        ]
    return []


def source_configs(vendor: Vendor, samples: list[Any]) -> st.SearchStrategy[SourceConfig | None]:
    """No override, or a program's mapping and type table over the vendor's defaults."""
    known = {re.sub(r"^[0-9]+\.", "", p) for s in samples for p in paths(s)}
    known |= set(vendor.DEFAULT_MAPPING.values())
    path = st.sampled_from(sorted(known)) | st.text(max_size=12) | st.just("=constant")
    field = st.sampled_from([*MAPPED_FIELDS, "attributes.extra"])
    return st.none() | st.builds(
        SourceConfig,
        mapping=st.dictionaries(field, path, max_size=5),
        types=st.dictionaries(
            st.sampled_from(sorted(vendor.DEFAULT_TYPES) or ["x"]) | st.text(max_size=12),
            st.text(max_size=12),
            max_size=2,
        ),
    )


def request(
    name: str, body: bytes, headers: dict[str, str], url: str | None = None
) -> WebhookRequest:
    return WebhookRequest(
        "POST", url or BASE + name, Headers(headers=headers), body, datetime.now(UTC)
    )


def mapped_or_refused(vendor: Vendor, webhook: WebhookRequest, config: SourceConfig | None) -> None:
    items = outcome(lambda: vendor.items(webhook), WebhookError)
    if isinstance(items, WebhookError):
        assert items.status == 400, items.status
        return
    assert items, "a vendor gave no item without refusing the body"
    for item in items:
        result = to_event(vendor, item, config)
        assert isinstance(result, CloudEvent | Ignored | Unmappable), result
        if isinstance(result, CloudEvent):
            assert_processable(result)


def payloads(source: Source) -> st.SearchStrategy[bytes]:
    near = st.sampled_from(source.samples).flatmap(mutated).map(dumps)
    return (
        near
        | st.sampled_from([dumps(s) for s in source.samples])
        | JSON.map(dumps)
        | st.binary(max_size=64)
        | st.sampled_from(HOSTILE_JSON)
    )


def mapping_property(name: str) -> Callable[[], None]:
    source = SOURCES[name]

    @fuzz(60)
    @given(
        body=payloads(source), config=source_configs(source.vendor, source.samples), noise=LATIN1
    )
    def check(body: bytes, config: SourceConfig | None, noise: str) -> None:
        headers = source.headers(body, "0", False, noise)
        mapped_or_refused(source.vendor, request(name, body, headers), config)

    return check


STAMPS = st.one_of(
    st.sampled_from(["0", "-1", "9" * 20, "9" * 400, " 12", "1e999", "NaN", "", "x"]),
    st.sampled_from(
        ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "2026-11-20T14:03:00Z"]
    ),
    st.integers(min_value=0, max_value=10**16).map(str),
    LATIN1,
)


def verify_property(name: str) -> Callable[[], None]:
    source = SOURCES[name]

    @fuzz(40)
    @given(body=payloads(source), stamp=STAMPS, signed=st.booleans(), noise=LATIN1)
    @example(body=b"{}", stamp="9" * 400, signed=False, noise="")
    def check(body: bytes, stamp: str, signed: bool, noise: str) -> None:
        webhook = request(name, body, source.headers(body, stamp, signed, noise))
        refused = outcome(lambda: source.vendor.verify(webhook), WebhookError)
        assert refused is None or refused.status == 401, refused

    return check


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_a_vendor_payload_becomes_events_or_is_refused_as_documented(name: str) -> None:
    mapping_property(name)()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_a_vendor_signature_check_refuses_only_with_401(name: str) -> None:
    verify_property(name)()


NOTIFICATION = st.tuples(
    *(st.text(max_size=20).map(lambda t: t.replace("&", "&amp;").replace("<", "&lt;")),) * 4
)


@fuzz(80)
@given(
    body=st.one_of(
        bytes_near(test_webhook_salesforce.BODY),
        st.lists(NOTIFICATION, max_size=3).map(lambda ns: test_webhook_salesforce.envelope(*ns)),
        st.binary(max_size=100),
        st.sampled_from(
            [
                b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>',
                b"<" * 10_000,
                b"<a>" * 5_000,
            ]
        ),
    ),
    token=st.sampled_from([SECRET, "wrong"]) | LATIN1,
    config=source_configs(SALESFORCE, []),
)
def test_a_salesforce_outbound_message_becomes_events_or_is_refused(
    body: bytes, token: str, config: SourceConfig | None
) -> None:
    url = f"{BASE}salesforce?token={token}"
    webhook = request("salesforce", body, {"content-type": "text/xml"}, url)
    refused = outcome(lambda: SALESFORCE.verify(webhook), WebhookError)
    assert refused is None or refused.status in (400, 401), refused
    mapped_or_refused(SALESFORCE, webhook, config)


# -- the program loader ------------------------------------------------------------------------

LOCATED = re.compile(r"^<program>:\d+:\d+: ")


def loaded_or_refused(text: str) -> None:
    program = outcome(lambda: parse_program(text), ProgramError)
    if isinstance(program, ProgramError):
        assert program.errors, "a ProgramError without an error"
        for error in program.errors:
            assert LOCATED.match(error), error
    else:
        assert isinstance(program, Program)


def survey_with(**fields: Any) -> str:
    survey = {"id": "s", "metric": "nps", "question": {"en": "Q?"}, **fields}
    return yaml.safe_dump({"surveys": [survey]})


@st.composite
def text_mutations(draw: st.DrawFn, text: str) -> str:
    """Lines deleted, repeated or moved, and text inserted: edits a person makes by mistake."""
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(lines) - 1))
        kind = draw(st.integers(0, 3))
        if kind == 0:
            del lines[at]
        elif kind == 1:
            lines.insert(at, lines[draw(st.integers(0, len(lines) - 1))])
        elif kind == 2:
            lines[at] = lines[at].replace(":", draw(st.sampled_from(["", "::", ": -", ": {"])), 1)
        else:
            lines.insert(at, draw(st.text(max_size=30)) + "\n")
        if not lines:
            break
    return "".join(lines)


@fuzz(80)
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.builds(yaml.safe_dump, JSON),
        st.builds(yaml.safe_dump, mutated(yaml.safe_load(PROGRAM_TEXT))),
        text_mutations(PROGRAM_TEXT),
    )
)
@example(text=PROGRAM_TEXT)
@example(text="[" * 600)
@example(text="surveys: [" + "{all: [" * 300 + "]}" * 300 + "]")
@example(text=survey_with(link_expiry="99999999999w"))
@example(text="surveys: " + "1" * 5000)
@example(text=survey_with() + "defaults: {locale: 2026-02-30}\n")
@example(text="defaults: {timezone: America}\n" + survey_with())
@example(
    text=survey_with()
    + "triggers: [{id: t, event: e, survey: s, when: {field: x, matches: 'a{99999999999}'}}]\n"
)
@example(
    text=survey_with()
    + "triggers: [{id: t, event: e, survey: s, when: {field: x, matches: '"
    + "(" * 600
    + ")" * 600
    + "'}}]\n"
)
def test_the_program_loader_refuses_only_with_located_errors(text: str) -> None:
    loaded_or_refused(text)


@fuzz(40)
@given(
    data=st.binary(max_size=100) | st.builds(str.encode, st.text(max_size=50), st.just("utf-16"))
)
@example(data="surveys: [{id: s, metric: nps, question: {en: Kysymys?}}]\n".encode("latin-1"))
@example(data="question: {fi: Kysymys? Ä}".encode("latin-1"))
def test_loading_a_program_file_refuses_only_with_a_program_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "program.yaml"
        path.write_bytes(data)
        loaded = outcome(lambda: load_program(path), ProgramError)
        if isinstance(loaded, ProgramError):
            assert all(error.startswith(str(path)) for error in loaded.errors), loaded.errors

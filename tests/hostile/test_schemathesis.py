"""Schemathesis against the OpenAPI documents of the three services, in process (ASGI).

Each service runs with what it really needs: its own PostgreSQL schema, the embedded broker with
topics of this test's own, and the bearer token, so the authenticated routes are exercised past
the token check (Schemathesis' ``ignored_auth`` check also sends them without it). Generated
requests, valid and invalid ones, must never get a 5xx, and every status must be one the operation
documents; responses must match their documented schemas and content types.

Path parameters that name something are drawn, part of the time, from what exists: the trigger's
configured webhook sources, the dispatcher's receipt providers (Mailgun and Twilio configured,
SendGrid not), and on the collector
the links of a live and of an expired invitation that the collector consumed from the broker
before the run. Everything else is generated.

Not exercised, because it is not in the OpenAPI documents (``include_in_schema=False``):
``/healthz``, ``/readyz`` and ``/metrics`` (no input at all), ``HEAD /v1/webhooks/{source}`` (a
vendor's probe: only the source name), and the collector's ``/dashboard`` pages, among them the
server-sent event stream ``/dashboard/events``: they are HTML and a stream for a signed-in
browser session, tested with a real browser in tests/collector/test_dashboard.py.

Each operation runs Schemathesis' examples, coverage and fuzzing phases. Deterministic: a fixed
seed, ``derandomize``, no example database, a bounded number of examples.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from confluent_kafka import Producer
from fastapi import FastAPI
from hypothesis import strategies as st
from pydantic import SecretStr
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi

from services.common.config import DatabaseSettings, HttpSettings, KafkaSettings, LinkSettings
from services.common.program import Program
from services.common.settings import CommonSettings
from services.common.tokens import LinkKeys
from services.trigger.ingress import Vendor
from services.trigger.ingress.freshdesk import Freshdesk, FreshdeskSettings
from services.trigger.ingress.generic import Generic, GenericSettings
from services.trigger.ingress.hubspot import Hubspot, HubspotSettings
from services.trigger.ingress.intercom import Intercom, IntercomSettings
from services.trigger.ingress.salesforce import Salesforce, SalesforceSettings
from services.trigger.ingress.servicenow import ServiceNow, ServiceNowSettings
from services.trigger.ingress.zendesk import Zendesk, ZendeskSettings
from tests.support import email_invitation

# Raised by Hypothesis about Schemathesis' own strategies (not kaiku's).
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

TOKEN = "hostile-api-token-0123456789"
LINK_KEYS = "h:hostile-input-link-key-0123456789"
EXAMPLES = 20  # per operation and phase: the three runs take about a minute on two cores

CONFIG: dict[str, Any] = {
    "seed": 20261120,
    "generation": {
        "mode": "all",  # valid requests and invalid ones
        "max-examples": EXAMPLES,
        "deterministic": True,
        "database": "none",
    },
    "headers": {"Authorization": f"Bearer {TOKEN}"},
    "operations": [
        {
            # The coverage phase derives about 1300 requests from the CloudEvent schema, two
            # thirds of them invalid: it keeps the valid ones (boundary values, which the
            # trigger's worker then consumes). Invalid bodies still come from the fuzzing phase,
            # and test_fuzz.py fuzzes the body parser itself.
            "include-path": "/v1/events",
            "include-method": "POST",
            "phases": {"coverage": {"generation": {"mode": "positive"}}},
        }
    ],
    "checks": {
        # The other checks run: no 5xx, documented statuses, content types, response schemas
        # and headers, 405 with Allow for other methods, auth. These two judge whether the
        # documents say every rule of the input, which they cannot: a link token must carry its
        # signature (a 400 page), a webhook or receipt its vendor's signature and content type
        # (401, 415), a score query a known survey and real dates (422), a PATCH at least one
        # field (422); and pydantic reads JSON leniently (0 for false, a number for a date-time)
        # where the schemas say boolean or string. Both are design, not defects.
        "positive_data_acceptance": {"enabled": False},
        "negative_data_rejection": {"enabled": False},
    },
}


def vendors() -> dict[str, Vendor]:
    """Every webhook source, configured with test secrets."""
    secret = SecretStr("hostile-webhook-secret-0123456789")
    configured: list[Vendor] = [
        Generic(GenericSettings(webhook_secret=secret)),
        Zendesk(ZendeskSettings(webhook_secret=secret, subdomain="acme")),
        Hubspot(HubspotSettings(webhook_secret=secret)),
        Intercom(IntercomSettings(webhook_secret=secret, workspace="acme")),
        Freshdesk(FreshdeskSettings(webhook_secret=secret, domain="acme")),
        ServiceNow(ServiceNowSettings(webhook_secret=secret, instance="acme")),
        Salesforce(SalesforceSettings(webhook_secret=secret, organization_id="00D5e000000KQ2eEAG")),
    ]
    return {v.name: v for v in configured}


def settings(kafka: KafkaSettings, database: DatabaseSettings) -> CommonSettings:
    return CommonSettings(
        kafka=kafka,
        database=database,
        http=HttpSettings(api_token=SecretStr(TOKEN)),
        links=LinkSettings(public_url="http://testserver", link_keys=SecretStr(LINK_KEYS)),
    )


def replaced(params: dict[str, Any], name: str, value: str) -> dict[str, Any]:
    return {**params, name: value}


def known_values(
    known: dict[str, list[str]],
) -> Callable[[Any, dict[str, Any] | None], st.SearchStrategy[dict[str, Any] | None]]:
    """A hook that replaces a generated path parameter by a value that exists, part of the time
    (the generated one stays among the choices)."""

    def flatmap_path_parameters(
        _context: Any, path_parameters: dict[str, Any] | None
    ) -> st.SearchStrategy[dict[str, Any] | None]:
        for name, values in known.items():
            if isinstance(path_parameters, dict) and name in path_parameters:
                choices = st.sampled_from([*values, path_parameters[name]])
                return choices.map(functools.partial(replaced, path_parameters, name))
        return st.just(path_parameters)

    return flatmap_path_parameters


def load(app: FastAPI, known: dict[str, list[str]]) -> schemathesis.BaseSchema:
    """The app's schema, fetched from its /openapi.json (which starts the app's lifespan in
    Schemathesis' event loop, where every request then runs)."""
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, config=SchemathesisConfig.from_dict(CONFIG)
    )
    schema.hook(known_values(known))
    return schema


def stop(app: FastAPI) -> None:
    """Stop the app (consumers, workers) before its database schema is dropped, and check that
    nothing it consumed or ran in the background died on what the run sent."""
    asgi.shutdown_lifespans()
    assert not app.state.runtime.failed.is_set(), "a consumer or worker died during the run"


@pytest.fixture
def trigger_api(
    kafka: KafkaSettings, postgres: DatabaseSettings, program: Program
) -> Iterator[schemathesis.BaseSchema]:
    from services.trigger.app import create_app

    configured = vendors()
    app = create_app(settings(kafka, postgres), program=program, vendors=configured, resolvers={})
    yield load(app, {"source": sorted(configured)})
    stop(app)


@pytest.fixture
def dispatcher_api(
    kafka: KafkaSettings,
    postgres: DatabaseSettings,
    program: Program,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[schemathesis.BaseSchema]:
    from services.dispatcher.app import create_app
    from services.dispatcher.channels.file import FileEmail, FileSms
    from services.dispatcher.config import DispatcherSettings

    # Receipts from Mailgun (email) and Twilio (SMS); the others answer 404 (not configured).
    monkeypatch.setenv("KAIKU_MAILGUN_WEBHOOK_SIGNING_KEY", "hostile-mailgun-signing-key")
    monkeypatch.setenv("KAIKU_TWILIO_AUTH_TOKEN", "hostile-twilio-auth-token-012345")
    config = DispatcherSettings(
        email_provider="mailgun", sms_provider="twilio", outbox_dir=tmp_path, poll_seconds=0.2
    )
    app = create_app(
        settings(kafka, postgres),
        config,
        program=program,
        email=FileEmail(tmp_path),
        sms=FileSms(tmp_path),
    )
    yield load(app, {"provider": ["mailgun", "twilio", "sendgrid"]})
    stop(app)


def invite(kafka: KafkaSettings, token: str, expires_in: timedelta) -> None:
    """An invitation as the trigger publishes it, produced onto the test's invitations topic."""
    invitation = email_invitation(f"hostile-{uuid.uuid4().hex[:8]}", expires_in=expires_in)
    invitation = invitation.model_copy(update={"token": token})
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    producer.produce(
        kafka.topic("invitations"), invitation.model_dump_json().encode(), invitation.customer.id
    )
    assert producer.flush(10) == 0, "the invitation was not delivered to the broker"


@pytest.fixture
def collector_api(
    kafka: KafkaSettings, postgres: DatabaseSettings, program: Program
) -> Iterator[schemathesis.BaseSchema]:
    from services.collector.app import create_app
    from services.collector.config import CollectorSettings

    app = create_app(settings(kafka, postgres), CollectorSettings(bot_min_seconds=0), program)
    keys = LinkKeys.parse(LINK_KEYS)
    live, expired = keys.issue(), keys.issue()
    schema = load(app, {"token": [live, expired]})  # the lifespan runs from here on
    invite(kafka, live, timedelta(days=14))
    invite(kafka, expired, timedelta(days=-1))
    with asgi.get_client(app) as http:  # type: ignore[arg-type]  # Starlette's own ASGI types
        for _ in range(200):
            if http.get(f"/s/{live}").status_code == 200 and (
                http.get(f"/s/{expired}").status_code == 410
            ):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the collector did not store the invitations produced for the run")
    yield schema
    stop(app)


@pytest.fixture(autouse=True)
def _node_id(request: pytest.FixtureRequest) -> None:
    """Schemathesis 4.32's ``from_fixture`` reads and renames ``item._nodeid``, which pytest 9
    no longer has (its node ids are structured now): give it one to read."""
    request.node._nodeid = request.node.nodeid


trigger = schemathesis.pytest.from_fixture("trigger_api")
dispatcher = schemathesis.pytest.from_fixture("dispatcher_api")
collector = schemathesis.pytest.from_fixture("collector_api")


@trigger.parametrize()
def test_trigger_api(case: Case[Any]) -> None:
    case.call_and_validate()


@dispatcher.parametrize()
def test_dispatcher_api(case: Case[Any]) -> None:
    case.call_and_validate()


@collector.parametrize()
def test_collector_api(case: Case[Any]) -> None:
    case.call_and_validate()

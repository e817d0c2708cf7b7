"""The metrics: what each service's ``/metrics`` exposes agrees with docs/metrics.md and with every
metric the Grafana dashboard (deploy/grafana/kaiku.json) queries; and the end-to-end latency and
the responses counter move when a real invitation is sent and a real answer is stored."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import Program, parse_program
from tests.support import SmtpSink, client, eventually, running, smtp_stack, survey_link

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/kaiku.json"
DOC = ROOT / "docs/metrics.md"
SERVICES = ("trigger", "dispatcher", "collector")

# Series the dashboard may query that no kaiku service exposes: Prometheus's own per target.
NOT_KAIKU = {"up"}

# Each service in a process of its own, as deployed: build its app (nothing connects), read its
# /metrics, and list the kaiku metrics its modules define (name, type, labels).
DUMP = """
import asyncio, json, sys, httpx
from pathlib import Path
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.program import load_program
from services.common.settings import CommonSettings

name = sys.argv[1]
module = __import__(f"services.{name}.app", fromlist=["create_app"])
settings = CommonSettings(
    kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"),
    database=DatabaseSettings(url="sqlite+aiosqlite:///:memory:"),
)
app = module.create_app(settings, program=load_program(Path(sys.argv[2])))

async def scrape():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://kaiku.test") as http:
        return (await http.get("/metrics")).text

defined = {}
for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("services."):
        for value in vars(mod).values():
            if isinstance(value, MetricWrapperBase) and value._name.startswith("kaiku_"):
                defined[value._name] = {"type": value._type, "labels": list(value._labelnames)}
registered = sorted(m.name for m in REGISTRY.collect() if m.name.startswith("kaiku_"))
print(json.dumps({"defined": defined, "registered": registered, "text": asyncio.run(scrape())}))
"""

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def exposed(service: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", DUMP, service, str(ROOT / "deploy/local/program.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"the {service} app could not be built:\n{done.stderr}"
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return {s: exposed(s) for s in SERVICES}


def catalogue(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every kaiku metric by family name: type, labels and the services that expose it."""
    out: dict[str, dict[str, Any]] = {}
    for service, dump in services.items():
        for name, spec in dump["defined"].items():
            entry = out.setdefault(name, {**spec, "services": set()})
            assert (entry["type"], entry["labels"]) == (spec["type"], spec["labels"])
            entry["services"].add(service)
    return out


def series_names(metrics: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Every series name a query can use (``_total``, ``_bucket``...) → its family name."""
    return {
        family + suffix: family
        for family, spec in metrics.items()
        for suffix in SUFFIXES[spec["type"]]
    }


# -- PromQL ---------------------------------------------------------------------------------------

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metrics(expr: str) -> set[str]:
    """The metric names in a PromQL expression (not functions, keywords or label names)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, which may hold anything
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # selectors
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range and subquery windows ($__rate_interval)
    expr = _GROUPING.sub(" ", expr)  # label lists: sum by (le, channel)
    names = set()
    for match in _IDENT.finditer(expr):
        if match.start() > 0 and expr[match.start() - 1] in "$.0123456789":
            continue  # $variables, 1e3, 0.95
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function: rate(, histogram_quantile(, label_values(
        if match.group(0).lower() not in _KEYWORDS:
            names.add(match.group(0))
    return names


def test_promql_metrics_parser() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, channel) (rate(kaiku_event_to_send_seconds_bucket"
        '{namespace=~"$namespace", channel!="sms"}[$__rate_interval]))) / on (channel) '
        "group_left sum without (pod) (kaiku_consumer_lag) * 1e3 > bool 0 or up"
    )
    assert promql_metrics(expr) == {
        "kaiku_event_to_send_seconds_bucket",
        "kaiku_consumer_lag",
        "up",
    }
    assert promql_metrics("label_values(kaiku_messages_consumed_total, namespace)") == {
        "kaiku_messages_consumed_total",
        "namespace",  # a label_values argument; the caller drops it
    }


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            for target in panel.get("targets", []):
                out.append((f"panel {panel['title']!r}", target["expr"]))
            panels(panel.get("panels", []))

    panels(board["panels"])
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            # label_values(metric, label): the label is not a metric
            text = re.sub(r"label_values\((.*),\s*\w+\)", r"\1", text)
            out.append((f"variable {variable['name']!r}", text))
    return out


# -- the catalogue --------------------------------------------------------------------------------


def test_every_service_serves_the_metrics_its_modules_define(
    services: dict[str, dict[str, Any]],
) -> None:
    for service, dump in services.items():
        assert sorted(dump["defined"]) == dump["registered"], service
        served = {f.name for f in text_string_to_metric_families(dump["text"])}
        for name, spec in dump["defined"].items():
            family = name.removesuffix("_total") if spec["type"] == "counter" else name
            assert family in served, f"{service}'s /metrics does not show {name}"
        assert dump["defined"], f"{service} defines no kaiku metrics"
    # Every service runs the consumer loop, so each shows its metrics.
    for name in ("kaiku_messages_consumed", "kaiku_consumer_lag", "kaiku_batch_seconds"):
        assert all(name in d["defined"] for d in services.values()), name


def test_no_label_can_hold_a_person_or_a_secret(services: dict[str, dict[str, Any]]) -> None:
    forbidden = re.compile(r"customer|email|phone|contact|token|comment|address|id$|url|text")
    for name, spec in catalogue(services).items():
        for label in spec["labels"]:
            assert not forbidden.search(label), f"{name} has the label {label!r}"


def test_dashboard_queries_only_exposed_metrics(services: dict[str, dict[str, Any]]) -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 38
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    names = series_names(catalogue(services))
    queries = dashboard_queries()
    assert len(queries) >= 12
    used: set[str] = set()
    for where, expr in queries:
        found = promql_metrics(expr)
        assert found, f"{where}: no metric in {expr!r}"
        for metric in found - NOT_KAIKU:
            assert metric in names, f"{where} queries {metric}, which no service exposes"
            used.add(names[metric])
    wanted = {
        "kaiku_messages_consumed", "kaiku_trigger_decisions", "kaiku_invitations_sent",
        "kaiku_invitations_failed", "kaiku_consumer_lag", "kaiku_event_to_send_seconds",
        "kaiku_send_lag_seconds", "kaiku_responses", "kaiku_messages_dead_lettered",
        "kaiku_transient_retries", "kaiku_webhooks", "kaiku_alert_webhooks", "kaiku_batch_seconds",
    }  # fmt: skip
    assert wanted <= used, f"the dashboard has no panel for {sorted(wanted - used)}"


def test_every_panel_uses_the_datasource_variable() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids: list[int] = []
    for panel in board["panels"]:
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def documented() -> dict[str, dict[str, Any]]:
    """The table of docs/metrics.md: ``| `name` | type | `labels` | services | meaning |``."""
    rows: dict[str, dict[str, Any]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if not line.startswith("|") or len(cells) != 5 or not cells[0].startswith("`kaiku_"):
            continue
        name, kind, labels, where, meaning = cells
        assert meaning, f"{name} has no meaning in docs/metrics.md"
        rows[name.strip("`")] = {
            "type": kind,
            "labels": re.findall(r"`([a-z_]+)`", labels),
            "services": set(SERVICES) if where == "all" else {s.strip() for s in where.split(",")},
        }
    return rows


def test_docs_list_every_metric_and_only_those(services: dict[str, dict[str, Any]]) -> None:
    exposed_ = catalogue(services)
    names = {(f + "_total" if spec["type"] == "counter" else f): f for f, spec in exposed_.items()}
    doc = documented()
    assert sorted(doc) == sorted(names), "docs/metrics.md and the services disagree"
    for name, row in doc.items():
        spec = exposed_[names[name]]
        assert row["type"] == spec["type"], name
        assert sorted(row["labels"]) == sorted(spec["labels"]), name
        assert row["services"] == spec["services"], name


# -- behaviour ------------------------------------------------------------------------------------

TOKEN = "metrics-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}

PROGRAM = """
version: 1
surveys:
  - id: support-csat
    metric: csat
    question: {en: "How did we do?", fi: "Miten onnistuimme?", sv: "Hur gick det?"}
    reminder: {after: 1s}
  - id: relationship-nps
    metric: nps
    question: {en: "Would you recommend us?", fi: "Suosittelisitko?", sv: "Rekommendera?"}
triggers:
  - {id: solved-csat, event: ticket.solved, survey: support-csat}
  - {id: delivered-nps, event: order.delivered, survey: relationship-nps}
"""


def program() -> Program:
    return parse_program(PROGRAM)


def event(kind: str, customer: str, time: datetime) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"{kind}-{customer}-{uuid.uuid4().hex[:8]}",
        "source": "test://metrics",
        "type": kind,
        "time": time.isoformat(),
        "data": {"customer": {"id": customer, "email": f"{customer}@example.com", "locale": "en"}},
    }


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: httpx.AsyncClient, service: str) -> Samples:
    """The samples of ``service``'s own ``/metrics``."""
    response = await http.get(f"/{service}/metrics")
    assert response.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def change(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_event_to_send_counts_invitations_from_the_event_time_and_not_reminders(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    app = smtp_stack(kafka, postgres, program(), smtp_sink, TOKEN)
    async with running(*app.apps.values()), client(app) as http:
        before = await scrape(http, "dispatcher")
        # The event happened two minutes before it reached kaiku.
        solved = event("ticket.solved", "cust-late", datetime.now(UTC) - timedelta(minutes=2))
        assert (await http.post("/v1/events", json=solved, headers=AUTH)).status_code == 202
        # Nobody answers: the reminder follows a second after the invitation.
        await eventually(lambda: smtp_sink.count() >= 2, what="the invitation and its reminder")

        async def recorded() -> bool:  # the send is counted once its outcome is stored
            now = await scrape(http, "dispatcher")
            sent = change(before, now, "kaiku_invitations_sent_total",
                          channel="email", provider="smtp", kind="reminder")  # fmt: skip
            return sent == 1

        await eventually(recorded, what="the reminder counted as sent")
        after = await scrape(http, "dispatcher")

    email = {"channel": "email"}
    # One observation, for the invitation only, two minutes or more after the event's time
    # (the invitation's requested_at is seconds old: the event's time is what counts).
    assert change(before, after, "kaiku_event_to_send_seconds_count", **email) == 1
    assert change(before, after, "kaiku_event_to_send_seconds_sum", **email) >= 120
    assert change(before, after, "kaiku_event_to_send_seconds_bucket", **email, le="60.0") == 0
    assert change(before, after, "kaiku_event_to_send_seconds_bucket", **email, le="+Inf") == 1
    # The lag behind the planned send_at is observed for both messages, each in its kind.
    for kind in ("invitation", "reminder"):
        assert change(before, after, "kaiku_send_lag_seconds_count", **email, kind=kind) == 1
        sent = change(before, after, "kaiku_invitations_sent_total", **email, provider="smtp",
                      kind=kind)  # fmt: skip
        assert sent == 1
    assert smtp_sink.count() == 2


async def test_responses_are_counted_by_metric_kind_and_answer(
    kafka: KafkaSettings, postgres: DatabaseSettings, smtp_sink: SmtpSink
) -> None:
    app = smtp_stack(kafka, postgres, program(), smtp_sink, TOKEN)
    async with running(*app.apps.values()), client(app) as http:
        now = datetime.now(UTC)
        batch = [event("order.delivered", c, now) for c in ("cust-person", "cust-scanner")]
        assert (await http.post("/v1/events", json=batch, headers=AUTH)).status_code == 202
        await eventually(lambda: smtp_sink.count() >= 2, what="two invitations")
        paths = {m["To"].split("@")[0]: urlsplit(survey_link(m)).path for m in smtp_sink.messages}

        async def served(path: str) -> bool:
            return (await http.get(path)).status_code == 200

        for path in paths.values():  # the collector hears of the invitation on its own topic
            await eventually(functools.partial(served, path), what="the survey page")

        async def answer(path: str, score: str) -> int:
            return (await http.post(path, data={"score": score})).status_code

        before = await scrape(http, "collector")
        person, scanner = paths["cust-person"], paths["cust-scanner"]
        assert await answer(person, "9") == 303  # stored, on to the thank-you page
        assert await answer(person, "10") == 303  # changed: the last one counts
        # A link scanner follows the hidden trap link, then submits the form.
        assert (await http.get(f"{scanner}/trap")).status_code == 200
        assert await answer(scanner, "0") == 303
        # A refused answer is not stored, so not counted.
        assert await answer(person, "11") == 422
        after = await scrape(http, "collector")

    def responses(kind: str, answer: str) -> float:
        return change(before, after, "kaiku_responses_total", metric="nps", kind=kind,
                      answer=answer)  # fmt: skip

    assert responses("person", "new") == 1
    assert responses("person", "changed") == 1
    assert responses("suspected_bot", "new") == 1
    assert responses("suspected_bot", "changed") == 0
    assert change(before, after, "kaiku_responses_total", metric="csat", kind="person",
                  answer="new") == 0  # fmt: skip

"""deploy/compose/compose.yaml, checked without a Docker engine: the Compose Specification's
JSON Schema (as shipped by check-jsonschema), and what `docker compose up` depends on: KRaft
Kafka, the services built from deploy/Dockerfile, started after the migrations succeeded, settings
the services really read, and addresses that point at the containers that serve them."""

from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.deploy.support import COMPOSE, DOCKERFILE, ROOT, SERVICES, unknown_settings

APP_SERVICES = (*SERVICES, "migrate")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    text = COMPOSE.read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)  # YAML merge keys (<<) resolved as Compose does
    return data


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {k: str(v) for k, v in raw.items()}


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    errors = list(validator_class(schema).iter_errors(compose))
    assert not errors, "; ".join(f"{e.json_path}: {e.message}" for e in errors)
    assert {"kafka", "postgres", "mailpit", *APP_SERVICES} <= set(compose["services"])


def test_kafka_is_a_single_kraft_node(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    e = env(kafka)
    assert set(e["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert e["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{e['KAFKA_NODE_ID']}@kafka:9093"
    assert "CONTROLLER" in e["KAFKA_CONTROLLER_LISTENER_NAMES"]
    # A cluster id is a base64url UUID: 16 bytes.
    assert len(base64.urlsafe_b64decode(e["CLUSTER_ID"] + "==")) == 16
    assert not any("zookeeper" in name for name in compose["services"])
    assert not any("ZOOKEEPER" in key for key in e), "KRaft needs no ZooKeeper"
    assert kafka.get("healthcheck", {}).get("test")


def test_services_are_built_from_the_dockerfile_and_wait_for_the_migrations(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    images = set()
    for name in APP_SERVICES:
        s = services[name]
        build = s["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context is not the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        images.add(s["image"])
        # The same hardening as on Kubernetes: a read-only root filesystem and a writable /tmp.
        assert s.get("read_only") is True and "/tmp" in s.get("tmpfs", []), name
        assert "ALL" in s.get("cap_drop", []), name
    assert len(images) == 1, "the migrations and the services run one image"

    assert services["migrate"]["command"] == ["kaiku", "migrate"]
    assert "healthcheck" not in services["migrate"]  # a one-shot
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in SERVICES:
        s = services[name]
        assert s["command"] == ["python", "-m", f"services.{name}"]
        depends = s["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["kafka"]["condition"] == "service_healthy", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert s["healthcheck"]["test"], f"{name} has no healthcheck"
        assert "/readyz" in " ".join(s["healthcheck"]["test"])
    for name in ("kafka", "postgres", "mailpit"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"


def test_settings_are_real_and_point_at_the_right_containers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in APP_SERVICES:
        e = env(services[name])
        assert not unknown_settings(e), f"{name}: not kaiku settings: {unknown_settings(e)}"
        assert e["KAIKU_HOST"] == "0.0.0.0", name
        assert e["KAIKU_DATABASE_MIGRATE"] == "check", "the migrate service migrates, not they"
        # The broker as Kafka advertises it to other containers.
        advertised = env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
        listeners = {urlsplit(u).netloc for u in advertised.split(",")}
        assert e["KAIKU_KAFKA_BOOTSTRAP_SERVERS"] in listeners, name
        # PostgreSQL with its own user, password and database.
        pg = env(services["postgres"])
        url = urlsplit(e["KAIKU_DATABASE_URL"])
        assert url.scheme == "postgresql+asyncpg" and url.hostname == "postgres"
        assert (url.username, url.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
        assert url.path.lstrip("/") == pg["POSTGRES_DB"]
        # Mail goes to Mailpit's SMTP port.
        assert e["KAIKU_EMAIL_PROVIDER"] == "smtp"
        assert (e["KAIKU_SMTP_HOST"], e["KAIKU_SMTP_PORT"]) == ("mailpit", "1025")
        assert e["KAIKU_PROGRAM"].startswith("/etc/kaiku/")  # the program inside the image
    # Survey links in emails open the collector as published on this machine.
    public = urlsplit(env(services["collector"])["KAIKU_PUBLIC_URL"])
    published = {p.rsplit(":", 2)[-2:][0] for p in services["collector"]["ports"]}
    assert str(public.port) in published
    for name in SERVICES:
        port = env(services[name])["KAIKU_PORT"]
        assert all(p.endswith(f":{port}") for p in services[name]["ports"]), name


def test_compose_file_is_documented_at_the_top() -> None:
    head = COMPOSE.read_text(encoding="utf-8").split("\nname:", 1)[0]
    assert "docker compose -f deploy/compose/compose.yaml up --build" in head
    assert Path(COMPOSE).parent.name == "compose"

"""What the deployment tests share: the repository's paths, the real settings and routes of the
services, and small parsers (Kubernetes quantities and path matching, .dockerignore)."""

from __future__ import annotations

import importlib
import inspect
import re
import tomllib
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic_settings import BaseSettings
from starlette.routing import Match

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
SERVICES = ("trigger", "dispatcher", "collector")
# What customers, vendors and providers must reach from the internet (README.md, "HTTP"):
# survey pages, unsubscribe pages, vendors' webhooks, providers' receipts.
PUBLIC_PREFIXES = ("/s", "/u", "/v1/webhooks", "/v1/provider-events")


# -- settings ---------------------------------------------------------------------------------


def _subclasses(cls: type[BaseSettings]) -> Iterator[type[BaseSettings]]:
    sub: type[BaseSettings]
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


@cache
def kaiku_setting_names() -> frozenset[str]:
    """Every KAIKU_ environment variable the services read: the fields of every pydantic-settings
    class under ``services`` (prefix + name, or the field's alias), and the few read straight from
    the environment."""
    services = ROOT / "services"
    for path in sorted(services.rglob("*.py")):
        # Import only the modules that declare settings: a __main__ would start a service, and
        # Alembic's env.py runs only under Alembic.
        if path.name != "__main__.py" and "BaseSettings" in path.read_text(encoding="utf-8"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            importlib.import_module(module.removesuffix(".__init__"))
    names: set[str] = set()
    for cls in _subclasses(BaseSettings):
        if not cls.__module__.startswith("services."):
            continue
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, str):
                names.add(alias.upper())
            elif alias is None:
                names.add(f"{prefix}{field_name}".upper())
            else:  # AliasChoices
                names.update(
                    str(c).upper() for c in getattr(alias, "choices", ()) if isinstance(c, str)
                )
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "services").rglob("*.py"))
    names.update(re.findall(r"""environ(?:\.get)?[(\[]\s*["'](KAIKU_[A-Z0-9_]+)["']""", source))
    # CommonSettings.with_database(): KAIKU_<SERVICE>_DATABASE_URL and _SCHEMA.
    settings_source = inspect.getsource(importlib.import_module("services.common.settings"))
    for suffix in ("DATABASE_URL", "DATABASE_SCHEMA"):
        if f'f"KAIKU_{{service.upper()}}_{suffix}"' in settings_source:
            names.update(f"KAIKU_{s.upper()}_{suffix}" for s in SERVICES)
    return frozenset(n for n in names if n.startswith("KAIKU_"))


def unknown_settings(names: Iterable[str], extra: Iterable[str] = ()) -> list[str]:
    known = kaiku_setting_names() | set(extra)
    return sorted(n for n in names if n.startswith("KAIKU_") and n not in known)


def console_scripts() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return dict(tomllib.load(f)["project"]["scripts"])


# -- the services as built --------------------------------------------------------------------


def build_apps(topic_prefix: str, program_path: Path, workdir: Path) -> dict[str, FastAPI]:
    """The three FastAPI apps as ``python -m services.<name>`` builds them (nothing connects:
    the lifespan never runs), on the given program and topic prefix."""
    from services.collector.app import create_app as collector
    from services.common.config import DatabaseSettings, KafkaSettings
    from services.common.program import load_program
    from services.common.settings import CommonSettings
    from services.dispatcher.app import create_app as dispatcher
    from services.dispatcher.config import DispatcherSettings
    from services.trigger.app import create_app as trigger

    program = load_program(program_path)
    settings = CommonSettings(
        kafka=KafkaSettings(topic_prefix=topic_prefix, bootstrap_servers="127.0.0.1:9"),
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{workdir / 'unused.db'}"),
    )
    return {
        "trigger": trigger(settings, program=program),
        "dispatcher": dispatcher(
            settings, DispatcherSettings(outbox_dir=workdir / "outbox"), program=program
        ),
        "collector": collector(settings, program=program),
    }


def consumer_groups(app: FastAPI) -> set[tuple[str, str]]:
    """(consumer group, full topic name) of every consumer loop the app runs."""
    runtime = app.state.runtime
    return {(loop.group_id, loop.settings.topic(loop.topic)) for loop in runtime.loops}


def serves(app: FastAPI, path: str) -> bool:
    """Whether the app has a route for ``path`` (any method)."""
    for method in ("GET", "POST", "HEAD", "PATCH", "DELETE"):
        scope: dict[str, Any] = {
            "type": "http",
            "path": path,
            "method": method,
            "root_path": "",
            "headers": [],
        }
        if any(route.matches(scope)[0] is Match.FULL for route in app.router.routes):
            return True
    return False


def route_paths(app: FastAPI) -> set[str]:
    """Concrete request paths for every route of the app: its OpenAPI paths with the parameters
    filled in, plus the routes kept out of the schema (probes, metrics, docs, the dashboard)."""
    paths = {re.sub(r"\{[^}]+\}", "x1", p) for p in app.openapi()["paths"]}
    hidden = (
        *("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"),
        *("/dashboard", "/dashboard/login", "/dashboard/logout", "/dashboard/events"),
    )
    return paths | {p for p in hidden if serves(app, p)}


# -- Kubernetes -------------------------------------------------------------------------------


def prefix_matches(ingress_path: str, request_path: str) -> bool:
    """Ingress ``pathType: Prefix``: element-wise on ``/``-separated segments."""
    want = [s for s in ingress_path.split("/") if s]
    have = [s for s in request_path.split("/") if s]
    return have[: len(want)] == want


_SUFFIXES = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int | float) -> float:
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, f"not a quantity: {value!r}"
    number, suffix = match.groups()
    return float(number) * _SUFFIXES.get(suffix, 1.0) if suffix else float(number)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- .dockerignore ----------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out: the last matching pattern
    wins, ``!`` re-includes, and a pattern matching a directory matches everything below it."""
    parts = path.split("/")
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _glob_regex(raw.lstrip("!").strip("/"))
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

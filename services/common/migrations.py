"""Schema migrations (Alembic), one history per service.

Each service keeps its revisions in ``services/<name>/migrations/versions`` and records its
position in its own version table, ``alembic_version_<name>``, so the three services can share a
database (the embedded SQLite file) or each have their own. ``kaiku migrate`` and the migration
Job of the Kubernetes manifests run :func:`upgrade`; a service on start either migrates itself
(``KAIKU_DATABASE_MIGRATE=auto``, the embedded default) or only checks
(``KAIKU_DATABASE_MIGRATE=check``, production: the Job migrates, replicas never race), and in both
modes refuses to run against a schema newer than its code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

SERVICES = ("trigger", "dispatcher", "collector")

# Held while a service's schema is migrated, so replicas (or the Job and a replica) starting
# together on one PostgreSQL database never run the same migration twice.
MIGRATION_LOCK = 0x6B61696B75  # "kaiku"


class SchemaError(RuntimeError):
    """The database schema is not the one this release expects."""


def metadata(service: str) -> MetaData:
    if service == "trigger":
        from services.trigger.models import Base as TriggerBase

        return TriggerBase.metadata
    if service == "dispatcher":
        from services.dispatcher.models import Base as DispatcherBase

        return DispatcherBase.metadata
    if service == "collector":
        from services.collector.models import Base as CollectorBase

        return CollectorBase.metadata
    raise ValueError(f"unknown service {service!r}: one of {', '.join(SERVICES)}")


def version_table(service: str) -> str:
    return f"alembic_version_{service}"


def config(service: str, connection: Connection | None = None) -> Config:
    """The Alembic configuration of one service (no alembic.ini: everything is set here)."""
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(Path(__file__).resolve().parents[1] / service / "migrations")
    )
    cfg.attributes["service"] = service
    cfg.attributes["connection"] = connection
    return cfg


def for_dialect(dialect: str) -> Any:
    """An ``include_object`` for Alembic's comparisons: leaves out a model's object that is
    created on another dialect only (``ddl_if(dialect=...)``, which Alembic does not read),
    such as the collector's PostgreSQL-only covering index."""

    def include(obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        only = getattr(obj, "_ddl_if", None)
        return reflected or only is None or only.dialect in (None, dialect)

    return include


def configure_context(context: Any, service: str, connection: Connection) -> None:
    """What every service's ``env.py`` does: migrate ``connection`` (the search path already
    points at the service's schema) against the service's models."""
    context.configure(
        connection=connection,
        target_metadata=metadata(service),
        version_table=version_table(service),
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
        compare_server_default=True,
        include_object=for_dialect(connection.dialect.name),
    )


def head(service: str) -> str | None:
    return ScriptDirectory.from_config(config(service)).get_current_head()


def _current(connection: Connection, service: str) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": version_table(service)})
    return context.get_current_revision()


def _lock(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


def _known(service: str, revision: str | None) -> bool:
    if revision is None:
        return True
    script = ScriptDirectory.from_config(config(service))
    return any(r.revision == revision for r in script.walk_revisions())


def _check(connection: Connection, service: str) -> str | None:
    current, target = _current(connection, service), head(service)
    if not _known(service, current):
        raise SchemaError(
            f"the {service} schema is at revision {current}, which this release does not know: "
            f"the database was migrated by a newer release (this one's head is {target}). "
            "Refusing to run; deploy that release or restore a matching backup."
        )
    return current


async def _run(engine: AsyncEngine, schema: str | None, work: Any, *, create: bool = False) -> Any:
    async with engine.begin() as conn:
        if create and engine.dialect.name == "postgresql" and schema:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        return await conn.run_sync(work)


async def upgrade(
    engine: AsyncEngine, service: str, schema: str | None = None, revision: str = "head"
) -> tuple[str | None, str | None]:
    """Migrate one service's schema up to ``revision``; returns (before, after)."""

    def work(connection: Connection) -> tuple[str | None, str | None]:
        _lock(connection)
        before = _check(connection, service)
        command.upgrade(config(service, connection), revision)
        return before, _current(connection, service)

    before, after = await _run(engine, schema, work, create=True)
    if before != after:
        log.info("%s schema migrated from %s to %s", service, before or "empty", after)
    return before, after


async def downgrade(
    engine: AsyncEngine, service: str, schema: str | None = None, revision: str = "base"
) -> tuple[str | None, str | None]:
    """Migrate one service's schema down to ``revision`` (``base``: no tables)."""

    def work(connection: Connection) -> tuple[str | None, str | None]:
        _lock(connection)
        before = _check(connection, service)
        command.downgrade(config(service, connection), revision)
        return before, _current(connection, service)

    return await _run(engine, schema, work)  # type: ignore[no-any-return]


async def current(engine: AsyncEngine, service: str, schema: str | None = None) -> str | None:
    return await _run(engine, schema, lambda c: _current(c, service))  # type: ignore[no-any-return]


async def ensure_current(engine: AsyncEngine, service: str, schema: str | None = None) -> None:
    """Refuse to start unless the schema is exactly this release's head."""

    def work(connection: Connection) -> None:
        found, target = _check(connection, service), head(service)
        if found != target:
            raise SchemaError(
                f"the {service} schema is at revision {found or 'none (empty)'}, this release "
                f"needs {target}: run `kaiku migrate` (the migration Job) first"
            )

    await _run(engine, schema, work)


async def new_revision(
    engine: AsyncEngine, service: str, message: str, schema: str | None = None
) -> str:
    """Write a new revision of ``service`` from the difference between its models and the
    database (which must be at head): the developer's step after changing a model."""

    def work(connection: Connection) -> str:
        _lock(connection)
        cfg = config(service, connection)
        command.upgrade(cfg, "head")
        number = len(list(ScriptDirectory.from_config(cfg).walk_revisions())) + 1
        script = command.revision(cfg, message, autogenerate=True, rev_id=f"{number:04d}")
        assert script is not None and not isinstance(script, list)
        return str(script.path)

    return await _run(engine, schema, work, create=True)  # type: ignore[no-any-return]

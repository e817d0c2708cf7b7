"""Schema migrations: every service's history builds exactly its models' schema from an empty
database and takes it down again; a service refuses a schema it does not know, or (in check
mode) one that is behind; replicas migrating at once all come up; `kaiku migrate` works from the
command line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from services.common import migrations
from services.common.config import DatabaseSettings, KafkaSettings
from services.common.db import create_engine
from services.common.runtime import Runtime
from tests.conftest import ROOT
from tests.support import migration_module


def _schema_of(connection: Connection, service: str) -> dict[str, Any]:
    context = MigrationContext.configure(
        connection,
        opts={
            "version_table": migrations.version_table(service),
            "compare_type": True,
            "compare_server_default": True,
            "include_object": migrations.for_dialect(connection.dialect.name),
        },
    )
    return {
        "diff": compare_metadata(context, migrations.metadata(service)),
        "tables": set(inspect(connection).get_table_names()),
    }


@pytest.mark.parametrize("service", migrations.SERVICES)
async def test_up_equals_the_models_and_down_leaves_nothing(
    database: DatabaseSettings, service: str
) -> None:
    engine = create_engine(database)
    schema = database.schema_name
    try:
        before, after = await migrations.upgrade(engine, service, schema)
        assert (before, after) == (None, migrations.head(service))
        async with engine.connect() as conn:
            found = await conn.run_sync(lambda c: _schema_of(c, service))
        assert found["diff"] == [], f"{service}: migrations and models differ: {found['diff']}"
        models = set(migrations.metadata(service).tables)
        assert found["tables"] == models | {migrations.version_table(service)}

        # Again: nothing to do.
        assert await migrations.upgrade(engine, service, schema) == (after, after)
        await migrations.ensure_current(engine, service, schema)

        await migrations.downgrade(engine, service, schema, "base")
        async with engine.connect() as conn:
            left = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert left & models == set(), f"{service}: down left {left & models}"
        assert await migrations.current(engine, service, schema) is None
    finally:
        await engine.dispose()


async def test_the_month_sets_index_built_beforehand_concurrently_is_kept(
    postgres: DatabaseSettings,
) -> None:
    """docs/operations.md: an operator builds collector migration 0007's indexes with
    ``CREATE INDEX CONCURRENTLY`` before the migration Job (which would hold writes to the
    roll-ups while it builds them); the migration then finds them and the schema is the
    models'."""
    engine = create_engine(postgres)
    schema = postgres.schema_name
    try:
        assert await migrations.upgrade(engine, "collector", schema, "0006") == (None, "0006")
        module = migration_module("collector", "0007_month_sets_covering_index")
        async with engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in module.TABLES:
                statement = module.create_statement(table)
                concurrently = statement.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY")
                await autocommit.execute(text(concurrently))
        head = migrations.head("collector")
        assert await migrations.upgrade(engine, "collector", schema) == ("0006", head)
        async with engine.connect() as conn:
            found = await conn.run_sync(lambda c: _schema_of(c, "collector"))
            indexes = await conn.run_sync(
                lambda c: {i["name"] for i in inspect(c).get_indexes("collector_score_rollups")}
            )
        assert found["diff"] == []
        assert "ix_collector_score_rollups_month_sets" in indexes
    finally:
        await engine.dispose()


async def test_a_service_refuses_a_newer_schema_and_in_check_mode_an_older_one(
    postgres: DatabaseSettings, kafka: KafkaSettings
) -> None:
    check = postgres.model_copy(update={"migrate": "check"})
    runtime = Runtime(
        name="trigger", kafka=kafka, database=check, metadata=migrations.metadata("trigger")
    )
    try:
        with pytest.raises(migrations.SchemaError, match="run `kaiku migrate`"):
            await runtime.start()  # check mode, empty schema: the Job has not run
        await migrations.upgrade(runtime.engine, "trigger", postgres.schema_name)
        async with runtime.engine.begin() as conn:
            await conn.execute(
                text(f"UPDATE {migrations.version_table('trigger')} SET version_num = '9999'")
            )
        for mode in ("check", "auto"):
            with pytest.raises(migrations.SchemaError, match="newer release"):
                await migrations.ensure_current(runtime.engine, "trigger", postgres.schema_name)
            if mode == "auto":
                with pytest.raises(migrations.SchemaError, match="newer release"):
                    await migrations.upgrade(runtime.engine, "trigger", postgres.schema_name)
    finally:
        await runtime.engine.dispose()


async def test_replicas_migrating_at_once_all_come_up(postgres: DatabaseSettings) -> None:
    engines = [create_engine(postgres) for _ in range(4)]
    try:
        results = await asyncio.gather(
            *(migrations.upgrade(e, "dispatcher", postgres.schema_name) for e in engines),
            return_exceptions=True,
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        head = migrations.head("dispatcher")
        # Exactly one of them did the work; the others found the schema current.
        assert Counter(results) == {(None, head): 1, (head, head): 3}
    finally:
        for e in engines:
            await e.dispose()


def test_kaiku_migrate_from_the_command_line(postgres: DatabaseSettings) -> None:
    env = {
        **os.environ,
        "KAIKU_DATABASE_URL": postgres.url,
        "KAIKU_DATABASE_SCHEMA": postgres.schema_name or "",
    }

    def kaiku(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    checked = kaiku("migrate", "--check")
    assert checked.returncode == 1
    assert "run `kaiku migrate`" in checked.stderr
    first = kaiku("migrate")
    assert first.returncode == 0, first.stderr
    for service in migrations.SERVICES:
        assert f"{service}: base (empty) -> {migrations.head(service)}" in first.stdout
    again = kaiku("migrate")
    assert again.returncode == 0 and again.stdout.count("nothing to do") == 3
    assert kaiku("migrate", "--check").returncode == 0
    down = kaiku("migrate", "--service", "collector", "--downgrade", "base")
    assert down.returncode == 0, down.stderr
    assert f"collector: {migrations.head('collector')} -> base (no tables)" in down.stdout
    assert kaiku("migrate", "--check").returncode == 1

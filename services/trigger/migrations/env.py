"""Alembic environment of the trigger (see services/common/migrations.py): run by `kaiku migrate`
or on start, with the connection handed in; no alembic.ini, no offline mode."""

from alembic import context

from services.common.migrations import configure_context

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("run migrations with `kaiku migrate`, which provides the connection")
configure_context(context, "trigger", connection)
with context.begin_transaction():
    context.run_migrations()

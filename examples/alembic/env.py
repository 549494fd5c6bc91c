"""Alembic env.py for an app whose configured URL is a transaction pooler (Supabase 6543, PgBouncer): poolkit's recipe.

The app's queries go through the pooler (POOLKIT_POOLED_URL / DATABASE_URL); migrations run on the direct
URL (POOLKIT_DIRECT_URL), because autogenerate's catalog reads, DDL and Alembic's session need a real
session, which a transaction pooler does not give. Replace ``models`` with your app's module.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from models import Base  # your app's declarative base (or MetaData)

from poolkit.sqlalchemy import migration_engine

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: SQL text only; no connection, so no URL (and no password) needed."""
    context.configure(dialect_name="postgresql", target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Connect to the direct URL (ConfigError naming POOLKIT_DIRECT_URL if only a pooler is configured)."""
    engine = migration_engine()
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

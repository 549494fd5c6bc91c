"""The naive env.py (Alembic's async template) on the app's URL: the transaction pooler, asyncpg defaults.

tests/test_alembic.py runs it to show that migrations through PgBouncer fail or hang without poolkit.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from models import Base
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

target_metadata = Base.metadata


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(os.environ["NAIVE_DATABASE_URL"], poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


asyncio.run(run_async_migrations())

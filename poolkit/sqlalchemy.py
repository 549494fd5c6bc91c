"""Public import path of the SQLAlchemy engine helpers; the code is in ``poolkit/apps/sqlalchemy.py``."""

from __future__ import annotations

from poolkit.apps.sqlalchemy import create_async_engine, create_engine, engine_options, migration_engine

__all__ = ["create_async_engine", "create_engine", "engine_options", "migration_engine"]

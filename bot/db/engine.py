"""Async engines: SQLite made safe for several writers (WAL, BEGIN IMMEDIATE), or PostgreSQL through asyncpg."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from bot.db.models import Base  # noqa: F401  (models must be imported before metadata is used)


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return _create_postgres_engine(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": 30})
    _make_sqlite_transactional(engine)
    return engine


def _create_postgres_engine(url: str) -> AsyncEngine:
    """READ COMMITTED (the default) is enough: every claim is one SKIP LOCKED statement (bot/db/claims.py)
    and every other write one transaction fenced by attempt."""
    return create_async_engine(
        url,
        # A worker idles for hours between jobs; a connection the server or a firewall dropped
        # meanwhile is replaced instead of failing the next claim.
        pool_pre_ping=True,
        connect_args={
            # UTC, as on SQLite: timestamps read back the same on both databases, whatever the server's zone.
            "server_settings": {"timezone": "UTC", "application_name": "ltxbot"},
        },
    )


def _make_sqlite_transactional(engine: AsyncEngine) -> None:
    """SQLAlchemy's documented recipe: let us emit BEGIN, and make it IMMEDIATE.

    A deferred read-then-write transaction gets SQLITE_BUSY without waiting for the
    busy timeout when another connection wrote meanwhile; BEGIN IMMEDIATE takes the
    write lock first and waits its turn.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        # FULL, not NORMAL: with WAL + NORMAL a committed job can vanish after a power
        # loss, and "queued" is a promise we made to a user (sqlite.org/pragma.html).
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)

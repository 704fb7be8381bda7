"""Apply Alembic migrations in-process, on the same engine recipe the bot uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
# PostgreSQL advisory lock id for schema upgrades: "ltxbot" in ASCII, unlikely to meet another app's.
MIGRATION_LOCK_KEY = int.from_bytes(b"ltxbot", "big")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    await _run(engine, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    await _run(engine, command.downgrade, revision)


async def _run(engine: AsyncEngine, fn: Any, revision: str) -> None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))

    def _with_connection(connection: Any) -> None:
        cfg.attributes["connection"] = connection
        fn(cfg, revision)

    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Every worker migrates at start; workers started together would otherwise all try to
            # create the same tables. The lock ends with this transaction. (On SQLite, BEGIN
            # IMMEDIATE already lets one migrator in at a time.)
            await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        await connection.run_sync(_with_connection)

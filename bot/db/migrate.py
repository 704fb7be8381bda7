"""Apply Alembic migrations in-process, on the same engine recipe the bot uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


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
        await connection.run_sync(_with_connection)

"""The same Alembic migrations build the same schema on SQLite and PostgreSQL, and match the models on both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import create_engine
from bot.db.migrate import downgrade, upgrade
from bot.db.models import Base
from tests.conftest import ROOT, clean_env

TABLES = ("jobs", "settings")


def _schema(sync: Any) -> dict[str, Any]:
    inspector = inspect(sync)
    schema: dict[str, Any] = {}
    for table in TABLES:
        schema[table] = {
            "columns": {
                # as_generic(): INTEGER on one and SERIAL-backed INTEGER on the other both read Integer,
                # DATETIME and TIMESTAMP both DateTime.
                col["name"]: (type(col["type"].as_generic()).__name__, getattr(col["type"], "length", None),
                              col["nullable"])
                for col in inspector.get_columns(table)
            },
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            # PostgreSQL also lists the index behind each unique constraint; SQLite does not.
            "indexes": sorted((ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
                              for ix in inspector.get_indexes(table) if not ix.get("duplicates_constraint")),
            "unique": sorted(tuple(uq["column_names"]) for uq in inspector.get_unique_constraints(table)),
        }
    return schema


async def _reflect(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        return await conn.run_sync(_schema)


async def _drift(engine: AsyncEngine) -> list[Any]:
    """What autogenerate would add to make the database match the models: nothing, when they agree."""
    async with engine.connect() as conn:
        return await conn.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), Base.metadata))


async def test_head_schemas_match_across_databases_and_models(tmp_path: Path, pg_url: str) -> None:
    sqlite = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    postgres = create_engine(pg_url)
    try:
        await upgrade(sqlite)
        await upgrade(postgres)
        on_sqlite, on_postgres = await _reflect(sqlite), await _reflect(postgres)
        assert on_postgres == on_sqlite
        assert on_postgres["jobs"]["columns"]["created_at"][0] == "DateTime"
        assert await _drift(postgres) == []
        assert await _drift(sqlite) == []
    finally:
        await sqlite.dispose()
        await postgres.dispose()


async def test_postgres_upgrade_and_downgrade_round_trip(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        for _ in range(2):
            await upgrade(engine)
            await downgrade(engine, "base")
            async with engine.connect() as conn:
                tables = set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))
            assert tables <= {"alembic_version"}
        await upgrade(engine)
    finally:
        await engine.dispose()


_UPGRADE = (
    "import asyncio, sys\n"
    "from bot.db.engine import create_engine\n"
    "from bot.db.migrate import upgrade\n"
    "async def main():\n"
    "    engine = create_engine(sys.argv[1])\n"
    "    sys.stdin.readline()\n"
    "    await upgrade(engine)\n"
    "    await engine.dispose()\n"
    "asyncio.run(main())\n"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


async def test_workers_starting_together_migrate_once(db_url: str) -> None:
    """Every worker upgrades the schema at start; several starting at once must not trip over each other."""
    procs = [subprocess.Popen([sys.executable, "-c", _UPGRADE, db_url], cwd=ROOT, env=clean_env(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    errors = []
    for proc in procs:
        _out, err = proc.communicate(timeout=240)
        if proc.returncode != 0:
            errors.append(err.strip().splitlines()[-1])
    assert errors == []
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            assert set(await conn.run_sync(lambda sync: inspect(sync).get_table_names())) >= set(TABLES)
    finally:
        await engine.dispose()

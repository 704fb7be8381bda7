from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import inspect

from bot.db.engine import create_engine
from bot.db.migrate import downgrade, upgrade


async def _tables(engine) -> set[str]:  # type: ignore[no-untyped-def]
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))


async def test_upgrade_to_head_and_back_to_base(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await upgrade(engine)
    assert {"jobs", "settings", "alembic_version"} <= await _tables(engine)
    await downgrade(engine, "base")
    assert await _tables(engine) <= {"alembic_version"}
    await upgrade(engine)
    assert "jobs" in await _tables(engine)
    await engine.dispose()


async def test_sqlite_pragmas_are_set_on_every_connection(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    async with engine.connect() as conn:
        values = [
            (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
        ]
    assert values == ["wal", 1, 30000, 2]  # synchronous 2 = FULL
    await engine.dispose()


async def test_0002_adds_the_supervisor_columns_and_standbys_and_keeps_existing_jobs(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'm2.db'}")
    await upgrade(engine, "0001")
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO jobs (user_id, prompt, params, input_path, input_sha256, status, attempts, cancel_requested,"
            " created_at) VALUES ('u', 'waves', '{}', '/x.png', '0', 'running', 1, 0, '2026-11-22 00:00:00')"
        )
    await upgrade(engine)

    def columns(sync: Any) -> set[str]:
        return {c["name"] for c in inspect(sync).get_columns("jobs")}

    async with engine.connect() as conn:
        assert {"supervisor_host", "supervisor_pid", "supervisor_start_ticks"} <= await conn.run_sync(columns)
        row = (await conn.exec_driver_sql("SELECT prompt, supervisor_pid FROM jobs")).one()
    assert tuple(row) == ("waves", None)  # a job claimed before 0002 has no supervisor: recovery takes it
    assert "standbys" in await _tables(engine)
    await downgrade(engine, "0001")
    assert "standbys" not in await _tables(engine)
    async with engine.connect() as conn:
        assert "supervisor_pid" not in await conn.run_sync(columns)
    await engine.dispose()

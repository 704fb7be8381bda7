"""The doorbell wakes idle workers when a job is queued: in-process on SQLite, LISTEN/NOTIFY on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from bot.db.doorbell import APPLICATION_NAME, Doorbell, PostgresDoorbell
from bot.db.migrate import upgrade
from bot.db.store import DuplicateJobError, JobStore, NewJob


def new_job(interaction_id: str | None = None) -> NewJob:
    return NewJob(user_id="u1", prompt="waves", params={}, input_path="/x.png", input_sha256="0" * 64,
                  interaction_id=interaction_id)


@pytest.fixture
async def front_and_worker(pg_url: str) -> AsyncIterator[tuple[JobStore, JobStore]]:
    """Two stores on one PostgreSQL database, as a front end and a worker on two hosts would have."""
    front, worker = JobStore.from_url(pg_url), JobStore.from_url(pg_url)
    await upgrade(front.engine)
    yield front, worker
    await front.close()
    await worker.close()


async def test_sqlite_create_rings_the_in_process_bell(store: JobStore) -> None:
    assert type(store.doorbell) is Doorbell
    assert not await store.doorbell.wait(0.05)
    await store.create(new_job())
    assert await store.doorbell.wait(0.05)
    assert not await store.doorbell.wait(0.05)  # one ring wakes one wait


async def test_a_job_queued_by_another_store_rings_at_once(front_and_worker: tuple[JobStore, JobStore]) -> None:
    front, worker = front_and_worker
    bell = worker.doorbell
    assert isinstance(bell, PostgresDoorbell)
    assert await bell.listening(10)
    await bell.wait(0)  # the ring every (re)connection gives, for jobs queued while nobody listened
    assert not await bell.wait(0.3)
    started = time.monotonic()
    await front.create(new_job())
    assert await bell.wait(5)
    assert time.monotonic() - started < 2  # a ring, not the worker's next poll
    assert (await worker.claim_next()) is not None


async def test_a_rolled_back_create_rings_nobody(front_and_worker: tuple[JobStore, JobStore]) -> None:
    front, worker = front_and_worker
    await front.create(new_job("123"))
    assert await worker.doorbell.wait(5)
    await worker.doorbell.wait(0.3)  # whatever else the connect or the first job rang
    with pytest.raises(DuplicateJobError):
        await front.create(new_job("123"))
    assert not await worker.doorbell.wait(0.5)


async def test_the_bell_reconnects_after_losing_its_connection(front_and_worker: tuple[JobStore, JobStore]) -> None:
    front, worker = front_and_worker
    bell = worker.doorbell
    assert isinstance(bell, PostgresDoorbell)
    bell._retry = 0.1  # the production back-off starts at a second
    assert await bell.listening(10)
    await bell.wait(0)
    async with front.engine.connect() as conn:
        ended = await conn.scalar(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = :name AND datname = current_database()"), {"name": APPLICATION_NAME})
    assert ended == 1
    # The new connection rings once (it cannot know what was queued meanwhile) ...
    assert await bell.wait(10)
    assert await bell.listening(10)
    # ... and then hears new jobs again.
    await front.create(new_job())
    assert await bell.wait(5)


async def test_close_stops_listening(front_and_worker: tuple[JobStore, JobStore]) -> None:
    front, worker = front_and_worker
    assert await worker.doorbell.listening(10)  # type: ignore[attr-defined]
    await worker.doorbell.close()
    await asyncio.sleep(0.2)
    async with front.engine.connect() as conn:
        left = await conn.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND datname = current_database()"),
            {"name": APPLICATION_NAME})
    assert left == 0

"""A worker-like claimer process for the race tests: ``python -m tests.support.claimer DATABASE_URL``.

It opens its own store, says ``ready``, waits for a line on stdin (so that every claimer starts
together), claims until the queue answers empty, and prints one JSON line: the ids it claimed,
and how many jobs it could still have had once it was told the queue was empty (0 unless a
claim missed one): queued rows that no other claimer holds locked. A row another claimer is
taking at that moment is not one it missed, and under load such a claim can still be in flight.
"""

from __future__ import annotations

import asyncio
import json
import sys

from sqlalchemy import select

from bot.db.models import Job, JobStatus
from bot.db.store import JobStore


async def _claimable(store: JobStore) -> int:
    query = select(Job.id).where(Job.status == JobStatus.QUEUED)
    if store.engine.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    async with store.engine.begin() as conn:
        return len((await conn.execute(query)).all())


async def main(url: str) -> None:
    store = JobStore.from_url(url)
    await store.is_paused()  # connect before the start line, so the race is over claims, not connects
    print("ready", flush=True)
    sys.stdin.readline()
    claimed: list[int] = []
    while (job := await store.claim_next()) is not None:
        claimed.append(job.id)
    left = await _claimable(store)
    await store.close()
    print(json.dumps({"claimed": claimed, "queued_after_empty": left}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

"""Four claimer processes race over one queue: every job is claimed exactly once, with no lock errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sqlalchemy import select

from bot.db.migrate import upgrade
from bot.db.models import Job, JobStatus
from bot.db.store import JobStore, NewJob
from tests.conftest import ROOT, clean_env

CLAIMERS = 4
JOBS = 200
# What a lost race looks like in a claimer's output on either database.
TROUBLE = ("could not serialize", "deadlock", "lock", "traceback", "error")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


async def test_four_processes_claim_each_of_200_jobs_exactly_once(db_url: str) -> None:
    store = JobStore.from_url(db_url)
    await upgrade(store.engine)
    # Several users, so the fairness ordering is under the race too.
    ids = [(await store.create(NewJob(user_id=f"u{i % 5}", prompt="p", params={}, input_path="/x.png",
                                      input_sha256="0" * 64))).id for i in range(JOBS)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.support.claimer", db_url], cwd=ROOT, env=clean_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(CLAIMERS)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            assert not [word for word in TROUBLE if word in err.lower()], err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    together = [job_id for result in results for job_id in result["claimed"]]
    assert len(together) == len(set(together)) == JOBS
    assert sorted(together) == ids
    # None was told "empty" while a job it could have taken still waited.
    assert [result["queued_after_empty"] for result in results] == [0] * CLAIMERS
    assert sum(1 for result in results if result["claimed"]) >= 2, "no race happened: one process took everything"
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(Job.status, Job.attempts))).all()
    assert {(row.status, row.attempts) for row in rows} == {(JobStatus.RUNNING, 1)}
    await store.close()

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from bot.db.migrate import upgrade
from bot.db.models import EndCode, Job, JobStatus
from bot.db.store import DELIVERY_WINDOW, CancelOutcome, DuplicateJobError, JobStore, NewJob, utcnow
from bot.processes import ProcessId, host_name


@pytest.fixture(params=["sqlite", "postgresql"])
def db_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both databases the store supports."""
    backend: str = request.param
    return backend


def new_job(user: str = "u1", **extra: object) -> NewJob:
    return NewJob(user_id=user, prompt="waves", params={"frames": 9}, input_path="/x.png", input_sha256="0" * 64,
                  **extra)  # type: ignore[arg-type]


async def test_create_claim_finish_records_everything(store: JobStore) -> None:
    job = await store.create(new_job())
    assert job.status == JobStatus.QUEUED and job.attempts == 0
    claimed = await store.claim_next()
    assert claimed is not None and claimed.id == job.id
    assert claimed.status == JobStatus.RUNNING and claimed.attempts == 1
    assert await store.claim_next() is None
    assert await store.finish(job.id, 1, output_path="/c.mp4", output_bytes=10, phases=[{"name": "x"}])
    done = await store.get(job.id)
    assert done is not None and done.status == JobStatus.SUCCEEDED and done.output_bytes == 10
    assert done.finished_at is not None and done.phases == [{"name": "x"}]


async def test_late_write_from_an_old_attempt_changes_nothing(store: JobStore) -> None:
    job = await store.create(new_job())
    await store.claim_next()
    assert await store.fail(job.id, 1, code="crashed", message="boom", retry=True, max_attempts=3) == JobStatus.QUEUED
    await store.claim_next()  # attempt 2
    assert not await store.finish(job.id, 1, output_path="/old.mp4", output_bytes=1, phases=[])
    assert await store.fail(job.id, 1, code="crashed", message="x", retry=True, max_attempts=3) is None
    current = await store.get(job.id)
    assert current is not None and current.status == JobStatus.RUNNING and current.attempts == 2


async def test_fail_retries_until_attempts_run_out(store: JobStore) -> None:
    job = await store.create(new_job())
    statuses = []
    for attempt in (1, 2):
        await store.claim_next()
        statuses.append(await store.fail(job.id, attempt, code="timeout", message="slow", retry=True, max_attempts=2))
    assert statuses == [JobStatus.QUEUED, JobStatus.FAILED]
    final = await store.get(job.id)
    assert final is not None and [h["code"] for h in final.history or []] == ["timeout", "timeout"]
    other = await store.create(new_job())
    await store.claim_next()
    assert await store.fail(other.id, 1, code="oom", message="m", retry=False, max_attempts=3) == JobStatus.FAILED


async def test_cancel_queued_and_running(store: JobStore) -> None:
    running = await store.create(new_job())
    queued = await store.create(new_job())
    await store.claim_next()
    assert await store.cancel(queued.id, "someone-else") == CancelOutcome.NOT_FOUND
    assert await store.cancel(queued.id, "u1") == CancelOutcome.CANCELLED
    assert await store.claim_next() is None
    assert await store.cancel(running.id, "admin", is_admin=True) == CancelOutcome.STOPPING
    assert await store.cancel_requested(running.id)
    assert await store.mark_cancelled(running.id, 1)
    assert await store.cancel(running.id, "u1") == CancelOutcome.FINISHED


async def test_two_claimers_claim_each_of_100_jobs_exactly_once(db_url: str) -> None:
    first, second = JobStore.from_url(db_url), JobStore.from_url(db_url)
    await upgrade(first.engine)
    ids = [(await first.create(new_job())).id for _ in range(100)]
    claimed: dict[str, list[int]] = {"a": [], "b": []}

    async def claimer(name: str, store: JobStore) -> None:
        while (job := await store.claim_next()) is not None:
            claimed[name].append(job.id)
            await asyncio.sleep(0)

    await asyncio.gather(claimer("a", first), claimer("b", second), claimer("a", first), claimer("b", second))
    together = claimed["a"] + claimed["b"]
    assert sorted(together) == ids
    assert claimed["a"] and claimed["b"]
    await first.close()
    await second.close()


async def test_recover_orphans_requeues_then_fails_and_is_idempotent(store: JobStore) -> None:
    young = await store.create(new_job())
    old = await store.create(new_job())
    await store.claim_next()
    await store.claim_next()
    # Simulate a crash: both are left running. "old" has used up its attempts.
    for _ in range(2):
        await store.fail(old.id, (await store.get(old.id)).attempts, code="crashed", message="x",  # type: ignore[union-attr]
                         retry=True, max_attempts=3)
        await store.claim_next(only_id=old.id)
    recovered = await store.recover_orphans(max_attempts=3)
    assert {j.id for j in recovered} == {young.id, old.id}
    young_now, old_now = await store.get(young.id), await store.get(old.id)
    assert young_now is not None and young_now.status == JobStatus.QUEUED
    assert old_now is not None and old_now.status == JobStatus.FAILED and old_now.error_code == "interrupted"
    assert await store.recover_orphans(max_attempts=3) == []


async def test_get_refuses_other_users_jobs_but_not_admins(store: JobStore) -> None:
    job = await store.create(new_job("alice"))
    assert await store.get(job.id, "bob") is None
    assert await store.get(job.id, "alice") is not None
    assert await store.get(job.id, "bob", is_admin=True) is not None


async def test_history_is_newest_first_and_paged(store: JobStore) -> None:
    ids = [(await store.create(new_job("alice"))).id for _ in range(25)]
    await store.create(new_job("bob"))
    page1 = await store.history("alice", 1, page_size=10)
    page3 = await store.history("alice", 3, page_size=10)
    assert [j.id for j in page1] == ids[::-1][:10]
    assert [j.id for j in page3] == ids[::-1][20:]
    assert all(j.user_id == "alice" for j in page1 + page3)


async def test_queue_position_and_pause(store: JobStore) -> None:
    a, b = await store.create(new_job()), await store.create(new_job())
    assert await store.queue_position(a.id) == 1
    assert await store.queue_position(b.id) == 2
    await store.claim_next()
    assert await store.queue_position(a.id) is None
    assert await store.queue_position(b.id) == 1
    c = await store.create(new_job("bob"))
    # Fair order, as the claim takes them: bob has had nothing started yet, so his job goes first.
    assert await store.queued_ids() == [c.id, b.id]
    assert await store.queue_position(c.id) == 1 and await store.queue_position(b.id) == 2
    assert await store.queued_ids("bob") == [c.id] and await store.queued_ids("nobody") == []
    assert (await store.claim_next()).id == c.id  # type: ignore[union-attr]
    assert not await store.is_paused()
    await store.set_paused(True)
    assert await store.is_paused()
    # The pause holds inside the claim itself (a worker's check before it claims can be stale):
    # the queue's claims take nothing, a named job (`ltxbot animate`) still runs.
    d = await store.create(new_job("carol"))
    assert await store.claim_next(unless_paused=True) is None
    assert await store.queued_ids() == [d.id, b.id]
    assert (await store.claim_next(only_id=b.id)).id == b.id  # type: ignore[union-attr]
    await store.set_paused(False)
    assert not await store.is_paused()
    assert (await store.claim_next(unless_paused=True)).id == d.id  # type: ignore[union-attr]


async def test_replayed_interaction_creates_no_second_job(store: JobStore) -> None:
    first = await store.create(new_job(interaction_id="123"))
    try:
        await store.create(new_job(interaction_id="123"))
    except DuplicateJobError as exc:
        assert exc.job.id == first.id
    else:
        raise AssertionError("a replayed interaction created a second job")
    assert len(await store.history(None)) == 1


async def test_a_delivery_is_recorded_once(store: JobStore) -> None:
    job = await store.create(new_job())
    assert await store.mark_delivered(job.id, "111", "https://discord.com/channels/1/2/111")
    assert not await store.mark_delivered(job.id, "222", "https://discord.com/channels/1/2/222")
    stored = await store.get(job.id)
    assert stored is not None and stored.posted_message_id == "111"


async def test_limits_queries_count_one_user_and_the_right_window(store: JobStore) -> None:
    from datetime import UTC, datetime, timedelta

    before = datetime.now(UTC) - timedelta(seconds=1)
    a1 = await store.create(new_job("alice"))
    await store.create(new_job("alice"))
    await store.create(new_job("bob"))
    assert await store.active_count("alice") == 2
    await store.cancel(a1.id, "alice")
    assert await store.active_count("alice") == 1
    assert await store.created_since("alice", before) == 2  # cancelled jobs still count toward the quota
    assert await store.created_since("alice", datetime.now(UTC) + timedelta(seconds=1)) == 0
    last = await store.last_created_at("alice")
    assert last is not None and last.tzinfo is not None and before <= last <= datetime.now(UTC)
    assert await store.last_created_at("nobody") is None
    assert await store.queued_ids() == [2, 3]


async def test_recent_durations_and_undelivered(store: JobStore) -> None:
    job = await store.create(new_job(channel_id="c1"))
    silent = await store.create(new_job())  # a local job: never posted anywhere
    for expected in (job, silent):
        claimed = await store.claim_next()
        assert claimed is not None and claimed.id == expected.id
        await store.finish(claimed.id, 1, output_path="/c.mp4", output_bytes=1, phases=[])
    durations = await store.recent_durations()
    assert len(durations) == 2 and all(d >= 0 for d in durations)
    assert [j.id for j in await store.undelivered()] == [job.id]
    await store.mark_delivered(job.id, "m1", "https://discord.com/channels/g/c1/m1")
    assert await store.undelivered() == []
    # A clip that finished long ago is not posted into a channel that has moved on.
    stale = await store.create(new_job(channel_id="c1"))
    await store.claim_next()
    await store.finish(stale.id, 1, output_path="/c.mp4", output_bytes=1, phases=[])
    assert [j.id for j in await store.undelivered()] == [stale.id]
    async with store.engine.begin() as conn:
        await conn.execute(update(Job).where(Job.id == stale.id).values(
            finished_at=utcnow() - DELIVERY_WINDOW - timedelta(hours=1)))
    assert await store.undelivered() == []


async def test_purge_anonymises_and_keeps_images_other_users_share(store: JobStore) -> None:
    shared = NewJob(user_id="bob", prompt="bob's", params={"prompt": "bob's"}, input_path="/up/shared.png",
                    input_sha256="1" * 64)
    mine = NewJob(user_id="alice", prompt="secret", params={"prompt": "secret"}, input_path="/up/shared.png",
                  input_sha256="1" * 64)
    own = NewJob(user_id="alice", prompt="secret 2", params={"prompt": "secret 2"}, input_path="/up/own.png",
                 input_sha256="2" * 64)
    await store.create(shared)
    running = await store.create(mine)
    queued = await store.create(own)
    await store.claim_next(only_id=running.id)
    result = await store.purge_user("alice")
    assert sorted(result.jobs) == [running.id, queued.id]
    assert result.images == ["/up/own.png"]  # the shared image is Bob's too
    assert result.running == 1
    for job_id in result.jobs:
        job = await store.get(job_id)
        assert job is not None and job.user_id == "purged" and job.prompt == "" and job.params["prompt"] == ""
    assert (await store.get(queued.id)).status == JobStatus.CANCELLED  # type: ignore[union-attr]
    assert await store.cancel_requested(running.id)
    assert await store.history("alice") == []


async def test_release_on_a_deliberate_stop_requeues_and_returns_the_attempt(store: JobStore) -> None:
    job = await store.create(new_job())
    claimed = await store.claim_next()
    assert claimed is not None and claimed.attempts == 1
    assert not await store.release(job.id, attempt=2)  # a stale attempt changes nothing
    assert await store.release(job.id, attempt=1)
    back = await store.get(job.id)
    assert back is not None and back.status == JobStatus.QUEUED and back.attempts == 0
    assert back.started_at is None and [h["code"] for h in back.history or []] == ["stopped"]
    assert not await store.release(job.id, attempt=1)  # no longer running
    again = await store.claim_next()
    assert again is not None and again.id == job.id and again.attempts == 1
    await store.cancel(job.id, None)  # a cancel asked for while running wins over the stop
    assert await store.release(job.id, attempt=1)
    ended = await store.get(job.id)
    assert ended is not None and ended.status == JobStatus.CANCELLED


async def test_claims_take_turns_across_users(store: JobStore) -> None:
    """User A queues ten jobs, then user B one: B's job is claimed second, not eleventh."""
    a_jobs = [(await store.create(new_job("alice"))).id for _ in range(10)]
    b_job = (await store.create(new_job("bob"))).id
    claimed = []
    while (job := await store.claim_next()) is not None:
        claimed.append(job.id)
    assert claimed[:2] == [a_jobs[0], b_job]
    assert claimed[2:] == a_jobs[1:]  # a user's own jobs run oldest first


async def test_fair_order_predicts_the_claims(store: JobStore) -> None:
    """The order /queue can show is the order claims take, with users who ran recently at the back."""
    from sqlalchemy import select

    from bot.db.claims import fair_order

    early = await store.create(new_job("carol"))
    await store.claim_next()
    await store.finish(early.id, 1, output_path="/c.mp4", output_bytes=1, phases=[])
    for user in ("alice", "carol", "bob", "alice", "carol", "alice", "bob", "dave"):
        await store.create(new_job(user))
    async with store.engine.connect() as conn:
        queued = [(row.id, row.user_id) for row in await conn.execute(
            select(Job.id, Job.user_id).where(Job.status == JobStatus.QUEUED))]
        last = {row.user_id: row.started_at for row in await conn.execute(
            select(Job.user_id, Job.started_at).where(Job.started_at.is_not(None)))}
    predicted = fair_order(queued, last)
    claimed = []
    while (job := await store.claim_next()) is not None:
        claimed.append(job.id)
    assert claimed == predicted
    users = dict(queued)
    assert [users[i] for i in claimed[:4]] == ["alice", "bob", "dave", "carol"]  # carol ran before: last


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    """A real process that stays alive: the supervisor of a job some other bot is running."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def dead_process() -> ProcessId:
    proc = subprocess.Popen(["true"])
    ticks = ProcessId.of(proc.pid).start_ticks
    proc.wait()
    return ProcessId(host_name(), proc.pid, ticks)


async def test_recovery_takes_back_only_jobs_whose_supervisor_is_gone(
    store: JobStore, live_process: subprocess.Popen[bytes]
) -> None:
    live = ProcessId.of(live_process.pid)
    dead = dead_process()
    elsewhere = ProcessId("another-host", 1, 1)
    kept, orphan, remote, mine = [await store.create(new_job()) for _ in range(4)]
    me = ProcessId.current()
    for job, owner in ((kept, live), (orphan, dead), (remote, elsewhere), (mine, me)):
        claimed = await store.claim_next(only_id=job.id, supervisor=owner)
        assert claimed is not None and (claimed.supervisor_pid, claimed.supervisor_host) == (owner.pid, owner.host)
    recovered = await store.recover_orphans(max_attempts=3, me=me)
    # This process runs no attempt while it recovers: its own running job is an orphan too. On
    # SQLite (one machine) another host name means this machine was renamed (a recreated
    # container), so that supervisor is gone; on PostgreSQL it is another host's to recover.
    remote_recovered = store.one_host
    assert sorted(j.id for j in recovered) == sorted([orphan.id, mine.id] + ([remote.id] if remote_recovered else []))
    remote_status = JobStatus.QUEUED if remote_recovered else JobStatus.RUNNING
    for job_id, status in ((kept.id, JobStatus.RUNNING), (remote.id, remote_status),
                           (orphan.id, JobStatus.QUEUED), (mine.id, JobStatus.QUEUED)):
        now = await store.get(job_id)
        assert now is not None and now.status == status
    back = await store.get(orphan.id)
    assert back is not None and back.supervisor_pid is None and back.error_code == EndCode.INTERRUPTED
    assert await store.recover_orphans(max_attempts=3, me=me) == []


async def test_every_ending_forgets_the_attempts_processes(store: JobStore) -> None:
    """finish, fail, mark_cancelled and release all clear the generator and supervisor of the attempt."""
    endings = {
        "finish": lambda j: store.finish(j, 1, output_path="/c.mp4", output_bytes=1, phases=[]),
        "fail": lambda j: store.fail(j, 1, code=EndCode.CRASHED, message="x", retry=True, max_attempts=3),
        "mark_cancelled": lambda j: store.mark_cancelled(j, 1),
        "release": lambda j: store.release(j, 1),
    }
    for name, end in endings.items():
        job = await store.create(new_job())
        await store.claim_next(only_id=job.id)
        assert await store.record_process(job.id, 1, 4242, 99)
        assert await end(job.id), name
        after = await store.get(job.id)
        assert after is not None, name
        leftovers = (after.generator_pid, after.generator_start_ticks, after.supervisor_host, after.supervisor_pid,
                     after.supervisor_start_ticks)
        assert leftovers == (None,) * 5, name


async def test_standbys_of_a_dead_supervisor_are_handed_over_once(
    store: JobStore, live_process: subprocess.Popen[bytes]
) -> None:
    live, dead = ProcessId.of(live_process.pid), dead_process()
    await store.record_standby(live, ProcessId(host_name(), 111, 1))
    await store.record_standby(dead, ProcessId(host_name(), 222, 2))
    await store.record_standby(dead, ProcessId(host_name(), 333, 3))  # replaces its earlier one
    assert await store.take_orphaned_standbys() == [ProcessId(host_name(), 333, 3)]
    assert await store.take_orphaned_standbys() == []  # the live supervisor's standby is kept
    async with store.engine.connect() as conn:
        assert (await conn.exec_driver_sql("SELECT pid FROM standbys")).scalars().all() == [111]
    await store.forget_standby(live)
    async with store.engine.connect() as conn:
        assert (await conn.exec_driver_sql("SELECT pid FROM standbys")).scalars().all() == []

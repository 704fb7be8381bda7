"""JobStore: the only writer of job state. Each method is one transaction.

Attempt fencing: ``attempts`` goes up when a job is claimed, and every write of a
result names the attempt it belongs to (``WHERE id = ? AND attempts = ?``), so a
late write from an attempt that lost its claim changes nothing.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import BigInteger, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from bot.db.claims import fair_order, next_queued_id
from bot.db.doorbell import make_doorbell
from bot.db.engine import create_engine, session_factory
from bot.db.models import (
    ACTIVE_STATUSES,
    Blob,
    DraftStep,
    EndCode,
    Job,
    JobStatus,
    Setting,
    Standby,
    WorkerRecord,
    WorkerState,
)
from bot.processes import ProcessId, host_name
from generator.protocol import UPLOAD_FIELDS

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

T = TypeVar("T")

PAUSED_KEY = "queue_paused"
PURGED_USER = "purged"
# A clip still undelivered after this long is not posted any more: the channel has moved on.
DELIVERY_WINDOW = timedelta(days=2)


def input_key(sha256: str) -> str:
    """The blob of an input image, named by its content like its file."""
    return f"input:{sha256}"


def clip_key(job_id: int) -> str:
    return f"clip:{job_id}"


def draft_key(job_id: int) -> str:
    """A draft's kept latents, for a finalize on another host."""
    return f"draft:{job_id}"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class NewJob:
    user_id: str
    prompt: str
    params: dict[str, Any]
    input_path: str
    input_sha256: str
    negative_prompt: str | None = None
    guild_id: str | None = None
    channel_id: str | None = None
    interaction_id: str | None = None
    request_message_id: str | None = None
    max_bytes: int | None = None
    predicted_peak_gib: float | None = None
    draft: str | None = None
    draft_of: int | None = None


class CancelOutcome(enum.StrEnum):
    CANCELLED = "cancelled"  # it was queued and will never run
    STOPPING = "stopping"  # it is running; the worker stops it
    FINISHED = "finished"  # too late: it already ended
    NOT_FOUND = "not_found"  # no such job for this user


def upload_files(input_path: str, params: dict[str, Any]) -> set[str]:
    """A job's other uploads (end image, source clip, audio): files beside its first image, named in its request."""
    if not input_path:
        return set()
    return {str(Path(input_path).with_name(name)) for field in UPLOAD_FIELDS
            if isinstance(name := params.get(field), str) and name}


@dataclass(frozen=True)
class PurgeResult:
    jobs: list[int]
    images: list[str]
    running: int


@dataclass(frozen=True)
class UserUsage:
    """One user's jobs, as the per-user limits count them."""

    active: int  # queued plus running
    created_last_day: int  # every job of the last 24 hours, cancelled ones too
    last_created_at: datetime | None
    gpu_seconds_last_day: float = 0.0  # generator phase seconds of jobs started in the last 24 hours


@dataclass(frozen=True)
class ClaimingWorker:
    """What a worker's claim needs to know about it."""

    id: str
    families: tuple[str, ...]
    lease_seconds: float
    vram_budget_gib: float | None = None


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker registers: where it runs and what it can render."""

    id: str
    name: str
    host: str
    pid: int
    gpu: int | None
    gpu_name: str | None
    vram_budget_gib: float | None
    families: list[str]
    libraries: dict[str, str]


class DuplicateJobError(Exception):
    """The interaction that asked for this job already created one."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} already exists for this interaction")
        self.job = job


class JobStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions: async_sessionmaker[AsyncSession] = session_factory(engine)
        # Idle workers await it; create() rings it in the job's own transaction.
        self.doorbell = make_doorbell(engine)

    @property
    def one_host(self) -> bool:
        """SQLite is one file on one machine: every process on it runs on this host."""
        return self.engine.dialect.name == "sqlite"

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(create_engine(url))

    async def close(self) -> None:
        await self.doorbell.close()
        await self.engine.dispose()

    # --- creating and reading -------------------------------------------------

    async def create(self, new: NewJob, *, admit: Callable[[UserUsage], None] | None = None) -> Job:
        """Insert a queued job; it is committed before this returns.

        ``admit`` sees the user's usage inside the inserting transaction and raises to refuse
        the job, so per-user limits hold however many requests of one user overlap: the
        transaction takes the writer's lock first (SQLite's BEGIN IMMEDIATE, see
        ``bot/db/engine.py``; on PostgreSQL a transaction-scoped advisory lock on the user).
        A job that already exists for ``new.interaction_id`` raises DuplicateJobError first.
        """
        job = Job(
            user_id=new.user_id,
            guild_id=new.guild_id,
            channel_id=new.channel_id,
            interaction_id=new.interaction_id,
            request_message_id=new.request_message_id,
            prompt=new.prompt,
            negative_prompt=new.negative_prompt,
            params=new.params,
            family=str(new.params.get("family", "ltx2")),
            predicted_peak_gib=new.predicted_peak_gib,
            input_path=new.input_path,
            input_sha256=new.input_sha256,
            status=JobStatus.QUEUED,
            attempts=0,
            max_bytes=new.max_bytes,
            draft=new.draft,
            draft_of=new.draft_of,
            created_at=utcnow(),
            history=[],
        )
        existing: Job | None = None
        try:
            async with self._sessions.begin() as session:
                await _lock_user(session, new.user_id)
                if new.interaction_id is not None:
                    existing = await session.scalar(select(Job).where(Job.interaction_id == new.interaction_id))
                if existing is None:
                    if admit is not None:
                        admit(await _usage(session, new.user_id, utcnow()))
                    session.add(job)
                    await self.doorbell.announce(session)
        except IntegrityError:
            if new.interaction_id is None:
                raise
            existing = await self._by_interaction(new.interaction_id)
            if existing is None:
                raise
            raise DuplicateJobError(existing) from None
        if existing is not None:
            # Committed, not rolled back: the row read keeps its attributes outside the session.
            raise DuplicateJobError(existing)
        return job

    async def usage(self, user_id: str) -> UserUsage:
        """What one user has now, as ``create``'s ``admit`` sees it (for a quick answer before the insert)."""
        async with self._sessions() as session:
            return await _usage(session, user_id, utcnow())

    async def for_interaction(self, interaction_id: str) -> Job | None:
        """The job an interaction (or a mention, ``m<message id>``) already created, if any."""
        return await self._by_interaction(interaction_id)

    async def _by_interaction(self, interaction_id: str) -> Job | None:
        async with self._sessions() as session:
            result = await session.scalars(select(Job).where(Job.interaction_id == interaction_id))
            return result.first()

    async def get(self, job_id: int, user_id: str | None = None, *, is_admin: bool = False) -> Job | None:
        """The job, if ``user_id`` owns it (or the caller is an admin, or no user is given)."""
        async with self._sessions() as session:
            job = await session.get(Job, job_id)
        if job is None or (user_id is not None and not is_admin and job.user_id != user_id):
            return None
        return job

    async def history(self, user_id: str | None, page: int = 1, page_size: int = 10) -> list[Job]:
        """Newest first; ``user_id=None`` lists everyone's (admin and local CLI)."""
        query = select(Job).order_by(Job.id.desc()).offset((max(page, 1) - 1) * page_size).limit(page_size)
        if user_id is not None:
            query = query.where(Job.user_id == user_id)
        async with self._sessions() as session:
            return list(await session.scalars(query))

    async def queue_position(self, job_id: int) -> int | None:
        """1 for the next job to run; None when the job is not queued."""
        order = await self.queued_ids()
        return order.index(job_id) + 1 if job_id in order else None

    async def queued_ids(self, user_id: str | None = None) -> list[int]:
        """Queued job ids in the order the fair claim will take them (only ``user_id``'s when given)."""
        async with self._sessions() as session:
            queued = [(job_id, user) for job_id, user in
                      (await session.execute(select(Job.id, Job.user_id).where(Job.status == JobStatus.QUEUED))).all()]
            users = {user for _, user in queued}
            starts = (await session.execute(
                select(Job.user_id, func.max(Job.started_at)).where(Job.user_id.in_(users)).group_by(Job.user_id)
            )).all() if users else []
        last_started = {user: _aware(at) for user, at in starts if at is not None}
        order = fair_order(queued, {user: at for user, at in last_started.items() if at is not None})
        if user_id is None:
            return order
        owners = dict(queued)
        return [job_id for job_id in order if owners[job_id] == user_id]

    async def active_count(self, user_id: str) -> int:
        """Queued plus running jobs of one user."""
        async with self._sessions() as session:
            count = await session.scalar(
                select(func.count(Job.id)).where(Job.user_id == user_id, Job.status.in_(ACTIVE_STATUSES))
            )
        return int(count or 0)

    async def created_since(self, user_id: str, since: datetime) -> int:
        async with self._sessions() as session:
            count = await session.scalar(
                select(func.count(Job.id)).where(Job.user_id == user_id, Job.created_at >= since)
            )
        return int(count or 0)

    async def last_created_at(self, user_id: str) -> datetime | None:
        async with self._sessions() as session:
            value = await session.scalar(select(func.max(Job.created_at)).where(Job.user_id == user_id))
        return _aware(value)

    async def recent_durations(self, limit: int = 20) -> list[float]:
        """Seconds from start to finish of the latest successful jobs, newest first."""
        query = (
            select(Job)
            .where(Job.status == JobStatus.SUCCEEDED, Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .order_by(Job.id.desc())
            .limit(limit)
        )
        async with self._sessions() as session:
            jobs = list(await session.scalars(query))
        return [d for d in (job.duration_seconds for job in jobs) if d is not None]

    async def running(self) -> list[Job]:
        async with self._sessions() as session:
            return list(await session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)))

    # --- the worker's transitions ---------------------------------------------

    async def claim_next(
        self, only_id: int | None = None, *, supervisor: ProcessId | None = None, worker: ClaimingWorker | None = None,
        unless_paused: bool = False,
    ) -> Job | None:
        """Atomically move the next queued job (fair across users) to running and count the attempt.

        One statement, so two claimers can never take the same job; how each database keeps
        concurrent claimers apart, and the fairness order, are in bot/db/claims.py. The claiming
        process (``supervisor``, by default this one) is recorded: recovery leaves the job
        alone while that process lives. A ``worker`` claims only what it can run (its families,
        its VRAM budget) and holds the job for its lease, renewed by its heartbeat.

        ``unless_paused``: nothing is claimed while the queue is paused, decided in the same
        statement. A worker's own check before it claims leaves a window in which an admin can
        pause and a job be queued, and the claim then took that job from the paused queue.
        """
        owner = supervisor or ProcessId.current()
        families = worker.families if worker is not None else None
        budget = worker.vram_budget_gib if worker is not None else None
        next_id = next_queued_id(self.engine.dialect.name, only_id, families=families, vram_budget_gib=budget)
        lease_until = utcnow() + timedelta(seconds=worker.lease_seconds) if worker is not None else None
        claimable = [Job.id == next_id, Job.status == JobStatus.QUEUED]
        if unless_paused:
            claimable.append(~exists().where(Setting.key == PAUSED_KEY, Setting.value == "1"))
        statement = (
            update(Job)
            .where(*claimable)
            .values(
                status=JobStatus.RUNNING,
                attempts=Job.attempts + 1,
                started_at=utcnow(),
                generator_pid=None,
                generator_start_ticks=None,
                supervisor_host=owner.host,
                supervisor_pid=owner.pid,
                supervisor_start_ticks=owner.start_ticks,
                worker_id=worker.id if worker is not None else None,
                lease_until=lease_until,
                progress=None,
                phases=None,
            )
            .returning(Job)
            .execution_options(synchronize_session=False)
        )
        async with self._sessions.begin() as session:
            return (await session.scalars(statement)).first()

    async def capabilities(self, live_after: datetime) -> dict[str, float | None]:
        """Per family, the largest VRAM budget among workers heard from since ``live_after`` (None: any size)."""
        async with self._sessions() as session:
            rows = await session.scalars(select(WorkerRecord).where(
                WorkerRecord.heartbeat_at >= live_after, WorkerRecord.state != WorkerState.STOPPED))
            served: dict[str, float | None] = {}
            for row in rows:
                for family in row.families:
                    add_capability(served, family, row.vram_budget_gib)
            return served

    async def queued_since(self, before: datetime) -> list[Job]:
        """Queued jobs created before ``before``."""
        async with self._sessions() as session:
            return list(await session.scalars(
                select(Job).where(Job.status == JobStatus.QUEUED, Job.created_at < before).order_by(Job.id)))

    async def refuse_queued(self, job_id: int, message: str) -> Job | None:
        """Fail a job that is still queued because nothing can render it; None when it is not queued any more."""
        async with self._sessions.begin() as session:
            job = await session.get(Job, job_id, with_for_update=True)
            if job is None or job.status != JobStatus.QUEUED:
                return None
            _settle(job, JobStatus.FAILED, EndCode.INVALID, message)
            return job

    async def renew_lease(self, job_id: int, attempt: int, worker_id: str, seconds: float) -> bool:
        """Extend this attempt's claim; False when the attempt no longer holds the job (taken back, ended)."""
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.RUNNING,
                       Job.worker_id == worker_id)
                .values(lease_until=utcnow() + timedelta(seconds=seconds))
            )
            return bool(getattr(result, "rowcount", 0))

    async def recover_expired(self, max_attempts: int) -> list[Job]:
        """Running jobs whose worker stopped renewing its lease go back to the queue (or fail when out of attempts).

        Any worker may run this: a lease that has run out means its worker is gone or cut off, and
        its late writes are fenced by the attempt. Jobs without a lease (claimed without a worker
        record) are left to the supervisor checks of ``recover_orphans``.
        """
        async with self._sessions.begin() as session:
            expired = list(await session.scalars(
                select(Job).where(Job.status == JobStatus.RUNNING, Job.lease_until.is_not(None),
                                  Job.lease_until < utcnow()).with_for_update(skip_locked=True)
            ))
            for job in expired:
                message = "The worker rendering this clip stopped answering."
                _record_attempt(job, EndCode.INTERRUPTED, message)
                _count_gpu_time(job)
                if job.attempts >= max_attempts:
                    _settle(job, JobStatus.FAILED, EndCode.INTERRUPTED,
                            f"{message} It was tried {job.attempts} times; please try again.")
                else:
                    _settle(job, JobStatus.QUEUED, EndCode.INTERRUPTED, message)
            if expired:
                await self.doorbell.announce(session)
            return expired

    async def record_process(self, job_id: int, attempt: int, pid: int, start_ticks: int | None) -> bool:
        return await self._fenced(job_id, attempt, generator_pid=pid, generator_start_ticks=start_ticks)

    async def update_progress(self, job_id: int, attempt: int, progress: dict[str, Any]) -> bool:
        return await self._fenced(job_id, attempt, progress=progress)

    async def record_phases(self, job_id: int, attempt: int, phases: list[dict[str, Any]]) -> bool:
        return await self._fenced(job_id, attempt, phases=phases)

    async def finish(
        self, job_id: int, attempt: int, *, output_path: str, output_bytes: int, phases: list[dict[str, Any]],
        draft_kept_until: datetime | None = None,
    ) -> bool:
        """``draft_kept_until``: a draft's latents are kept until then (the sweep deletes them)."""

        def succeed(job: Job) -> bool:
            job.output_path = output_path
            job.output_bytes = output_bytes
            job.phases = phases
            if job.draft == DraftStep.DRAFT:
                job.draft_kept_until = draft_kept_until
            job.progress = {"stage": "done", "step": 1, "total": 1}
            _count_gpu_time(job)
            _settle(job, JobStatus.SUCCEEDED)
            return True

        return await self._in_attempt(job_id, attempt, succeed) is not None

    async def fail(
        self, job_id: int, attempt: int, *, code: EndCode, message: str, retry: bool, max_attempts: int
    ) -> JobStatus | None:
        """End an attempt that did not succeed; requeue it when ``retry`` and attempts remain.

        Returns the job's new status, or None when the attempt no longer owns the job.
        """

        def end(job: Job) -> JobStatus:
            _record_attempt(job, code, message)
            _count_gpu_time(job)
            requeue = retry and job.attempts < max_attempts
            _settle(job, JobStatus.QUEUED if requeue else JobStatus.FAILED, code, message)
            return JobStatus(job.status)

        return await self._in_attempt(job_id, attempt, end)

    async def mark_cancelled(self, job_id: int, attempt: int) -> bool:
        def end(job: Job) -> bool:
            _record_attempt(job, EndCode.CANCELLED, "Cancelled while running.")
            _count_gpu_time(job)
            _settle(job, JobStatus.CANCELLED, EndCode.CANCELLED, "Cancelled.")
            return True

        return await self._in_attempt(job_id, attempt, end) is not None

    async def release(self, job_id: int, attempt: int) -> bool:
        """The bot is stopping on purpose: a running job goes back to the queue with its attempt returned."""

        def end(job: Job) -> bool:
            message = "The bot was stopped while this clip was rendering; it renders again when the bot is back."
            _record_attempt(job, EndCode.STOPPED, message)
            _count_gpu_time(job)
            _settle(job, JobStatus.QUEUED, EndCode.STOPPED, message)
            if job.status == JobStatus.QUEUED:
                job.attempts = attempt - 1
                job.started_at = None
            return True

        return await self._in_attempt(job_id, attempt, end) is not None

    async def cancel(self, job_id: int, user_id: str | None, *, is_admin: bool = False) -> CancelOutcome:
        """Cancel a queued job at once, or ask the worker to stop a running one."""
        async with self._sessions.begin() as session:
            job = await session.get(Job, job_id)
            if job is None or (user_id is not None and not is_admin and job.user_id != user_id):
                return CancelOutcome.NOT_FOUND
            if job.status == JobStatus.QUEUED:
                _settle(job, JobStatus.CANCELLED, EndCode.CANCELLED, "Cancelled before it started.")
                return CancelOutcome.CANCELLED
            if job.status == JobStatus.RUNNING:
                job.cancel_requested = True
                return CancelOutcome.STOPPING
            return CancelOutcome.FINISHED

    async def cancel_requested(self, job_id: int) -> bool:
        async with self._sessions() as session:
            return bool(await session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))

    async def recover_orphans(self, max_attempts: int, me: ProcessId | None = None) -> list[Job]:
        """Running jobs whose supervising process is gone go back to the queue, or fail when out of attempts.

        A job supervised by a live process (a bot beside this ``ltxbot animate``) is left alone.
        ``me`` is the recovering process: it runs no attempt yet, so its own running jobs are orphans.
        Idempotent: a second run finds no orphan and changes nothing.
        """
        me = me or ProcessId.current()
        async with self._sessions.begin() as session:
            running = await session.scalars(select(Job).where(Job.status == JobStatus.RUNNING).with_for_update())
            orphans = [job for job in running if is_orphaned(job, me, one_host=self.one_host)]
            for job in orphans:
                message = "The bot stopped while this clip was rendering."
                _record_attempt(job, EndCode.INTERRUPTED, message)
                _count_gpu_time(job)
                if job.attempts >= max_attempts:
                    final = f"{message} It was tried {job.attempts} times; please try again."
                    _settle(job, JobStatus.FAILED, EndCode.INTERRUPTED, final)
                else:
                    _settle(job, JobStatus.QUEUED, EndCode.INTERRUPTED, message)
            return orphans

    # --- standby generators ---------------------------------------------------

    async def record_standby(self, supervisor: ProcessId, standby: ProcessId) -> None:
        """``standby`` is now ``supervisor``'s waiting generator (replacing any earlier one)."""
        async with self._sessions.begin() as session:
            await session.execute(_standbys_of(supervisor))
            session.add(Standby(
                supervisor_host=supervisor.host, supervisor_pid=supervisor.pid,
                supervisor_start_ticks=supervisor.start_ticks, pid=standby.pid, start_ticks=standby.start_ticks,
            ))

    async def forget_standby(self, supervisor: ProcessId) -> None:
        async with self._sessions.begin() as session:
            await session.execute(_standbys_of(supervisor))

    async def take_orphaned_standbys(self) -> list[ProcessId]:
        """Forget the standbys on this host whose supervisor is gone; the caller ends them.

        Unlike a job, a live process's standby is never an orphan: it is waiting, not lost.
        """
        async with self._sessions.begin() as session:
            rows = list(await session.scalars(
                select(Standby).where(Standby.supervisor_host == host_name()).with_for_update()
            ))
            taken = []
            for row in rows:
                owner = ProcessId(row.supervisor_host, row.supervisor_pid, row.supervisor_start_ticks)
                if not owner.is_alive():
                    taken.append(ProcessId(row.supervisor_host, row.pid, row.start_ticks))
                    await session.delete(row)
            return taken

    # --- workers --------------------------------------------------------------

    async def register_worker(self, info: WorkerInfo) -> None:
        """Record (or re-record, after a restart of the same process id) a worker as idle and alive."""
        now = utcnow()
        async with self._sessions.begin() as session:
            row = await session.get(WorkerRecord, info.id)
            if row is None:
                row = WorkerRecord(id=info.id, clips_rendered=0, started_at=now)
                session.add(row)
            row.name, row.host, row.pid, row.gpu = info.name, info.host, info.pid, info.gpu
            row.gpu_name, row.vram_budget_gib = info.gpu_name, info.vram_budget_gib
            row.families, row.libraries = list(info.families), dict(info.libraries)
            row.state, row.current_job_id, row.drain_requested, row.heartbeat_at = WorkerState.IDLE, None, False, now

    async def worker_heartbeat(
        self, worker_id: str, state: WorkerState, current_job_id: int | None = None, *, rendered: int = 0,
        gpu_name: str | None = None, libraries: dict[str, str] | None = None,
    ) -> bool:
        """Note that the worker is alive and what it does; True when an admin asked it to drain."""
        async with self._sessions.begin() as session:
            row = await session.get(WorkerRecord, worker_id)
            if row is None:
                return False
            row.heartbeat_at = utcnow()
            row.state = WorkerState.DRAINING if row.drain_requested and state != WorkerState.STOPPED else state
            row.current_job_id = current_job_id
            row.clips_rendered += rendered
            if gpu_name:
                row.gpu_name = gpu_name
            if libraries:
                row.libraries = dict(libraries)
            return bool(row.drain_requested)

    async def workers(self) -> list[WorkerRecord]:
        """Every registered worker, the newest heartbeat first."""
        async with self._sessions() as session:
            return list(await session.scalars(select(WorkerRecord).order_by(WorkerRecord.heartbeat_at.desc())))

    async def request_drain(self, name_or_id: str) -> list[WorkerRecord]:
        """Ask the live workers of that name (or id) to finish their clip and take no more; those asked."""
        async with self._sessions.begin() as session:
            rows = list(await session.scalars(
                select(WorkerRecord).where(or_(WorkerRecord.id == name_or_id, WorkerRecord.name == name_or_id),
                                           WorkerRecord.state != WorkerState.STOPPED)
            ))
            for row in rows:
                row.drain_requested = True
            return rows

    # --- files shared between hosts ----------------------------------------------

    async def put_blob(self, key: str, data: bytes, sha256: str) -> None:
        """Store (or replace) a blob. Two requests storing the same image at once both succeed."""
        try:
            async with self._sessions.begin() as session:
                row = await session.get(Blob, key)
                if row is None:
                    session.add(Blob(key=key, sha256=sha256, size=len(data), data=data, created_at=utcnow()))
                elif row.sha256 != sha256:
                    row.sha256, row.size, row.data, row.created_at = sha256, len(data), data, utcnow()
        except IntegrityError:
            # Another process inserted the key between our read and our insert: same key, its content
            # is for that process to have written; replace it only if ours differs.
            async with self._sessions.begin() as session:
                await session.execute(
                    update(Blob).where(Blob.key == key, Blob.sha256 != sha256)
                    .values(sha256=sha256, size=len(data), data=data, created_at=utcnow())
                )

    async def has_blob(self, key: str) -> bool:
        async with self._sessions() as session:
            return await session.scalar(select(Blob.key).where(Blob.key == key)) is not None

    async def get_blob(self, key: str) -> tuple[bytes, str] | None:
        """The blob's bytes and sha256, or None."""
        async with self._sessions() as session:
            row = (await session.execute(select(Blob.data, Blob.sha256).where(Blob.key == key))).first()
        return None if row is None else (bytes(row[0]), str(row[1]))

    async def delete_blobs(self, keys: list[str]) -> None:
        if keys:
            async with self._sessions.begin() as session:
                await session.execute(delete(Blob).where(Blob.key.in_(keys)))

    # --- delivery -------------------------------------------------------------

    async def set_status_message(self, job_id: int, message_id: str) -> None:
        async with self._sessions.begin() as session:
            await session.execute(update(Job).where(Job.id == job_id).values(status_message_id=message_id))

    async def undelivered(self) -> list[Job]:
        """Ended jobs from Discord whose clip or failure notice was never posted."""
        query = (
            select(Job)
            .where(
                Job.status.in_((JobStatus.SUCCEEDED, JobStatus.FAILED)),
                Job.posted_message_id.is_(None),
                Job.channel_id.is_not(None),
                Job.finished_at >= utcnow() - DELIVERY_WINDOW,
            )
            .order_by(Job.id)
        )
        async with self._sessions() as session:
            return list(await session.scalars(query))

    async def mark_delivered(self, job_id: int, message_id: str, url: str) -> bool:
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.posted_message_id.is_(None))
                .values(posted_message_id=message_id, posted_message_url=url)
            )
            # Posted: the front end holds the clip now, so the database copy for other hosts goes.
            await session.execute(delete(Blob).where(Blob.key == clip_key(job_id)))
            return bool(getattr(result, "rowcount", 0))

    # --- drafts ----------------------------------------------------------------

    async def finalize_of(self, draft_id: int) -> Job | None:
        """The newest finalize of a draft that is queued, running or done (a failed one may be tried again)."""
        query = (
            select(Job)
            .where(Job.draft == DraftStep.FINALIZE, Job.draft_of == draft_id,
                   Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED)))
            .order_by(Job.id.desc())
            .limit(1)
        )
        async with self._sessions() as session:
            return await session.scalar(query)

    async def kept_drafts(self, *, expired_at: datetime | None = None) -> list[int]:
        """Drafts whose latents are kept (only those expired at ``expired_at``, when given)."""
        query = select(Job.id).where(Job.draft_kept_until.is_not(None))
        if expired_at is not None:
            query = query.where(Job.draft_kept_until <= expired_at)
        async with self._sessions() as session:
            return list(await session.scalars(query.order_by(Job.id)))

    async def forget_drafts(self, job_ids: list[int]) -> None:
        """These drafts' latents are deleted: a Finalize of them is refused from now on."""
        if not job_ids:
            return
        async with self._sessions.begin() as session:
            await session.execute(update(Job).where(Job.id.in_(job_ids)).values(draft_kept_until=None))

    # --- queue control ---------------------------------------------------------

    async def set_paused(self, paused: bool) -> None:
        async with self._sessions.begin() as session:
            await session.merge(Setting(key=PAUSED_KEY, value="1" if paused else "0"))

    async def is_paused(self) -> bool:
        async with self._sessions() as session:
            value = await session.scalar(select(Setting.value).where(Setting.key == PAUSED_KEY))
        return value == "1"

    # --- privacy ---------------------------------------------------------------

    async def purge_user(self, user_id: str) -> PurgeResult:
        """Cancel a user's queued jobs, stop a running one, and anonymise every row.

        Returns the files that only this user's jobs referenced: the caller deletes them.
        Images are named by content, so one shared with another user's job is kept.
        """
        async with self._sessions.begin() as session:
            jobs = list(await session.scalars(select(Job).where(Job.user_id == user_id)))
            inputs = {job.input_path for job in jobs if job.input_path}.union(
                *(upload_files(job.input_path, job.params) for job in jobs))
            shared = set(
                await session.scalars(
                    select(Job.input_path).where(Job.user_id != user_id, Job.input_path.in_(inputs))
                )
            )
            shas = {job.input_sha256 for job in jobs if job.input_sha256}
            kept_shas = set(
                await session.scalars(
                    select(Job.input_sha256).where(Job.user_id != user_id, Job.input_sha256.in_(shas))
                )
            )
            blobs = [input_key(sha) for sha in shas - kept_shas] + [clip_key(job.id) for job in jobs] + [
                draft_key(job.id) for job in jobs]
            await session.execute(delete(Blob).where(Blob.key.in_(blobs)))
            if any(job.params.get(field) for job in jobs for field in UPLOAD_FIELDS):
                # These uploads live in params (docs/DESIGN.md, 'Modes'); rare enough to scan the others' rows.
                others = await session.execute(
                    select(Job.input_path, Job.params).where(Job.user_id != user_id)
                )
                shared = shared.union(*(upload_files(path, params) for path, params in others))
            running = 0
            for job in jobs:
                if job.status == JobStatus.QUEUED:
                    _settle(job, JobStatus.CANCELLED, EndCode.CANCELLED, "Cancelled: the user's data was purged.")
                elif job.status == JobStatus.RUNNING:
                    job.cancel_requested = True
                    running += 1
                job.user_id = PURGED_USER
                job.prompt = ""
                job.negative_prompt = None
                job.params = {**job.params, "prompt": "", "negative_prompt": None}
                job.input_sha256 = ""
                job.draft_kept_until = None  # its folder, latents included, is deleted
        return PurgeResult(
            jobs=[job.id for job in jobs],
            images=sorted(inputs - shared),
            running=running,
        )

    async def _in_attempt(self, job_id: int, attempt: int, change: Callable[[Job], T]) -> T | None:
        """Apply ``change`` to the job if ``attempt`` still owns it (running, same attempt); else None."""
        async with self._sessions.begin() as session:
            job = await session.get(Job, job_id, with_for_update=True)
            if job is None or job.attempts != attempt or job.status != JobStatus.RUNNING:
                return None
            return change(job)

    async def _fenced(self, job_id: int, attempt: int, **values: Any) -> bool:
        async with self._sessions.begin() as session:
            result = await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.RUNNING)
                .values(**values)
            )
            return bool(getattr(result, "rowcount", 0))


async def _lock_user(session: AsyncSession, user_id: str) -> None:
    """Serialise one user's inserts. SQLite's BEGIN IMMEDIATE already serialises every writer."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"ltxbot-user:{user_id}".encode()).digest()[:8], "big", signed=True)
        # A bigint: the driver would otherwise bind the key as a 32-bit integer.
        await session.execute(select(func.pg_advisory_xact_lock(bindparam("user_lock", key, type_=BigInteger))))


async def _usage(session: AsyncSession, user_id: str, now: datetime) -> UserUsage:
    mine = Job.user_id == user_id
    active = await session.scalar(select(func.count(Job.id)).where(mine, Job.status.in_(ACTIVE_STATUSES)))
    recent = await session.scalar(select(func.count(Job.id)).where(mine, Job.created_at >= now - timedelta(days=1)))
    last = await session.scalar(select(func.max(Job.created_at)).where(mine))
    gpu = await session.scalar(
        select(func.sum(Job.gpu_seconds)).where(mine, Job.started_at >= now - timedelta(days=1))
    )
    return UserUsage(active=int(active or 0), created_last_day=int(recent or 0), last_created_at=_aware(last),
                     gpu_seconds_last_day=float(gpu or 0.0))


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes even for timezone-aware columns; they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def add_capability(served: dict[str, float | None], family: str, budget: float | None) -> None:
    """Note that a worker with ``budget`` (None: any size) renders ``family``; the largest budget wins."""
    if budget is None or (family in served and served[family] is None):
        served[family] = None
    else:
        served[family] = max(budget, served.get(family) or 0.0)


def is_orphaned(job: Job, me: ProcessId, *, one_host: bool = False) -> bool:
    """A running job nobody supervises: its claiming process is gone, or is ``me`` (which runs nothing yet).

    Jobs claimed before supervisors were recorded have none and count as orphans. A supervisor on
    another host cannot be checked from here and is taken to be alive, except on a ``one_host``
    database (SQLite: one file on one machine), where another host name means this machine's
    name changed, as a recreated container's does, and that supervisor is gone.
    """
    if job.supervisor_host is None or job.supervisor_pid is None:
        return True
    owner = ProcessId(job.supervisor_host, job.supervisor_pid, job.supervisor_start_ticks)
    if one_host and not owner.on_this_host:
        return True
    return owner == me or not owner.is_alive()


def _standbys_of(supervisor: ProcessId) -> Any:
    return delete(Standby).where(
        Standby.supervisor_host == supervisor.host, Standby.supervisor_pid == supervisor.pid,
        Standby.supervisor_start_ticks == supervisor.start_ticks,
    )


def _record_attempt(job: Job, code: EndCode, message: str) -> None:
    """The running attempt ended without a result: one history entry, in its own words."""
    job.history = [*(job.history or []), _history_entry(job.attempts, code, message)]


def _settle(job: Job, status: JobStatus, code: EndCode | None = None, message: str | None = None) -> None:
    """The one way a job leaves ``running`` or ``queued``: status, reason and end time together.

    The attempt's processes are forgotten, and a cancel asked for while the job ran wins over any
    ending but success (the clip exists; the user gets it).
    """
    if job.cancel_requested and status != JobStatus.SUCCEEDED:
        status, code, message = JobStatus.CANCELLED, EndCode.CANCELLED, "Cancelled."
    job.status = status
    job.error_code = code
    job.error_message = message
    job.finished_at = None if status in ACTIVE_STATUSES else utcnow()
    job.generator_pid = None
    job.generator_start_ticks = None
    job.supervisor_host = None
    job.supervisor_pid = None
    job.supervisor_start_ticks = None
    job.worker_id = None
    job.lease_until = None


def _count_gpu_time(job: Job) -> None:
    """Add the ending attempt's measured phase seconds to the job's GPU time (the daily budget counts it)."""
    seconds = sum(float(p.get("seconds") or 0.0) for p in job.phases or [])
    job.gpu_seconds = round((job.gpu_seconds or 0.0) + seconds, 3)


def _history_entry(attempt: int, code: str, message: str) -> dict[str, Any]:
    return {"attempt": attempt, "code": code, "message": message, "at": utcnow().isoformat()}

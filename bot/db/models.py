"""The job table: the durable record of every request, its attempts and its result."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Double, Index, Integer, LargeBinary, MetaData, String, Text
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints let Alembic's batch mode alter them on SQLite (alembic docs, naming.rst).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(AsyncAttrs, DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class DraftStep(enum.StrEnum):
    DRAFT = "draft"
    FINALIZE = "finalize"


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class EndCode(enum.StrEnum):
    """How an attempt ended: the worker decides it, the store records it, the cards explain it."""

    OK = "ok"
    OOM = "oom"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    CRASHED = "crashed"  # the generator died or failed unexpectedly; retried
    INVALID = "invalid"  # the job's settings cannot be rendered
    MODEL_MISSING = "model_missing"  # model files or the family's interpreter need the owner
    TOO_LARGE = "too_large"  # the clip cannot fit the delivery limit
    INTERRUPTED = "interrupted"  # its supervising process died mid-render
    STOPPED = "stopped"  # the bot was stopped on purpose; the attempt is given back


# Retrying these renders the same failure again.
NOT_RETRIED = frozenset({EndCode.OOM, EndCode.INVALID, EndCode.MODEL_MISSING, EndCode.TOO_LARGE})


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(32), index=True)
    guild_id: Mapped[str | None] = mapped_column(String(32))
    channel_id: Mapped[str | None] = mapped_column(String(32))
    # A replayed interaction must not create a second job.
    interaction_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    request_message_id: Mapped[str | None] = mapped_column(String(32))
    status_message_id: Mapped[str | None] = mapped_column(String(32))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    # params["family"] as a column, so a worker claims only the families it can render.
    family: Mapped[str] = mapped_column(String(16), default="ltx2", server_default="ltx2")
    input_path: Mapped[str] = mapped_column(Text)
    input_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    generator_pid: Mapped[int | None] = mapped_column(Integer)
    # /proc/<pid>/stat field 22: tells our generator from a later process with a reused pid.
    generator_start_ticks: Mapped[int | None] = mapped_column(BigInteger)
    # The process that claimed the job and supervises its generator: recovery takes a running
    # job back only when this process is gone (a live bot elsewhere keeps its job).
    supervisor_host: Mapped[str | None] = mapped_column(String(255))
    supervisor_pid: Mapped[int | None] = mapped_column(Integer)
    supervisor_start_ticks: Mapped[int | None] = mapped_column(BigInteger)
    # The worker rendering the attempt (workers.id) and how long its claim holds without a heartbeat:
    # past ``lease_until`` any worker may take the job back (bot/db/store.py, ``recover_expired``).
    worker_id: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Seconds of generator phases over every attempt, for the per-user daily GPU budget.
    gpu_seconds: Mapped[float | None] = mapped_column(Double)
    # The VRAM predictor's peak for this request, when one was made: a worker with a smaller budget passes it by.
    predicted_peak_gib: Mapped[float | None] = mapped_column(Double)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(32))
    error_message: Mapped[str | None] = mapped_column(Text)
    output_path: Mapped[str | None] = mapped_column(Text)
    output_bytes: Mapped[int | None] = mapped_column(BigInteger)
    posted_message_id: Mapped[str | None] = mapped_column(String(32))
    posted_message_url: Mapped[str | None] = mapped_column(Text)
    phases: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # One entry per ended attempt: {"attempt", "code", "message", "at"}.
    history: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # Drafts (docs/DESIGN.md, 'Drafts and previews'): "draft" renders stage 1 and keeps it,
    # "finalize" renders the rest of the draft ``draft_of``; None is a whole clip. A draft's
    # kept latents live until ``draft_kept_until``; None once they are deleted.
    draft: Mapped[str | None] = mapped_column(String(16))
    draft_of: Mapped[int | None] = mapped_column(Integer)
    draft_kept_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_jobs_status_id", "status", "id"),
        # The fair claim's "when did this user's last job start".
        Index("ix_jobs_user_id_started_at", "user_id", "started_at"),
    )

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class Setting(Base):
    """Small key-value state shared by every process on the database (queue paused, ...)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Standby(Base):
    """A standby generator (started ahead of its job) and the process that started it.

    Recorded so that the next start ends one whose supervisor died while it was importing.
    """

    __tablename__ = "standbys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    supervisor_host: Mapped[str] = mapped_column(String(255))
    supervisor_pid: Mapped[int] = mapped_column(Integer)
    supervisor_start_ticks: Mapped[int | None] = mapped_column(BigInteger)
    pid: Mapped[int] = mapped_column(Integer)
    start_ticks: Mapped[int | None] = mapped_column(BigInteger)


class WorkerState(enum.StrEnum):
    IDLE = "idle"
    RENDERING = "rendering"
    DRAINING = "draining"  # finishes its clip, then takes no more
    STOPPED = "stopped"


class WorkerRecord(Base):
    """One worker process (one GPU) as it registered, and its last heartbeat."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    gpu: Mapped[int | None] = mapped_column(Integer)
    gpu_name: Mapped[str | None] = mapped_column(String(255))
    vram_budget_gib: Mapped[float | None] = mapped_column(Double)
    families: Mapped[list[str]] = mapped_column(JSON)
    libraries: Mapped[dict[str, str]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    current_job_id: Mapped[int | None] = mapped_column(Integer)
    clips_rendered: Mapped[int] = mapped_column(Integer, default=0)
    drain_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Blob(Base):
    """A file that hosts share through the database: an input image or a finished clip."""

    __tablename__ = "blobs"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

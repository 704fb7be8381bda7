"""The job table: the durable record of every request, its attempts and its result."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, MetaData, String, Text
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

    __table_args__ = (Index("ix_jobs_status_id", "status", "id"),)

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

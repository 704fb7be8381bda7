"""Which queued job is claimed next: fair across users, and safe for many claimers on either database.

Fairness: the next job belongs to the user whose last job started longest ago; users who
never had a job started come first, and a user's own jobs run oldest first. Ten queued jobs
from one user therefore wait their turn behind another user's one, round-robin.

Safety: the claim is one ``UPDATE jobs ... WHERE id = (this subquery) AND status = 'queued'``.
On SQLite it runs under ``BEGIN IMMEDIATE`` (bot/db/engine.py), so claimers take turns. On
PostgreSQL claimers run at once under READ COMMITTED, where a plain subquery would let two
of them pick the same row: the loser waits for the winner's lock, re-checks ``status``, and
updates nothing, reporting an empty queue while jobs wait. ``FOR UPDATE SKIP LOCKED`` makes
each claimer pass over rows another claimer holds and take the next one instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ScalarSelect, func, or_, select
from sqlalchemy.orm import aliased

from bot.db.models import Job, JobStatus


def next_queued_id(
    dialect: str, only_id: int | None = None, *, families: tuple[str, ...] | None = None,
    vram_budget_gib: float | None = None,
) -> ScalarSelect[Any]:
    """The id of the job to claim next, as a scalar subquery for the claim's UPDATE.

    A worker passes its capabilities: only jobs of its ``families``, and with a budget only jobs
    whose predicted peak fits it (a job without a prediction fits any). The fair order holds
    among the jobs it can run.
    """
    queued, earlier = aliased(Job, name="queued"), aliased(Job, name="earlier")
    last_started = (
        select(func.max(earlier.started_at)).where(earlier.user_id == queued.user_id).correlate(queued)
        .scalar_subquery()
    )
    candidates = select(queued.id).where(queued.status == JobStatus.QUEUED)
    if only_id is not None:
        candidates = candidates.where(queued.id == only_id)
    if families is not None:
        candidates = candidates.where(queued.family.in_(families))
    if vram_budget_gib is not None:
        candidates = candidates.where(or_(queued.predicted_peak_gib.is_(None),
                                          queued.predicted_peak_gib <= vram_budget_gib))
    candidates = candidates.order_by(last_started.asc().nulls_first(), queued.id).limit(1)
    if dialect == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    return candidates.scalar_subquery()


def fair_order(queued: list[tuple[int, str]], last_started: dict[str, datetime]) -> list[int]:
    """Queued job ids in the order claims will take them, if nothing else is queued meanwhile.

    ``queued`` is (id, user) pairs; ``last_started`` the latest start of each user who had one.
    Each claim moves its user to the back of the line, which is what this replays.
    """
    per_user: dict[str, list[int]] = {}
    for job_id, user in sorted(queued):
        per_user.setdefault(user, []).append(job_id)
    # Never started sorts first; ties (and the never-started) by their oldest queued job.
    line = sorted(per_user, key=lambda user: (user in last_started, last_started.get(user, datetime.min),
                                              per_user[user][0]))
    order: list[int] = []
    while line:
        user = line.pop(0)
        order.append(per_user[user].pop(0))
        if per_user[user]:
            line.append(user)
    return order

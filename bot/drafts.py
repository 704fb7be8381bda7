"""Drafts: which requests get one, and when a draft's kept latents are deleted.

A draft is a job that renders stage 1 only and keeps what stage 2 needs in its folder
(``bot/worker.py``, ``DRAFT_STATE_NAME``); Finalize queues a second job that renders the
rest from it (docs/DESIGN.md, 'Drafts and previews'). This module holds the rules the
job service applies; it never touches Discord.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bot.db.models import DraftStep
from bot.shared_files import SharedFiles
from bot.worker import draft_state_path

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.db.store import JobStore
    from generator.protocol import GenerationRequest

log = logging.getLogger(__name__)

# How often the bot looks for drafts past their keeping time.
SWEEP_SECONDS = 600.0
NOT_DRAFTABLE = ("draft: only LTX-2 clips with a two-stage pipeline (two_stage or distilled) have a draft; "
                 "leave draft off, or pick one of those pipelines.")


def draftable(request: GenerationRequest) -> bool:
    # two_stage_hq's stage 1 is its own (res_2s, LoRA 0.25): a draft would not be its stage 1.
    # A lip-sync clip runs whole: its stages hold the user's audio (docs/DESIGN.md, 'Lip-sync').
    # A retake is one stage at full size (docs/DESIGN.md, 'Retake'); an extension is joined to its clip.
    return request.family == "ltx2" and request.pipeline in ("two_stage", "distilled") and request.mode == "animate"


def draft_step(settings: Settings, request: GenerationRequest, asked: bool | None, guild_id: int | None) -> str | None:
    """The new job's ``draft`` column; ValueError (with the sentence for the user) when a draft was
    asked for a clip that has none. The server's default applies only where it can."""
    if asked is None:
        return DraftStep.DRAFT if settings.draft_for(guild_id) and draftable(request) else None
    if asked and not draftable(request):
        raise ValueError(NOT_DRAFTABLE)
    return DraftStep.DRAFT if asked else None


async def delete_kept(settings: Settings, store: JobStore, job_ids: list[int]) -> int:
    """Delete these drafts' kept latents and record it; how many files went."""
    removed = 0
    for job_id in job_ids:
        path = draft_state_path(settings, job_id)
        if await asyncio.to_thread(path.is_file):
            await asyncio.to_thread(path.unlink, True)
            removed += 1
    await store.forget_drafts(job_ids)
    await SharedFiles(settings, store).forget_drafts(job_ids)
    return removed


async def sweep(settings: Settings, store: JobStore, now: datetime | None = None) -> int:
    """Delete the latents of drafts whose keeping time is over; how many drafts were swept."""
    expired = await store.kept_drafts(expired_at=now or datetime.now(UTC))
    if expired:
        await delete_kept(settings, store, expired)
        log.info("deleted the kept latents of %d expired drafts", len(expired))
    return len(expired)


async def sweep_forever(settings: Settings, store: JobStore) -> None:
    while True:
        try:
            await sweep(settings, store)
        except Exception:
            log.exception("the draft sweep failed; it tries again later")
        await asyncio.sleep(SWEEP_SECONDS)

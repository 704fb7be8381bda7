"""A job's status card in the channel: posting it, coalescing its edits, and who may edit it.

The interaction that asked for a job can edit its card for 15 minutes; after that, or after
a restart, the bot's own token edits it, and a card that is gone is posted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from bot import cards
from bot.db.models import ACTIVE_STATUSES, JobStatus
from bot.views import cancel_view, card_view

if TYPE_CHECKING:
    from discord.ext import commands

    from bot.db.models import Job
    from bot.db.store import JobStore

log = logging.getLogger(__name__)

# Interaction tokens live 15 minutes; leave a minute of margin before falling back to the channel.
TOKEN_LIFE = timedelta(minutes=14)
# The stage-1 preview rides on the card's edits as this attachment (docs/DESIGN.md, 'Drafts and previews').
PREVIEW_NAME = "preview.png"
QUEUE_CARDS_REFRESHED = 10


@dataclass(frozen=True)
class CardRef:
    message_id: int
    interaction: discord.Interaction[Any]


def settled(job: Job) -> bool:
    """The job has ended and its clip or notice is posted (or never will be): its card is final."""
    if job.status in ACTIVE_STATUSES:
        return False
    return job.status == JobStatus.CANCELLED or job.posted_message_id is not None or job.channel_id is None


class StatusCards:
    def __init__(
        self, bot: commands.Bot, store: JobStore, *, interval: float,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``interval``: at most one edit per card per this many seconds. ``clock`` and ``sleep``
        time the edits; tests pass their own to step time instead of sleeping."""
        self.bot = bot
        self.store = store
        self.interval = interval
        self._clock, self._sleep = clock, sleep
        # Only cards whose interaction token can still edit them; the bot token edits the rest.
        self.cards: dict[int, CardRef] = {}
        # The running job's latest progress, newer than what the store keeps.
        self.live: dict[int, dict[str, Any]] = {}
        # The running job's newest stage-1 preview image, and the cards that show one now.
        self.previews: dict[int, Path] = {}
        self._showing_preview: set[int] = set()
        self._dirty: set[int] = set()
        # Asked for an edit before their card's message id was stored: edited once it is.
        self._awaiting_card: set[int] = set()
        self._flushers: dict[int, asyncio.Task[None]] = {}
        self._last_edit: dict[int, float] = {}

    def close(self) -> None:
        for task in self._flushers.values():
            task.cancel()

    # --- posting ---------------------------------------------------------------------------

    async def post_followup(self, interaction: discord.Interaction[Any], job: Job) -> None:
        """The card of a job asked for by an interaction: a followup its token can edit for a while."""
        embed = cards.status_embed(job, await self.queue_view(job))
        card = await interaction.followup.send(embed=embed, view=cancel_view(job.id), wait=True)
        self._remember(job.id, CardRef(card.id, interaction))
        await self._card_stored(job.id, str(card.id))

    async def post_reply(self, message: discord.Message, job: Job) -> None:
        """The card of a job asked for by a mention: a reply that only the bot token edits."""
        card = await message.reply(embed=cards.status_embed(job, await self.queue_view(job)),
                                   view=cancel_view(job.id), mention_author=False,
                                   allowed_mentions=discord.AllowedMentions.none())
        await self._card_stored(job.id, str(card.id))

    async def _card_stored(self, job_id: int, message_id: str) -> None:
        await self.store.set_status_message(job_id, message_id)
        if job_id in self._awaiting_card:  # e.g. a replayed mention, while its first card was being posted
            self._awaiting_card.discard(job_id)
            await self.refresh(job_id)

    async def queue_view(self, job: Job) -> cards.QueueView:
        queued = await self.store.queued_ids()
        position = queued.index(job.id) + 1 if job.id in queued else None
        eta = None
        if position is not None:
            running = await self.store.running()
            eta = cards.estimate_ready(
                position, await self.store.recent_durations(), running[0].started_at if running else None
            )
        return cards.QueueView(position=position, length=len(queued), eta=eta)

    # --- edits -------------------------------------------------------------------------------

    async def refresh_queue(self) -> None:
        """The first queued cards: their positions and ETAs moved."""
        for job_id in (await self.store.queued_ids())[:QUEUE_CARDS_REFRESHED]:
            await self.refresh(job_id)

    async def refresh(self, job_id: int) -> None:
        """Ask for a card edit; edits are coalesced to one per ``interval``."""
        self._dirty.add(job_id)
        if job_id not in self._flushers:
            self._flushers[job_id] = asyncio.create_task(self._flush(job_id), name=f"ltxbot-card-{job_id}")

    async def _flush(self, job_id: int) -> None:
        interval = self.interval
        try:
            while job_id in self._dirty:
                wait = self._last_edit.get(job_id, -interval) + interval - self._clock()
                if wait > 0:
                    await self._sleep(wait)
                self._dirty.discard(job_id)
                job = await self.store.get(job_id)
                if job is None:
                    return
                if job.status_message_id is None:
                    self._awaiting_card.add(job_id)
                    return
                try:
                    await self.edit(job)
                except discord.HTTPException as exc:
                    log.warning("could not update the card of job %s: %s", job_id, exc.status)
                self._last_edit[job_id] = self._clock()
                if settled(job):
                    self.forget(job_id)
        finally:
            self._flushers.pop(job_id, None)

    async def edit(self, job: Job) -> None:
        """Show the job's state now: through its interaction while the token lives, else the bot token."""
        if job.status == JobStatus.RUNNING and job.id in self.live:
            job.progress = self.live[job.id]
        embed = cards.status_embed(job, await self.queue_view(job))
        view = card_view(job.id, job.status in ACTIVE_STATUSES and not job.cancel_requested)
        assert job.status_message_id is not None
        message_id = int(job.status_message_id)
        preview = self.previews.get(job.id) if job.status == JobStatus.RUNNING else None
        if preview is not None and preview.is_file():
            embed.set_thumbnail(url=f"attachment://{PREVIEW_NAME}")
            self._showing_preview.add(job.id)
        else:
            preview = None

        def attachments() -> Any:
            """Each edit uploads the newest preview (a File is spent by one request); none clears it."""
            if preview is not None:
                return [discord.File(preview, filename=PREVIEW_NAME)]
            if job.id in self._showing_preview:
                return []
            return discord.utils.MISSING

        ref = self.cards.get(job.id)
        if ref is not None and ref.message_id == message_id and _young(ref):
            with contextlib.suppress(discord.NotFound, discord.Forbidden):
                await ref.interaction.followup.edit_message(message_id, embed=embed, view=view,
                                                            attachments=attachments())
                self._shown(job.id, preview)
                return
        self.cards.pop(job.id, None)
        # Past the token's life, or after a restart: the bot's own token edits the message.
        channel = self.channel(job)
        try:
            await channel.get_partial_message(message_id).edit(embed=embed, view=view, attachments=attachments())
            self._shown(job.id, preview)
        except (discord.NotFound, discord.Forbidden):
            card = await channel.send(embed=embed, view=view or discord.utils.MISSING,
                                      allowed_mentions=discord.AllowedMentions.none())
            await self.store.set_status_message(job.id, str(card.id))

    def _shown(self, job_id: int, preview: Path | None) -> None:
        if preview is None:
            self._showing_preview.discard(job_id)

    def channel(self, job: Job) -> discord.PartialMessageable:
        assert job.channel_id is not None
        return self.bot.get_partial_messageable(
            int(job.channel_id), guild_id=int(job.guild_id) if job.guild_id else None
        )

    # --- what is kept --------------------------------------------------------------------

    def _remember(self, job_id: int, ref: CardRef) -> None:
        """Keep the interaction that can edit a card; entries past the token's life are dropped."""
        for old_id, old in list(self.cards.items()):
            if not _young(old):
                del self.cards[old_id]
        self.cards[job_id] = ref

    def forget(self, job_id: int) -> None:
        """A job's card has shown its last state: nothing about it is kept in memory any more."""
        self.cards.pop(job_id, None)
        self._awaiting_card.discard(job_id)
        self._last_edit.pop(job_id, None)
        self.live.pop(job_id, None)
        self.previews.pop(job_id, None)
        self._showing_preview.discard(job_id)


def _young(ref: CardRef) -> bool:
    return discord.utils.utcnow() - ref.interaction.created_at < TOKEN_LIFE

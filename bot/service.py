"""The Discord-facing job service: every way a job starts, its status card, and its delivery.

Commands, buttons, modals and mentions all come here, so access rules, limits,
intake and the card behave the same whichever way a user asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from pydantic import ValidationError

from bot import cards
from bot.access import Caller, Refusal, budget_gate, check_budget, check_place, is_admin
from bot.db.models import ACTIVE_STATUSES, JobStatus
from bot.db.store import CancelOutcome, DuplicateJobError, NewJob
from bot.intake import IntakeError
from bot.intake.download import download_attachment
from bot.intake.image import ImageIntake, confined_path
from bot.intake.request import SizedRequest, build_request, check_owner_limits
from bot.views import AnimateModal, TweakModal, cancel_view, card_view, delivery_view
from bot.worker import Ending, job_dir
from generator.protocol import (
    FAMILY_NAMES,
    GenerationRequest,
    ProgressEvent,
    StartedEvent,
    describe_validation_error,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from bot.app import LtxBot
    from bot.config import Settings
    from bot.db.models import Job
    from bot.db.store import JobStore, UserUsage
    from bot.worker import Worker

    AdmitGate = Callable[[UserUsage], None] | None

log = logging.getLogger(__name__)

# Interaction tokens live 15 minutes; leave a minute of margin before falling back to the channel.
TOKEN_LIFE = timedelta(minutes=14)
DEFAULT_UPLOAD_LIMIT = 10 * 2**20
# Room for the caption and multipart overhead next to the clip.
UPLOAD_MARGIN = 64 * 1024
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
QUEUE_CARDS_REFRESHED = 10


@dataclass(frozen=True)
class CardRef:
    message_id: int
    interaction: discord.Interaction[Any] | None


def _image_attachment(attachments: list[discord.Attachment]) -> discord.Attachment | None:
    for attachment in attachments:
        if (attachment.content_type or "").startswith("image/") or attachment.filename.lower().endswith(
            IMAGE_EXTENSIONS
        ):
            return attachment
    return None


def _settled(job: Job) -> bool:
    """The job has ended and its clip or notice is posted (or never will be): its card is final."""
    if job.status in ACTIVE_STATUSES:
        return False
    return job.status == JobStatus.CANCELLED or job.posted_message_id is not None or job.channel_id is None


def _remove_all(paths: list[tuple[str, Path]]) -> int:
    return sum(_remove_confined(path, root) for path, root in paths)


def _remove_confined(path: str, root: Path) -> int:
    """Delete a file or a job folder, only inside ``root``; the number of files removed."""
    try:
        resolved = confined_path(root, path)
    except ValueError:
        return 0
    if resolved.is_dir():
        count = 0
        for child in sorted(resolved.rglob("*"), reverse=True):
            if child.is_dir():
                child.rmdir()
            else:
                child.unlink()
                count += 1
        resolved.rmdir()
        return count
    if resolved.is_file():
        resolved.unlink()
        return 1
    return 0


def _options_for_request(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("preset", "width", "height", "frames", "seconds", "seed", "audio", "pipeline", "family", "guild_id")
    return {k: options[k] for k in keys if options.get(k) is not None}


class JobService:
    def __init__(
        self, bot: LtxBot, settings: Settings, store: JobStore, worker: Worker, *,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.bot = bot
        # The card edits' time, injectable so tests step it instead of sleeping.
        self._clock, self._sleep = clock, sleep
        self.settings = settings
        self.store = store
        self.worker = worker
        limits = settings.limits
        self.intake = ImageIntake(
            settings.uploads_dir, max_pixels=limits.max_image_pixels, min_side=limits.min_image_side,
            threads=limits.intake_threads,
        )
        self.http: aiohttp.ClientSession | None = None
        # Only cards whose interaction token can still edit them; the bot token edits the rest.
        self.cards: dict[int, CardRef] = {}
        self.live: dict[int, dict[str, Any]] = {}
        self._dirty: set[int] = set()
        self._flushers: dict[int, asyncio.Task[None]] = {}
        self._last_edit: dict[int, float] = {}
        # Folders and images of purged jobs that were still stopping: deleted when the worker ends them.
        self._purge_when_ended: dict[int, list[tuple[str, Path]]] = {}
        # A lock lives while a delivery of its job holds it, then drops out of the map by itself.
        self._delivery_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        worker.listeners.append(self.on_worker_event)

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()

    async def close(self) -> None:
        for task in self._flushers.values():
            task.cancel()
        if self.http is not None:
            await self.http.close()
        self.intake.close()

    # --- who is asking -----------------------------------------------------------

    async def caller(self, user: discord.User | discord.Member, guild_id: int | None) -> Caller:
        roles = user.roles[1:] if isinstance(user, discord.Member) else []
        return Caller(
            user_id=user.id,
            guild_id=guild_id,
            role_names=frozenset(r.name for r in roles),
            role_ids=frozenset(r.id for r in roles),
            is_owner=await self.bot.is_owner(user),
        )

    async def admin(self, interaction: discord.Interaction[Any]) -> bool:
        return is_admin(self.settings.discord, await self.caller(interaction.user, interaction.guild_id))

    # --- error handling -------------------------------------------------------------

    async def guarded(self, interaction: discord.Interaction[Any], work: Coroutine[Any, Any, None]) -> None:
        """Run a handler; any exception answers the user with an apology and an error id."""
        try:
            await work
        except Exception as exc:
            await self.apologise(interaction, exc)

    async def apologise(self, interaction: discord.Interaction[Any], exc: BaseException) -> None:
        error_id = secrets.token_hex(4)
        log.error("error %s while handling an interaction", error_id, exc_info=exc)
        text = f"Sorry, something went wrong on my side (error id `{error_id}`). Please try again in a moment."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell the user about error %s", error_id)

    @staticmethod
    async def tell(interaction: discord.Interaction[Any], text: str) -> None:
        """A short private answer, whether or not the interaction was already deferred."""
        if interaction.response.is_done():
            await interaction.edit_original_response(content=text, embed=None, view=None)
        else:
            await interaction.response.send_message(text, ephemeral=True)

    # --- starting jobs ------------------------------------------------------------------

    def clip_limit(self, guild: discord.Guild | None) -> int:
        limit = guild.filesize_limit if guild is not None else DEFAULT_UPLOAD_LIMIT
        if self.settings.discord.max_clip_bytes is not None:
            limit = min(limit, self.settings.discord.max_clip_bytes)
        return max(limit - UPLOAD_MARGIN, limit // 2)

    async def _admit(self, user: discord.User | discord.Member, guild_id: int | None) -> AdmitGate:
        """The quick answer before any download; the returned gate is the authority, run by the insert."""
        caller = await self.caller(user, guild_id)
        check_place(self.settings.discord, caller)
        admin = is_admin(self.settings.discord, caller)
        await check_budget(self.settings.limits, self.store, caller, admin=admin)
        return budget_gate(self.settings.limits, admin=admin)

    def _prevalidate(self, prompt: str, options: dict[str, Any]) -> None:
        """Reject bad options before downloading anything (the image only changes the derived size)."""
        build_request(self.settings, prompt=prompt, source_size=(4, 3), **_options_for_request(options))

    async def _from_attachment(
        self, attachment: discord.Attachment, prompt: str, options: dict[str, Any]
    ) -> tuple[GenerationRequest, Any]:
        assert self.http is not None
        d = self.settings.discord
        data = await download_attachment(
            self.http, attachment.url, declared_size=attachment.size,
            max_bytes=self.settings.limits.max_upload_bytes, allowed_hosts=d.cdn_hosts,
            allow_insecure=d.allow_insecure_cdn, timeout_seconds=self.settings.limits.download_timeout_seconds,
        )
        sized = SizedRequest(self.settings, prompt=prompt, **_options_for_request(options))
        image = await self.intake.normalise(data, sized)
        assert sized.request is not None
        return sized.request, image

    async def _create(
        self, request: GenerationRequest, *, input_path: str, sha256: str, user_id: int, guild: discord.Guild | None,
        guild_id: int | None, channel_id: int | None, key: str, admit: AdmitGate,
        request_message_id: int | None = None,
    ) -> tuple[Job, bool]:
        """Insert the job, and whether it is new (not a replay of the same request).

        Raises Refusal when the user's limits, checked with the insert, say no.
        """
        new = NewJob(
            user_id=str(user_id), prompt=request.prompt, negative_prompt=request.negative_prompt,
            params=request.model_dump(mode="json"), input_path=input_path, input_sha256=sha256,
            guild_id=str(guild_id) if guild_id else None, channel_id=str(channel_id) if channel_id else None,
            interaction_id=key, request_message_id=str(request_message_id) if request_message_id else None,
            max_bytes=self.clip_limit(guild),
        )
        try:
            return await self.store.create(new, admit=admit), True
        except DuplicateJobError as duplicate:
            return duplicate.job, False

    async def animate_from_command(
        self, interaction: discord.Interaction[Any], attachment: discord.Attachment, prompt: str,
        options: dict[str, Any],
    ) -> None:
        await self._animate_interaction(interaction, attachment, prompt, options)

    async def animate_from_context(self, interaction: discord.Interaction[Any], message: discord.Message) -> None:
        attachment = _image_attachment(message.attachments)
        if attachment is None:
            await interaction.response.send_message(
                "That message has no image attached. Use **Animate image** on a message with a JPEG, PNG or "
                "WebP picture.", ephemeral=True,
            )
            return
        try:
            await self._admit(interaction.user, interaction.guild_id)
        except Refusal as refusal:
            await interaction.response.send_message(refusal.message, ephemeral=True)
            return
        await interaction.response.send_modal(AnimateModal(message, attachment, self.settings.limits.max_prompt_chars))

    async def animate_from_modal(self, interaction: discord.Interaction[Any], modal: AnimateModal) -> None:
        try:
            options = modal.options()
        except ValueError as exc:
            await interaction.response.send_message(str(exc), ephemeral=True)
            return
        await self._animate_interaction(interaction, modal.attachment, modal.prompt.value, options)

    async def _animate_interaction(
        self, interaction: discord.Interaction[Any], attachment: discord.Attachment, prompt: str,
        options: dict[str, Any],
    ) -> None:
        options = {**options, "guild_id": interaction.guild_id}
        try:
            admit = await self._admit(interaction.user, interaction.guild_id)
            self._prevalidate(prompt, options)
        except (Refusal, IntakeError) as problem:
            await interaction.response.send_message(problem.message, ephemeral=True)
            return
        # Download and decoding can take longer than Discord's 3 seconds.
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            request, image = await self._from_attachment(attachment, prompt, options)
            job, _ = await self._create(
                request, input_path=str(image.path), sha256=image.sha256, user_id=interaction.user.id,
                guild=interaction.guild, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
                key=str(interaction.id), admit=admit,
            )
        except IntakeError as problem:
            await interaction.edit_original_response(content=f"I can't animate that: {problem.message}")
            return
        except Refusal as refusal:
            await interaction.edit_original_response(content=refusal.message)
            return
        notes = f" ({'; '.join(image.notes)})" if image.notes else ""
        await self._post_card(interaction, job, notes)

    async def _post_card(self, interaction: discord.Interaction[Any], job: Job, notes: str = "") -> None:
        await interaction.edit_original_response(
            content=f"Job {job.id} is queued{notes}. I'll post the clip in this channel and mention you."
        )
        embed = cards.status_embed(job, await self.queue_view(job))
        card = await interaction.followup.send(embed=embed, view=cancel_view(job.id), wait=True)
        self._remember_card(job.id, CardRef(card.id, interaction))
        await self.store.set_status_message(job.id, str(card.id))
        self.worker.ring()

    async def animate_from_mention(self, message: discord.Message) -> None:
        """``@ltxbot <prompt>`` with an image attached, or as a reply to a message with one."""
        me = self.bot.user
        if not self.settings.discord.message_content_intent or me is None or message.author.bot:
            return
        if not message.guild and not self.settings.discord.allow_dms:
            return
        if me not in message.mentions:
            return
        attachment = _image_attachment(message.attachments)
        if attachment is None and message.reference is not None and message.reference.message_id is not None:
            referenced = message.reference.resolved
            if not isinstance(referenced, discord.Message):
                with contextlib.suppress(discord.HTTPException):
                    referenced = await message.channel.fetch_message(message.reference.message_id)
            if isinstance(referenced, discord.Message):
                attachment = _image_attachment(referenced.attachments)
        prompt = " ".join(
            word for word in message.content.split() if word not in (f"<@{me.id}>", f"<@!{me.id}>")
        )
        quiet = discord.AllowedMentions.none()
        replayed = await self.store.for_interaction(f"m{message.id}")
        if replayed is not None:
            # The same message again (a gateway replay after a resume): its first card stays the
            # one that is kept up to date, so refresh that one rather than post another.
            await self.refresh_card(replayed.id)
            return
        if attachment is None:
            await message.reply("Attach an image (or reply to a message with one) and write what should happen.",
                                mention_author=False, allowed_mentions=quiet)
            return
        try:
            admit = await self._admit(message.author, message.guild.id if message.guild else None)
            guild_options = {"guild_id": message.guild.id} if message.guild else {}
            request, image = await self._from_attachment(attachment, prompt, guild_options)
            job, created = await self._create(
                request, input_path=str(image.path), sha256=image.sha256, user_id=message.author.id,
                guild=message.guild, guild_id=message.guild.id if message.guild else None,
                channel_id=message.channel.id, key=f"m{message.id}", admit=admit, request_message_id=message.id,
            )
        except (Refusal, IntakeError) as problem:
            await message.reply(f"I can't animate that: {problem.message}", mention_author=False,
                                allowed_mentions=quiet)
            return
        if not created:  # a replay that overlapped the first delivery of the message
            await self.refresh_card(job.id)
            return
        card = await message.reply(embed=cards.status_embed(job, await self.queue_view(job)),
                                   view=cancel_view(job.id),
                                   mention_author=False, allowed_mentions=quiet)
        await self.store.set_status_message(job.id, str(card.id))
        self.worker.ring()

    async def _own_job(self, interaction: discord.Interaction[Any], job_id: int) -> Job | None:
        job = await self.store.get(job_id, str(interaction.user.id), is_admin=await self.admin(interaction))
        if job is None:
            await self.tell(interaction, f"You have no job {job_id}. `/jobs` lists yours.")
        return job

    async def rerun(self, interaction: discord.Interaction[Any], job_id: int, prompt: str | None = None) -> None:
        """Rerun with a new seed, or (``prompt`` given, from Tweak) the same seed and a new prompt."""
        job = await self._own_job(interaction, job_id)
        if job is None:
            return
        params = dict(job.params)
        if prompt is None:
            params["seed"] = secrets.randbelow(2**32)
        else:
            params["prompt"] = prompt
        try:
            admit = await self._admit(interaction.user, interaction.guild_id)
            request = GenerationRequest.model_validate(params)
            check_owner_limits(self.settings, request)
        except (Refusal, IntakeError) as refusal:
            await self.tell(interaction, refusal.message)
            return
        except ValidationError as exc:
            await self.tell(interaction, describe_validation_error(exc))
            return
        if request.family not in self.settings.enabled_families():
            name = FAMILY_NAMES[request.family]
            await self.tell(interaction, f"The {name} model is no longer set up on this bot; start a new /animate.")
            return
        if not job.input_path or not await asyncio.to_thread(Path(job.input_path).is_file):
            await self.tell(interaction, "The image for that clip is no longer stored; start a new /animate.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            new, _ = await self._create(
                request, input_path=job.input_path, sha256=job.input_sha256, user_id=interaction.user.id,
                guild=interaction.guild, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
                key=str(interaction.id), admit=admit,
            )
        except Refusal as refusal:
            await self.tell(interaction, refusal.message)
            return
        await self._post_card(interaction, new)

    async def open_tweak(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        job = await self._own_job(interaction, job_id)
        if job is not None:
            await interaction.response.send_modal(TweakModal(job.id, job.prompt, self.settings.limits.max_prompt_chars))

    # --- cancelling -----------------------------------------------------------------------

    async def cancel(self, interaction: discord.Interaction[Any], job_id: int) -> str:
        outcome = await self.store.cancel(job_id, str(interaction.user.id), is_admin=await self.admin(interaction))
        if outcome == CancelOutcome.CANCELLED:
            await self.refresh_card(job_id)
            await self.refresh_queue()
            return f"Job {job_id} is cancelled."
        if outcome == CancelOutcome.STOPPING:
            await self.refresh_card(job_id)
            return f"Job {job_id} is stopping; its card will say when it has."
        if outcome == CancelOutcome.FINISHED:
            return f"Job {job_id} has already finished."
        return f"You have no job {job_id}. `/jobs` lists yours."

    async def cancel_from_button(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        await interaction.response.send_message(await self.cancel(interaction, job_id), ephemeral=True)

    # --- privacy -----------------------------------------------------------------------------

    async def purge_user(self, user_id: int) -> str:
        """Delete a user's stored images and job folders and anonymise their jobs; the admin's answer.

        A running job's generator writes into its folder and reads its image, so that job is
        stopped first (a bounded wait); if it has not stopped by then, its files are deleted
        when the worker ends it.
        """
        settings = self.settings
        result = await self.store.purge_user(str(user_id))
        purged = set(result.jobs)
        running = [job for job in await self.store.running() if job.id in purged]
        still_running = await self._wait_stopped([job.id for job in running])
        kept_images = {job.input_path for job in running if job.id in still_running}
        now = [(path, settings.uploads_dir) for path in result.images if path not in kept_images] + [
            (str(job_dir(settings, job_id)), settings.jobs_dir) for job_id in result.jobs if job_id not in still_running
        ]
        removed = await asyncio.to_thread(_remove_all, now)
        for job in running:
            if job.id in still_running:
                later = [(str(job_dir(settings, job.id)), settings.jobs_dir)]
                if job.input_path in result.images:
                    later.append((job.input_path, settings.uploads_dir))
                self._purge_when_ended[job.id] = later
        log.info("purged %d jobs and %d files of one user", len(result.jobs), removed)
        text = f"Deleted {removed} stored files and anonymised {len(result.jobs)} jobs of <@{user_id}>."
        if still_running:
            text += " Their running clip is still stopping; its files are deleted as soon as it has."
        elif running:
            text += " Their running clip was stopped first."
        return text + " Clips already posted in channels stay; delete those messages in Discord if needed."

    async def _wait_stopped(self, job_ids: list[int]) -> set[int]:
        """Wait (bounded) until the worker has ended these jobs; the ids still running after the wait."""
        # The worker looks for a cancel every second and gives the generator its grace period.
        deadline = time.monotonic() + self.settings.generator.kill_grace_seconds + 5.0
        pending = set(job_ids)
        while pending:
            for job_id in list(pending):
                job = await self.store.get(job_id)
                if job is None or job.status not in ACTIVE_STATUSES:
                    pending.discard(job_id)
            if not pending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
        return pending

    # --- status cards -------------------------------------------------------------------------

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

    async def on_worker_event(self, job: Job, event: Any) -> None:
        if isinstance(event, ProgressEvent):
            self.live[job.id] = event.model_dump(exclude={"event"})
            await self.refresh_card(job.id)
        elif isinstance(event, StartedEvent):
            self.live[job.id] = {"stage": "starting", "step": 0, "total": 0}
            await self.refresh_card(job.id)
            await self.refresh_queue()
        elif isinstance(event, Ending):
            self.live.pop(job.id, None)
            if job.status in ACTIVE_STATUSES:  # requeued for another attempt
                await self.refresh_card(job.id)
                return
            leftovers = self._purge_when_ended.pop(job.id, None)
            if leftovers:
                removed = await asyncio.to_thread(_remove_all, leftovers)
                log.info("purge: %d files of job %s deleted now that it has stopped", removed, job.id)
            await self.deliver(job)
            await self.refresh_queue()

    async def refresh_queue(self) -> None:
        for job_id in (await self.store.queued_ids())[:QUEUE_CARDS_REFRESHED]:
            await self.refresh_card(job_id)

    async def refresh_card(self, job_id: int) -> None:
        """Ask for a card edit; edits are coalesced to one per ``progress_interval_seconds``."""
        self._dirty.add(job_id)
        if job_id not in self._flushers:
            self._flushers[job_id] = asyncio.create_task(self._flush(job_id), name=f"ltxbot-card-{job_id}")

    async def _flush(self, job_id: int) -> None:
        interval = self.settings.discord.progress_interval_seconds
        try:
            while job_id in self._dirty:
                wait = self._last_edit.get(job_id, -interval) + interval - self._clock()
                if wait > 0:
                    await self._sleep(wait)
                self._dirty.discard(job_id)
                job = await self.store.get(job_id)
                if job is None or job.status_message_id is None:
                    return
                try:
                    await self._edit_card(job)
                except discord.HTTPException as exc:
                    log.warning("could not update the card of job %s: %s", job_id, exc.status)
                self._last_edit[job_id] = self._clock()
                if _settled(job):
                    self._forget(job_id)
        finally:
            self._flushers.pop(job_id, None)

    def _remember_card(self, job_id: int, ref: CardRef) -> None:
        """Keep the interaction that can edit a card; entries past the token's life are dropped."""
        now = discord.utils.utcnow()
        for old_id, old in list(self.cards.items()):
            if old.interaction is None or now - old.interaction.created_at >= TOKEN_LIFE:
                del self.cards[old_id]
        self.cards[job_id] = ref

    def _forget(self, job_id: int) -> None:
        """A job's card has shown its last state: nothing about it is kept in memory any more."""
        self.cards.pop(job_id, None)
        self._last_edit.pop(job_id, None)
        self.live.pop(job_id, None)

    async def _edit_card(self, job: Job) -> None:
        if job.status == JobStatus.RUNNING and job.id in self.live:
            job.progress = self.live[job.id]
        embed = cards.status_embed(job, await self.queue_view(job))
        view = card_view(job.id, job.status in ACTIVE_STATUSES and not job.cancel_requested)
        assert job.status_message_id is not None
        message_id = int(job.status_message_id)
        ref = self.cards.get(job.id)
        if (
            ref is not None and ref.interaction is not None and ref.message_id == message_id
            and discord.utils.utcnow() - ref.interaction.created_at < TOKEN_LIFE
        ):
            with contextlib.suppress(discord.NotFound, discord.Forbidden):
                await ref.interaction.followup.edit_message(message_id, embed=embed, view=view)
                return
        self.cards.pop(job.id, None)
        # Past the token's life, or after a restart: the bot's own token edits the message.
        channel = self._channel(job)
        try:
            await channel.get_partial_message(message_id).edit(embed=embed, view=view)
        except (discord.NotFound, discord.Forbidden):
            card = await channel.send(embed=embed, view=view or discord.utils.MISSING,
                                      allowed_mentions=discord.AllowedMentions.none())
            self.cards.pop(job.id, None)
            await self.store.set_status_message(job.id, str(card.id))

    def _channel(self, job: Job) -> discord.PartialMessageable:
        assert job.channel_id is not None
        return self.bot.get_partial_messageable(
            int(job.channel_id), guild_id=int(job.guild_id) if job.guild_id else None
        )

    def _message_url(self, job: Job, message_id: int) -> str:
        return f"https://discord.com/channels/{job.guild_id or '@me'}/{job.channel_id}/{message_id}"

    # --- delivery ---------------------------------------------------------------------------------

    async def deliver_pending(self) -> None:
        """After a restart: post clips and failure notices that were never posted."""
        for job in await self.store.undelivered():
            await self.deliver(job)

    async def deliver(self, job: Job) -> None:
        """Post the clip (or the reason it failed) once, as a reply to the request, mentioning only its owner."""
        lock = self._delivery_locks.setdefault(job.id, asyncio.Lock())
        async with lock:
            fresh = await self.store.get(job.id)
            if fresh is None or fresh.channel_id is None or fresh.posted_message_id is not None:
                return
            if fresh.status == JobStatus.CANCELLED:
                await self.refresh_card(fresh.id)
                return
            channel = self._channel(fresh)
            reply_to = fresh.request_message_id or fresh.status_message_id
            reference = discord.MessageReference(
                message_id=int(reply_to), channel_id=int(fresh.channel_id), fail_if_not_exists=False
            ) if reply_to else None
            mentions = discord.AllowedMentions(
                everyone=False, roles=False, users=[discord.Object(int(fresh.user_id))], replied_user=False
            ) if fresh.user_id.isdigit() else discord.AllowedMentions.none()
            # Discord returns the first message for a repeated nonce: a second post after a crash is a no-op.
            nonce = f"ltxbot-{fresh.id}"
            try:
                message = await self._post_result(fresh, channel, reference, mentions, nonce)
            except discord.HTTPException as exc:
                if exc.status != 413:
                    log.warning("could not post job %s (HTTP %s); will retry on the next start", fresh.id,
                                exc.status)
                    return
                message = await channel.send(
                    f"<@{fresh.user_id}> job {fresh.id} is done, but the clip is over this server's upload "
                    "limit. Try a shorter clip or a smaller size.",
                    reference=reference or discord.utils.MISSING, allowed_mentions=mentions,
                )
            url = self._message_url(fresh, message.id)
            await self.store.mark_delivered(fresh.id, str(message.id), url)
            log.info("job %s posted as message %s", fresh.id, message.id)
        await self.refresh_card(job.id)

    async def _post_result(
        self, job: Job, channel: discord.PartialMessageable, reference: discord.MessageReference | None,
        mentions: discord.AllowedMentions, nonce: str,
    ) -> discord.Message:
        clip = None
        if job.output_path:
            with contextlib.suppress(ValueError):
                clip = confined_path(self.settings.jobs_dir, job.output_path)
        if job.status == JobStatus.SUCCEEDED and clip is not None and clip.is_file():
            return await channel.send(
                cards.delivery_caption(job), file=discord.File(clip, filename=f"ltxbot-{job.id}.mp4"),
                reference=reference or discord.utils.MISSING, allowed_mentions=mentions,
                view=delivery_view(job.id), nonce=nonce,
            )
        if job.status == JobStatus.SUCCEEDED:
            job.error_message = "The finished clip is no longer on disk."
        return await channel.send(
            cards.failure_notice(job), reference=reference or discord.utils.MISSING, allowed_mentions=mentions,
            nonce=nonce,
        )

"""The jobs of Discord users: every way a job starts, its cancel, its delivery, and a user's purge.

Commands, buttons, modals and mentions all come here, so access rules, limits, intake and
the card behave the same whichever way a user asked. The rule of the front end: a cog
declares a command and answers it; file work and multi-step store work live here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import discord
from pydantic import ValidationError

from bot import cards, drafts
from bot.access import Caller, Refusal, budget_gate, check_budget, check_place, is_admin
from bot.db.models import ACTIVE_STATUSES, DraftStep, JobStatus, WorkerState
from bot.db.store import CancelOutcome, DuplicateJobError, NewJob
from bot.intake import IntakeError
from bot.intake.audio import AudioIntake, AudioLimits
from bot.intake.download import download_attachment
from bot.intake.image import DecodeLimits, ImageIntake, confined_path
from bot.intake.request import (
    RequestOptions,
    check_owner_limits,
    fixed_size,
    least_vram,
    lipsync_options,
    with_audio_track,
    with_end_image,
)
from bot.replies import tell
from bot.retake import PENDING_SOURCE, clip_seconds, retake_refusal, retake_request
from bot.shared_files import SharedFiles
from bot.status_cards import StatusCards
from bot.views import AnimateModal, ExtendModal, RetakeModal, TweakModal, delivery_view, draft_view
from bot.worker import Ending, draft_state_path, job_dir
from generator.protocol import (
    EXTEND_OVERLAP_FRAMES,
    FAMILY_NAMES,
    MAX_FRAMES,
    GenerationRequest,
    PreviewEvent,
    ProgressEvent,
    StartedEvent,
    describe_validation_error,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from discord.ext import commands

    from bot.config import Settings
    from bot.db.models import Job
    from bot.db.store import JobStore, UserUsage
    from bot.worker import Worker

    AdmitGate = Callable[[UserUsage], None] | None

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_LIMIT = 10 * 2**20
# Room for the caption and multipart overhead next to the clip.
UPLOAD_MARGIN = 64 * 1024
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# /queue lists this many waiting jobs by position; /admin workers this many workers.
QUEUE_SHOWN = 10
WORKERS_SHOWN = 25


def _is_image(attachment: discord.Attachment) -> bool:
    return (attachment.content_type or "").startswith("image/") or attachment.filename.lower().endswith(
        IMAGE_EXTENSIONS
    )


def _image_attachments(attachments: list[discord.Attachment]) -> list[discord.Attachment]:
    return [attachment for attachment in attachments if _is_image(attachment)]


def _image_attachment(attachments: list[discord.Attachment]) -> discord.Attachment | None:
    images = _image_attachments(attachments)
    return images[0] if images else None


def _remove_all(paths: list[tuple[str, Path]]) -> int:
    return sum(_remove_confined(path, root) for path, root in paths)


def _empty_embedding_cache(folder: Path) -> None:
    # A generator may be writing an entry meanwhile: remove what is there, tolerate what goes.
    for path in folder.glob("*"):
        if path.is_file():
            path.unlink(missing_ok=True)


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


class JobService:
    def __init__(
        self, bot: commands.Bot, settings: Settings, store: JobStore, worker: Worker, *,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """``clock`` and ``sleep`` time the card edits (tests step them)."""
        self.bot = bot
        self.settings = settings
        self.store = store
        self.worker = worker
        limits = settings.limits
        self.intake = ImageIntake(
            settings.uploads_dir, max_pixels=limits.max_image_pixels, min_side=limits.min_image_side,
            threads=limits.intake_threads, limits=DecodeLimits.of(limits),
        )
        self.audio_intake = AudioIntake(settings.uploads_dir, threads=limits.intake_threads,
                                        limits=AudioLimits.of(limits))
        self.files = SharedFiles(settings, store)
        self.http: aiohttp.ClientSession | None = None
        self._watcher: asyncio.Task[None] | None = None
        # Jobs whose post failed: not retried by the watcher before this time (monotonic).
        self._retry_after: dict[int, float] = {}
        self.cards = StatusCards(bot, store, interval=settings.discord.progress_interval_seconds, clock=clock,
                                 sleep=sleep)
        # Folders and images of purged jobs that were still stopping: deleted when the worker ends them.
        self._purge_when_ended: dict[int, list[tuple[str, Path]]] = {}
        # A lock lives while a delivery of its job holds it, then drops out of the map by itself.
        self._delivery_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()
        self._sweeper: asyncio.Task[None] | None = None
        worker.listeners.append(self.on_worker_event)

    async def start(self) -> None:
        self.http = aiohttp.ClientSession()
        self._sweeper = asyncio.create_task(drafts.sweep_forever(self.settings, self.store), name="ltxbot-drafts")

    def watch_workers(self) -> None:
        """Follow jobs that workers in other processes (other GPUs, other hosts) render: their cards and posts."""
        self._watcher = asyncio.create_task(self._watch(), name="ltxbot-watch-workers")

    async def _watch(self) -> None:
        seen: dict[int, Any] = {}
        while True:
            await asyncio.sleep(self.settings.discord.remote_poll_seconds)
            try:
                seen = await self._watch_once(seen)
            except Exception:
                log.exception("following the workers failed this time; trying again")

    async def _watch_once(self, seen: dict[int, Any]) -> dict[int, Any]:
        now: dict[int, Any] = {}
        for job in await self.store.running():
            if job.worker_id == self.worker.claiming.id:
                continue  # this process's own worker reports it as it happens
            now[job.id] = (job.attempts, job.progress)
            if seen.get(job.id) != now[job.id]:
                await self.cards.refresh(job.id)
        for job in await self.store.undelivered():
            if self._retry_after.get(job.id, 0.0) <= time.monotonic():
                await self.deliver(job)
        if seen.keys() != now.keys():
            await self.cards.refresh_queue()
        return now

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.cards.close()
        if self.http is not None:
            await self.http.close()
        self.intake.close()
        self.audio_intake.close()

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

    async def _download(self, attachment: discord.Attachment) -> bytes:
        assert self.http is not None
        d = self.settings.discord
        return await download_attachment(
            self.http, attachment.url, declared_size=attachment.size,
            max_bytes=self.settings.limits.max_upload_bytes, allowed_hosts=d.cdn_hosts,
            allow_insecure=d.allow_insecure_cdn, timeout_seconds=self.settings.limits.download_timeout_seconds,
        )

    async def _from_attachment(
        self, attachment: discord.Attachment, prompt: str, options: RequestOptions, guild_id: int | None,
        end_attachment: discord.Attachment | None = None,
    ) -> tuple[GenerationRequest, Any]:
        """The request and the first image; an end image goes through the same intake, fitted to the clip's size."""
        data = await self._download(attachment)
        sized = options.sized(self.settings, prompt=prompt, guild_id=guild_id)
        image = await self.intake.normalise(data, sized)
        assert sized.request is not None
        request = sized.request
        if end_attachment is not None:
            try:
                end = await self.intake.normalise(await self._download(end_attachment), fixed_size(request))
            except IntakeError as problem:
                raise IntakeError(problem.code, f"end_image: {problem.message}") from None
            request = with_end_image(request, end.path.name)
        return request, image

    async def _create(
        self, request: GenerationRequest, *, input_path: str, sha256: str, user_id: int, guild: discord.Guild | None,
        guild_id: int | None, channel_id: int | None, key: str, admit: AdmitGate,
        request_message_id: int | None = None, draft: str | None = None, draft_of: int | None = None,
    ) -> tuple[Job, bool]:
        """Insert the job, and whether it is new (not a replay of the same request).

        Raises Refusal when the user's limits, checked with the insert, say no.
        """
        new = NewJob(
            user_id=str(user_id), prompt=request.prompt, negative_prompt=request.negative_prompt,
            params=request.model_dump(mode="json"), input_path=input_path, input_sha256=sha256,
            guild_id=str(guild_id) if guild_id else None, channel_id=str(channel_id) if channel_id else None,
            interaction_id=key, request_message_id=str(request_message_id) if request_message_id else None,
            max_bytes=self.clip_limit(guild), predicted_peak_gib=least_vram(self.settings, request),
            draft=draft, draft_of=draft_of,
        )
        # Stored before the job exists: a worker on another host may claim it at once.
        await self.files.publish_input(Path(input_path), sha256)
        await self.files.publish_request_uploads(request)
        try:
            return await self.store.create(new, admit=admit), True
        except DuplicateJobError as duplicate:
            return duplicate.job, False

    async def animate_from_command(
        self, interaction: discord.Interaction[Any], attachment: discord.Attachment, prompt: str,
        options: RequestOptions, end_image: discord.Attachment | None = None, draft: bool | None = None,
    ) -> None:
        await self._animate_interaction(interaction, attachment, prompt, options, end_image, draft)

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
            end = modal.end_attachment(_image_attachments(modal.message.attachments))
        except ValueError as exc:
            await interaction.response.send_message(str(exc), ephemeral=True)
            return
        await self._animate_interaction(interaction, modal.attachment, modal.prompt.value, options, end)

    async def _animate_interaction(
        self, interaction: discord.Interaction[Any], attachment: discord.Attachment, prompt: str,
        options: RequestOptions, end_attachment: discord.Attachment | None = None, draft: bool | None = None,
    ) -> None:
        try:
            admit = await self._admit(interaction.user, interaction.guild_id)
            # Bad options are refused before anything is downloaded (the image only changes the derived size).
            options.check_end_image(end_attachment is not None)
            checked = options.build(self.settings, prompt=prompt, source_size=(4, 3), guild_id=interaction.guild_id)
            if end_attachment is not None:
                if not _is_image(end_attachment):
                    raise IntakeError("unsupported_type", "end_image must be a JPEG, PNG or WebP picture.")
                with_end_image(checked, "end-image.png")
            step = drafts.draft_step(self.settings, checked, draft, interaction.guild_id)
        except (Refusal, IntakeError) as problem:
            await interaction.response.send_message(problem.message, ephemeral=True)
            return
        except ValueError as problem:
            await interaction.response.send_message(str(problem), ephemeral=True)
            return
        # Download and decoding can take longer than Discord's 3 seconds.
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            request, image = await self._from_attachment(attachment, prompt, options, interaction.guild_id,
                                                         end_attachment)
            job, _ = await self._create(
                request, input_path=str(image.path), sha256=image.sha256, user_id=interaction.user.id,
                guild=interaction.guild, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
                key=str(interaction.id), admit=admit, draft=step,
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
        things: dict[str | None, str] = {DraftStep.DRAFT: "the draft", DraftStep.FINALIZE: "the full clip"}
        what = things.get(job.draft, "the clip")
        await interaction.edit_original_response(
            content=f"Job {job.id} is queued{notes}. I'll post {what} in this channel and mention you."
        )
        await self.cards.post_followup(interaction, job)
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
            await self.cards.refresh(replayed.id)
            return
        if attachment is None:
            await message.reply("Attach an image (or reply to a message with one) and write what should happen.",
                                mention_author=False, allowed_mentions=quiet)
            return
        guild_id = message.guild.id if message.guild else None
        try:
            admit = await self._admit(message.author, guild_id)
            request, image = await self._from_attachment(attachment, prompt, RequestOptions(), guild_id)
            job, created = await self._create(
                request, input_path=str(image.path), sha256=image.sha256, user_id=message.author.id,
                guild=message.guild, guild_id=guild_id, channel_id=message.channel.id, key=f"m{message.id}",
                admit=admit, request_message_id=message.id,
            )
        except (Refusal, IntakeError) as problem:
            await message.reply(f"I can't animate that: {problem.message}", mention_author=False,
                                allowed_mentions=quiet)
            return
        if not created:  # a replay that overlapped the first delivery of the message
            await self.cards.refresh(job.id)
            return
        await self.cards.post_reply(message, job)
        self.worker.ring()

    async def _own_job(self, interaction: discord.Interaction[Any], job_id: int) -> Job | None:
        job = await self.store.get(job_id, str(interaction.user.id), is_admin=await self.admin(interaction))
        if job is None:
            await tell(interaction, f"You have no job {job_id}. `/jobs` lists yours.")
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
            await tell(interaction, refusal.message)
            return
        except ValidationError as exc:
            await tell(interaction, describe_validation_error(exc))
            return
        if request.family not in self.settings.enabled_families():
            name = FAMILY_NAMES[request.family]
            await tell(interaction, f"The {name} model is no longer set up on this bot; start a new /animate.")
            return
        if not job.input_path or not await asyncio.to_thread(Path(job.input_path).is_file):
            await tell(interaction, "The image for that clip is no longer stored; start a new /animate.")
            return
        if request.end_image is not None and not await asyncio.to_thread(
            (self.settings.uploads_dir / request.end_image).is_file
        ):
            await tell(interaction, "The end image for that clip is no longer stored; start a new /animate.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            new, _ = await self._create(
                request, input_path=job.input_path, sha256=job.input_sha256, user_id=interaction.user.id,
                guild=interaction.guild, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
                key=str(interaction.id), admit=admit,
                # Another seed of a draft is a draft again: the user is still choosing.
                draft=DraftStep.DRAFT if job.draft == DraftStep.DRAFT else None,
            )
        except Refusal as refusal:
            await tell(interaction, refusal.message)
            return
        await self._post_card(interaction, new)

    async def finalize(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        """Finalize: queue the rest of a draft (upsample, stage 2, decode) from its kept latents."""
        job = await self._own_job(interaction, job_id)
        if job is None:
            return
        if job.draft != DraftStep.DRAFT or job.status != JobStatus.SUCCEEDED:
            await tell(interaction, f"Job {job_id} is not a finished draft, so there is nothing to finalize.")
            return
        earlier = await self.store.finalize_of(job.id)
        if earlier is not None:
            where = f" ({earlier.posted_message_url})" if earlier.posted_message_url else ""
            await tell(interaction, f"This draft is already finalized as job {earlier.id}{where}.")
            return
        kept = job.draft_kept_until is not None and await self.files.has_draft(
            job.id, draft_state_path(self.settings, job.id))
        if not kept:
            hours = self.settings.generation.draft_keep_hours
            await tell(interaction, f"The draft of job {job_id} can't be finalized any more: its kept latents were "
                                    f"deleted (drafts are kept for {hours:g} hours, or an admin purged them). "
                                    "Press Rerun for a new draft, or start a new /animate.")
            return
        try:
            admit = await self._admit(interaction.user, interaction.guild_id)
            request = GenerationRequest.model_validate(job.params)
        except Refusal as refusal:
            await tell(interaction, refusal.message)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            new, _ = await self._create(
                request, input_path=job.input_path, sha256=job.input_sha256, user_id=int(job.user_id),
                guild=interaction.guild, guild_id=int(job.guild_id) if job.guild_id else None,
                channel_id=int(job.channel_id) if job.channel_id else interaction.channel_id,
                key=str(interaction.id), admit=admit, draft=DraftStep.FINALIZE, draft_of=job.id,
                # The full clip is posted as a reply to the draft.
                request_message_id=int(job.posted_message_id) if job.posted_message_id else None,
            )
        except Refusal as refusal:
            await tell(interaction, refusal.message)
            return
        await self._post_card(interaction, new)

    async def purge_drafts(self) -> str:
        """``/admin purge drafts``: delete every kept draft's latents now."""
        kept = await self.store.kept_drafts()
        removed = await drafts.delete_kept(self.settings, self.store, kept)
        log.info("purged the kept latents of %d drafts", len(kept))
        return (f"Deleted the kept latents of {len(kept)} drafts ({removed} files). Their clips stay; "
                "Finalize on them now explains that they were deleted.")

    async def open_tweak(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        job = await self._own_job(interaction, job_id)
        if job is not None:
            await interaction.response.send_modal(TweakModal(job.id, job.prompt, self.settings.limits.max_prompt_chars))

    # --- extend (docs/DESIGN.md, 'Extend') ------------------------------------------------

    def extension_frames(self, source: GenerationRequest) -> int:
        """The next segment's frames for a clip made by ``source``; 0 when the clip is at the longest allowed.

        Each press adds about ``extend.segment_seconds`` after the overlap, less near the end of
        ``extend.max_seconds``, in steps of 8 frames (the model's grid).
        """
        ext, fps = self.settings.extend, source.fps
        room = int(ext.max_seconds * fps + 1e-9) - source.total_frames
        wanted = max(8, round(ext.segment_seconds * fps / 8) * 8)
        most = min(self.settings.limits.max_frames, MAX_FRAMES) - EXTEND_OVERLAP_FRAMES
        added = min(wanted, room, most) // 8 * 8
        return EXTEND_OVERLAP_FRAMES + added if added >= 8 else 0

    async def _extendable(
        self, interaction: discord.Interaction[Any], job_id: int
    ) -> tuple[Job, GenerationRequest, int] | None:
        """The job, its request and the next segment's frames, if its clip can be extended; else the user is told."""
        job = await self._own_job(interaction, job_id)
        if job is None:
            return None
        if job.status != JobStatus.SUCCEEDED or job.draft == DraftStep.DRAFT:
            what = "is a draft: Finalize it first, then extend the full clip" if job.draft == DraftStep.DRAFT else (
                "has no finished clip to extend")
            await tell(interaction, f"Job {job_id} {what}.")
            return None
        try:
            source = GenerationRequest.model_validate(job.params)
        except ValidationError:
            await tell(interaction, f"Job {job_id} was made by an older version of the bot and can't be extended.")
            return None
        if source.family != "ltx2":
            await tell(interaction, "Extend needs the LTX-2 model: LTX-Video clips can't be continued. "
                                    "Try Rerun, or a new /animate with the LTX-2 model.")
            return None
        frames = self.extension_frames(source)
        if not frames:
            limit = self.settings.extend.max_seconds
            await tell(interaction, f"This clip is already {source.total_frames / source.fps:.1f} s long, and "
                                    f"extended clips stop at {limit:g} s on this server. Start a new /animate "
                                    "from its last frame to go on.")
            return None
        return job, source, frames

    async def open_extend(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        """The Extend button: refuse at once what cannot be extended, else ask what happens next."""
        found = await self._extendable(interaction, job_id)
        if found is not None:
            job = found[0]
            await interaction.response.send_modal(ExtendModal(job.id, job.prompt,
                                                              self.settings.limits.max_prompt_chars))

    async def extend(self, interaction: discord.Interaction[Any], job_id: int, prompt: str) -> None:
        """Queue the next segment of a delivered clip; the longer clip is posted as a reply to it."""
        found = await self._extendable(interaction, job_id)  # again: the clip may have changed meanwhile
        if found is None:
            return
        job, source, frames = found
        params = source.model_dump(mode="json") | {
            "prompt": prompt, "seed": secrets.randbelow(2**32), "frames": frames, "mode": "extend",
            "source_job": job.id, "source_frames": source.total_frames,
            # The clip's last frames condition the segment; the first clip's end image or loop does not,
            # nor another mode's own inputs (a lip-sync track, a retake's region).
            "end_image": None, "loop": False, "audio_file": None, "retake_start": None, "retake_end": None,
        }
        try:
            admit = await self._admit(interaction.user, interaction.guild_id)
            request = GenerationRequest.model_validate(params | {"source_video": "pending.mp4"})
            check_owner_limits(self.settings, request)
        except (Refusal, IntakeError) as refusal:
            await tell(interaction, refusal.message)
            return
        except ValidationError as exc:
            await tell(interaction, describe_validation_error(exc))
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        name = await self.files.clip_as_upload(job)
        if name is None:
            await tell(interaction, f"The clip of job {job_id} is no longer stored, so it can't be extended.")
            return
        request = request.model_copy(update={"source_video": name})
        try:
            new, _ = await self._create(
                request, input_path=job.input_path, sha256=job.input_sha256, user_id=interaction.user.id,
                guild=interaction.guild, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
                key=str(interaction.id), admit=admit,
                request_message_id=int(job.posted_message_id) if job.posted_message_id else None,
            )
        except Refusal as refusal:
            await tell(interaction, refusal.message)
            return
        await self._post_card(interaction, new)

    # --- retake (docs/DESIGN.md, 'Retake') ------------------------------------------------

    async def open_retake(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        """Retake under a delivered clip: the form, once the clip and the user may have one."""
        job = await self._own_job(interaction, job_id)
        if job is None:
            return
        refusal = retake_refusal(job)
        if refusal is not None:
            await tell(interaction, refusal)
            return
        try:
            await self._admit(interaction.user, interaction.guild_id)
        except Refusal as problem:
            await tell(interaction, problem.message)
            return
        await interaction.response.send_modal(RetakeModal(
            job.id, job.prompt, clip_seconds(job.params), self.settings.limits.max_prompt_chars))

    async def retake_from_modal(self, interaction: discord.Interaction[Any], modal: RetakeModal) -> None:
        """Queue the retake: the region checked first, then the clip copied into uploads, then the job."""
        job = await self._own_job(interaction, modal.job_id)
        if job is None:
            return
        refusal = retake_refusal(job)
        if refusal is not None:
            await tell(interaction, refusal)
            return
        try:
            start, end = modal.region()
            admit = await self._admit(interaction.user, interaction.guild_id)
            request = retake_request(job.params, prompt=modal.prompt.value, start=start, end=end,
                                     seed=secrets.randbelow(2**32), source_video=PENDING_SOURCE, source_job=job.id)
            check_owner_limits(self.settings, request)
        except (Refusal, IntakeError) as problem:
            await tell(interaction, problem.message)
            return
        except ValidationError as exc:
            await tell(interaction, describe_validation_error(exc))
            return
        except ValueError as exc:
            await tell(interaction, str(exc))
            return
        if request.family not in self.settings.enabled_families():
            await tell(interaction, f"The {FAMILY_NAMES[request.family]} model is no longer set up on this bot.")
            return
        # The retake does not read the image, but its job carries it as every job does (Rerun needs it).
        if not job.input_path or not await asyncio.to_thread(Path(job.input_path).is_file):
            await tell(interaction, "The image for that clip is no longer stored; start a new /animate.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        source = await self.files.clip_as_upload(job)
        if source is None:
            await tell(interaction, f"The clip of job {job.id} is no longer stored, so it can't be retaken. "
                                    "Press Rerun for a new one.")
            return
        request = GenerationRequest.model_validate(request.model_dump() | {"source_video": source})
        try:
            new, _ = await self._create(
                request, input_path=job.input_path, sha256=job.input_sha256, user_id=interaction.user.id,
                guild=interaction.guild, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
                key=str(interaction.id), admit=admit,
                # The retake is posted as a reply to the clip it retakes.
                request_message_id=int(job.posted_message_id) if job.posted_message_id else None,
            )
        except Refusal as problem:
            await tell(interaction, problem.message)
            return
        await self._post_card(interaction, new)

    # --- cancelling -----------------------------------------------------------------------

    async def cancel(self, interaction: discord.Interaction[Any], job_id: int) -> str:
        outcome = await self.store.cancel(job_id, str(interaction.user.id), is_admin=await self.admin(interaction))
        if outcome == CancelOutcome.CANCELLED:
            await self.cards.refresh(job_id)
            await self.cards.refresh_queue()
            return f"Job {job_id} is cancelled."
        if outcome == CancelOutcome.STOPPING:
            await self.cards.refresh(job_id)
            return f"Job {job_id} is stopping; its card will say when it has."
        if outcome == CancelOutcome.FINISHED:
            return f"Job {job_id} has already finished."
        return f"You have no job {job_id}. `/jobs` lists yours."

    async def cancel_from_button(self, interaction: discord.Interaction[Any], job_id: int) -> None:
        await interaction.response.send_message(await self.cancel(interaction, job_id), ephemeral=True)

    async def queue_summary(self, user_id: int) -> str:
        """``/queue``: the workers and what each renders, then every waiting job in the order it will start."""
        store = self.store
        queued = await store.queued_ids()
        lines = [f"**{len(queued)}** waiting" + (" · the queue is **paused**" if await store.is_paused() else "")]
        workers = {w.id: w for w in await store.workers() if w.state != WorkerState.STOPPED}
        for job in await store.running():
            live = self.cards.live.get(job.id) or job.progress
            where = workers.get(job.worker_id or "")
            on = f" on {where.name}" if where is not None else ""
            lines.append(f"Rendering job {job.id}{on}: {cards.stage_text(live)}")
        idle = [w.name for w in workers.values() if cards.worker_status(w) in ("idle", "draining")
                and w.current_job_id is None]
        if idle:
            lines.append("Idle: " + ", ".join(idle[:10]))
        if queued:
            mine = set(await store.queued_ids(str(user_id)))
            shown = [f"{n}. job {job_id}" + (" (yours)" if job_id in mine else "")
                     for n, job_id in enumerate(queued[:QUEUE_SHOWN], start=1)]
            lines.append("Next: " + " · ".join(shown) + (f" · and {len(queued) - QUEUE_SHOWN} more"
                                                         if len(queued) > QUEUE_SHOWN else ""))
            beyond = [f"job {job_id}: {queued.index(job_id) + 1} of {len(queued)}"
                      for job_id in queued[QUEUE_SHOWN:] if job_id in mine]
            if beyond:
                lines.append("Yours further back: " + ", ".join(beyond))
        return "\n".join(lines)

    async def workers_summary(self) -> str:
        """``/admin workers``: each worker's GPU, state, current job, clips rendered and last heartbeat."""
        workers = await self.store.workers()
        if not workers:
            return "No worker has registered yet."
        lines = [cards.worker_line(w) for w in workers[:WORKERS_SHOWN]]
        if len(workers) > WORKERS_SHOWN:
            lines.append(f"… and {len(workers) - WORKERS_SHOWN} more (`ltxbot workers` lists all).")
        return "\n".join(lines)

    async def drain_worker(self, name: str) -> str:
        asked = await self.store.request_drain(name)
        if not asked:
            return f"No running worker is called {cards.shorten(name, 80)}; `/admin workers` lists them."
        log.info("drain requested for worker %s", name)
        return (f"Asked {asked[0].name} to finish its current clip and stop taking new ones."
                if len(asked) == 1 else f"Asked {len(asked)} workers called {asked[0].name} to stop after their clip.")

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
        # The embedding cache is named by hashes only, so one user's entries cannot be told apart:
        # all of it goes (docs/DESIGN.md, 'Prompt-embedding cache'); the next jobs re-encode.
        await asyncio.to_thread(_empty_embedding_cache, settings.embedding_cache_dir)
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

    # --- progress ------------------------------------------------------------------------------

    async def on_worker_event(self, job: Job, event: Any) -> None:
        if isinstance(event, PreviewEvent):
            with contextlib.suppress(ValueError):  # only a preview inside the jobs folder is shown
                self.cards.previews[job.id] = confined_path(self.settings.jobs_dir, str(event.path))
                await self.cards.refresh(job.id)
        elif isinstance(event, ProgressEvent):
            self.cards.live[job.id] = event.model_dump(exclude={"event"})
            await self.cards.refresh(job.id)
        elif isinstance(event, StartedEvent):
            self.cards.live[job.id] = {"stage": "starting", "step": 0, "total": 0}
            await self.cards.refresh(job.id)
            await self.cards.refresh_queue()
        elif isinstance(event, Ending):
            self.cards.live.pop(job.id, None)
            self.cards.previews.pop(job.id, None)
            if job.status in ACTIVE_STATUSES:  # requeued for another attempt
                await self.cards.refresh(job.id)
                return
            leftovers = self._purge_when_ended.pop(job.id, None)
            if leftovers:
                removed = await asyncio.to_thread(_remove_all, leftovers)
                log.info("purge: %d files of job %s deleted now that it has stopped", removed, job.id)
            await self.deliver(job)
            await self.cards.refresh_queue()

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
                await self.cards.refresh(fresh.id)
                return
            channel = self.cards.channel(fresh)
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
                    log.warning("could not post job %s (HTTP %s); will retry in a minute", fresh.id, exc.status)
                    self._retry_after[fresh.id] = time.monotonic() + 60.0
                    return
                message = await channel.send(
                    f"<@{fresh.user_id}> job {fresh.id} is done, but the clip is over this server's upload "
                    "limit. Try a shorter clip or a smaller size.",
                    reference=reference or discord.utils.MISSING, allowed_mentions=mentions,
                )
            self._retry_after.pop(fresh.id, None)
            url = self._message_url(fresh, message.id)
            await self.store.mark_delivered(fresh.id, str(message.id), url)
            log.info("job %s posted as message %s", fresh.id, message.id)
        await self.cards.refresh(job.id)

    async def _post_result(
        self, job: Job, channel: discord.PartialMessageable, reference: discord.MessageReference | None,
        mentions: discord.AllowedMentions, nonce: str,
    ) -> discord.Message:
        clip = await self.files.clip_for(job) if job.status == JobStatus.SUCCEEDED else None
        if clip is not None:
            name = f"ltxbot-{job.id}-draft.mp4" if job.draft == DraftStep.DRAFT else f"ltxbot-{job.id}.mp4"
            return await channel.send(
                cards.delivery_caption(job), file=discord.File(clip, filename=name),
                reference=reference or discord.utils.MISSING, allowed_mentions=mentions,
                view=draft_view(job.id) if job.draft == DraftStep.DRAFT else delivery_view(job.id), nonce=nonce,
            )
        if job.status == JobStatus.SUCCEEDED:
            job.error_message = "The finished clip is no longer on disk."
        return await channel.send(
            cards.failure_notice(job), reference=reference or discord.utils.MISSING, allowed_mentions=mentions,
            nonce=nonce,
        )

    # --- lipsync (docs/DESIGN.md, 'Lip-sync') ---------------------------------------------

    async def lipsync_from_command(
        self, interaction: discord.Interaction[Any], image: discord.Attachment, audio: discord.Attachment,
        prompt: str, options: RequestOptions,
    ) -> None:
        """/lipsync: the audio goes through its intake first (its length sets the clip's), then the image."""
        limits, fps = self.settings.limits, self.settings.generation.fps
        try:
            admit = await self._admit(interaction.user, interaction.guild_id)
            # Bad options are refused before anything is downloaded; the audio only changes the frame count.
            checked = lipsync_options(options, 9).build(self.settings, prompt=prompt, source_size=(4, 3),
                                                        guild_id=interaction.guild_id)
            with_audio_track(checked, "audio.wav")
        except (Refusal, IntakeError) as problem:
            await interaction.response.send_message(problem.message, ephemeral=True)
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        track = None
        try:
            try:
                data = await self._download_audio(audio)
                track = await self.audio_intake.normalise(
                    data, max_seconds=limits.max_audio_seconds, fps=fps, max_frames=limits.max_frames)
            except IntakeError as problem:
                raise IntakeError(problem.code, f"audio: {problem.message}") from None
            try:
                request, picture = await self._from_attachment(
                    image, prompt, lipsync_options(options, track.frames), interaction.guild_id)
            except IntakeError as problem:
                raise IntakeError(problem.code, f"image: {problem.message}") from None
            request = with_audio_track(request, track.path.name)
            job, _ = await self._create(
                request, input_path=str(picture.path), sha256=picture.sha256, user_id=interaction.user.id,
                guild=interaction.guild, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
                key=str(interaction.id), admit=admit,
            )
        except (IntakeError, Refusal) as problem:
            if track is not None and track.fresh:
                await asyncio.to_thread(track.path.unlink, missing_ok=True)  # no job will ever read it
            text = f"I can't animate that: {problem.message}" if isinstance(problem, IntakeError) else problem.message
            await interaction.edit_original_response(content=text)
            return
        notes = picture.notes + track.notes
        await self._post_card(interaction, job, f" ({'; '.join(notes)})" if notes else "")

    async def _download_audio(self, attachment: discord.Attachment) -> bytes:
        assert self.http is not None
        d = self.settings.discord
        return await download_attachment(
            self.http, attachment.url, declared_size=attachment.size,
            max_bytes=self.settings.limits.max_upload_bytes, allowed_hosts=d.cdn_hosts,
            allow_insecure=d.allow_insecure_cdn, timeout_seconds=self.settings.limits.download_timeout_seconds,
            what="audio file",
        )

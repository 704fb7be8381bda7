"""Input images and finished clips for hosts that share nothing but the database.

On one machine (SQLite, or PostgreSQL with ``share_files: local``) every process reads the
same data dir and nothing here copies anything. With ``share_files: database`` (the default on
PostgreSQL) the front end stores each input image in the ``blobs`` table when it queues the
job, a worker on another host writes it into its own uploads folder before the render, and
the worker stores the finished clip there for the front end to post; the clip's row goes
once it is posted. Why the database and not an object store: docs/DESIGN.md, "Scale-out".

Every file lands inside its own data dir (``confined_path``) under a name made here (the
image's sha256, the job's id), never under a name read from the database, and its sha256 is
checked before it is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bot.db.store import clip_key, draft_key, input_key
from bot.intake.image import confined_path
from generator.protocol import UPLOAD_FIELDS

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.db.models import Job
    from bot.db.store import JobStore
    from generator.protocol import GenerationRequest

CLIP_NAME = "clip.mp4"


class MissingFileError(Exception):
    """A file the job needs is neither on this host nor in the database."""


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_file_under(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve()) and path.is_file()


class SharedFiles:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.enabled = settings.files_through_database()

    # --- input images ---------------------------------------------------------------

    async def publish_input(self, path: Path, sha256: str) -> None:
        """Make a queued job's image readable by workers on other hosts (once per image)."""
        if not self.enabled or await self.store.has_blob(input_key(sha256)):
            return
        data = await asyncio.to_thread(path.read_bytes)
        await self.store.put_blob(input_key(sha256), data, sha256)

    async def input_for(self, job: Job) -> Path:
        """The job's image on this host: its own path when it is in this uploads folder, else fetched."""
        uploads = self.settings.uploads_dir
        recorded = Path(job.input_path)
        if await asyncio.to_thread(_is_file_under, recorded, uploads):
            return recorded
        if not self.enabled or not job.input_sha256:
            return recorded  # the spec check refuses it with a sentence
        local = confined_path(uploads, f"{job.input_sha256}.png")
        if await asyncio.to_thread(local.is_file) and await asyncio.to_thread(_sha256_of, local) == job.input_sha256:
            return local
        blob = await self.store.get_blob(input_key(job.input_sha256))
        if blob is None or hashlib.sha256(blob[0]).hexdigest() != job.input_sha256:
            raise MissingFileError("The image for this clip is no longer stored; start a new /animate.")
        await asyncio.to_thread(_write_atomically, local, blob[0])
        return local

    async def publish_upload(self, name: str) -> None:
        """Another upload of the job (an end image, a source clip, an audio track), named ``<sha256>.<ext>`` here."""
        if not self.enabled:
            return
        path = confined_path(self.settings.uploads_dir, name)
        data = await asyncio.to_thread(path.read_bytes)
        sha256 = hashlib.sha256(data).hexdigest()
        if not await self.store.has_blob(input_key(sha256)):
            await self.store.put_blob(input_key(sha256), data, sha256)

    async def publish_request_uploads(self, request: GenerationRequest) -> None:
        """Every upload the request names besides its first image (end image, source clip, audio track)."""
        for field in UPLOAD_FIELDS:
            name = getattr(request, field)
            if name is not None:
                await self.publish_upload(name)

    async def ensure_upload(self, name: str) -> None:
        """Make ``uploads/<name>`` exist on this host, fetched by its content name when it was made elsewhere."""
        local = confined_path(self.settings.uploads_dir, name)
        if not self.enabled or await asyncio.to_thread(local.is_file):
            return
        sha256 = Path(name).stem
        blob = await self.store.get_blob(input_key(sha256))
        if blob is None or hashlib.sha256(blob[0]).hexdigest() != sha256:
            raise MissingFileError("An image for this clip is no longer stored; start a new /animate.")
        await asyncio.to_thread(_write_atomically, local, blob[0])

    # --- drafts' kept latents ---------------------------------------------------------

    async def publish_draft(self, job_id: int, path: Path) -> None:
        """A finished draft's kept state, for a finalize that another host's worker may claim."""
        if self.enabled and await asyncio.to_thread(path.is_file):
            data = await asyncio.to_thread(path.read_bytes)
            await self.store.put_blob(draft_key(job_id), data, hashlib.sha256(data).hexdigest())

    async def has_draft(self, job_id: int, path: Path) -> bool:
        if await asyncio.to_thread(path.is_file):
            return True
        return self.enabled and await self.store.has_blob(draft_key(job_id))

    async def draft_here(self, job_id: int, path: Path) -> None:
        """Make the draft's kept state exist at ``path`` (this host's job folder of the draft)."""
        if not self.enabled or await asyncio.to_thread(path.is_file):
            return
        blob = await self.store.get_blob(draft_key(job_id))
        if blob is not None and hashlib.sha256(blob[0]).hexdigest() == blob[1]:
            await asyncio.to_thread(_write_atomically, path, blob[0])

    async def forget_drafts(self, job_ids: list[int]) -> None:
        await self.store.delete_blobs([draft_key(job_id) for job_id in job_ids])

    # --- finished clips -----------------------------------------------------------------

    async def publish_clip(self, job_id: int, path: Path) -> None:
        """Before the job is marked done: the clip, for a front end on another host."""
        if not self.enabled:
            return
        data = await asyncio.to_thread(path.read_bytes)
        await self.store.put_blob(clip_key(job_id), data, hashlib.sha256(data).hexdigest())

    async def clip_for(self, job: Job) -> Path | None:
        """The finished clip on this host, fetched from the database when it was rendered elsewhere."""
        jobs_dir = self.settings.jobs_dir
        if job.output_path:
            try:
                recorded = confined_path(jobs_dir, job.output_path)
            except ValueError:
                recorded = None
            if recorded is not None and await asyncio.to_thread(recorded.is_file):
                return recorded
        if not self.enabled:
            return None
        blob = await self.store.get_blob(clip_key(job.id))
        if blob is None or hashlib.sha256(blob[0]).hexdigest() != blob[1]:
            return None
        local = confined_path(jobs_dir, f"{job.id}/{CLIP_NAME}")
        await asyncio.to_thread(_write_atomically, local, blob[0])
        return local

    async def forget_clip(self, job_id: int) -> None:
        """The clip reached its owner (``ltxbot animate`` wrote it out): no other host needs it any more."""
        await self.store.delete_blobs([clip_key(job_id)])

    async def clip_as_upload(self, job: Job) -> str | None:
        """A delivered clip copied into the uploads folder by content (``<sha256>.mp4``), for extend and retake.

        The new job names it like an end image, so it travels to another host's worker the same
        way and outlives the source job's folder. None when the clip is no longer stored.
        """
        clip = await self.clip_for(job)
        if clip is None:
            return None
        data = await asyncio.to_thread(clip.read_bytes)
        name = f"{hashlib.sha256(data).hexdigest()}.mp4"
        target = confined_path(self.settings.uploads_dir, name)
        if not await asyncio.to_thread(target.is_file):
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(_write_atomically, target, data)
        return name

"""The worker: one job at a time, each in a fresh ``python -m generator`` process group.

The database is the queue and the store's doorbell (bot/db/doorbell.py) wakes an idle worker. A hang, a crash,
an out-of-memory error, a cancel or a restart of the bot never loses a job, never
runs one twice at once, and never leaves a generator holding GPU memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.metadata
import json
import logging
import os
import secrets
import shutil
import signal
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bot.db.models import NOT_RETRIED, DraftStep, EndCode, WorkerState
from bot.db.store import ClaimingWorker, WorkerInfo, add_capability, is_orphaned
from bot.processes import ProcessId, host_name, is_our_generator, kill_group, process_start_ticks
from bot.shared_files import MissingFileError, SharedFiles
from generator.lifeline import SUPERVISOR_ENV
from generator.protocol import (
    FAMILY_NAMES,
    STAGING_ENV,
    UPLOAD_FIELDS,
    WARM_COMPILER_ENV,
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    JobSpec,
    LoraFile,
    LtxvModelFiles,
    ModelFamily,
    ModelFiles,
    PhaseEvent,
    ProgressEvent,
    StartedEvent,
    Tiling,
    describe_validation_error,
    parse_event,
)

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.db.models import Job
    from bot.db.store import JobStore

log = logging.getLogger(__name__)

# Only these reach the generator: never the Discord token.
ENV_ALLOWLIST = (
    "PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF", "OMP_NUM_THREADS",
    "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LTXBOT_FAULT", "LTXBOT_FAULT_ONCE", "LTXBOT_FAULT_SECONDS",
)
CLIP_NAME = "clip.mp4"
# A draft's kept stage-1 state and the stage-1 previews, in the job's folder.
DRAFT_STATE_NAME = "draft.pt"
PREVIEWS_DIR = "previews"
# How the generator's own error codes read as the job's end.
GENERATOR_ERRORS: dict[str, EndCode] = {
    "oom": EndCode.OOM, "invalid_spec": EndCode.INVALID, "model_missing": EndCode.MODEL_MISSING,
    "too_large": EndCode.TOO_LARGE,
}
INVALID_PREFIX = "This job's settings are not valid any more:"
# The worker loop's pause after an unexpected error, doubling up to the maximum while errors repeat.
RETRY_DELAY_SECONDS = 1.0
# `ltxbot animate --preview-dir` with previews off in the config.
DEFAULT_PREVIEW_SECONDS = 2.0
MAX_RETRY_DELAY_SECONDS = 60.0


def new_error_id() -> str:
    """A short id that ties a user's apology to the full traceback in the bot's log."""
    return secrets.token_hex(4)


@dataclass(frozen=True)
class Ending:
    """How one attempt ended, as the store and the user should hear it."""

    code: EndCode
    message: str
    done: DoneEvent | None = None


def unservable_reason(job: Job, served: dict[str, float | None]) -> str | None:
    """Why no worker in ``served`` (family -> largest VRAM budget, None: any) can render ``job``; None if one can."""
    family = job.family or "ltx2"
    if family not in served:
        name = FAMILY_NAMES.get(family, family)
        return (f"The {name} model family is not enabled on this bot, so this clip cannot be rendered. "
                f"Please start a new /animate.")
    budget, need = served[family], job.predicted_peak_gib
    if budget is not None and need is not None and need > budget:
        return (f"This clip needs about {need:.1f} GiB of GPU memory and the largest worker's budget is "
                f"{budget:.1f} GiB. Try fewer frames or a smaller size.")
    return None


class GeneratorStartError(Exception):
    """The family's interpreter could not be started at all (a wrong ``python`` path in the config)."""


Listener = Callable[["Job", Any], Awaitable[None]]


def job_dir(settings: Settings, job_id: int) -> Path:
    return settings.jobs_dir / str(job_id)


def timeout_for(settings: Settings, request: GenerationRequest) -> float:
    g = settings.generator
    megapixel_frames = request.width * request.height * request.frames / 1e6
    return g.timeout_base_seconds + g.timeout_seconds_per_mpx_frame * megapixel_frames


def _absolute(paths: dict[str, Path | None]) -> dict[str, Path | None]:
    """Model paths in the config are relative to where the bot runs; the generator runs in the job's folder."""
    return {key: None if path is None else path.expanduser().absolute() for key, path in paths.items()}


def draft_state_path(settings: Settings, draft_id: int) -> Path:
    return job_dir(settings, draft_id) / DRAFT_STATE_NAME


def end_image_path(settings: Settings, request: GenerationRequest, image: Path) -> Path | None:
    """The image for the last frame: the first one for a loop, else the end image, inside the uploads folder."""
    if request.loop:
        return image
    return upload_path(settings, request.end_image, "end image")


def upload_path(settings: Settings, name: str | None, what: str) -> Path | None:
    """An upload name from the request, resolved inside the uploads folder (never outside it)."""
    if name is None:
        return None
    uploads = settings.uploads_dir.resolve()
    path = (uploads / name).resolve()
    if not path.is_relative_to(uploads):
        raise ValueError(f"the job's {what} is outside the uploads folder")
    return path


def lora_files(settings: Settings, request: GenerationRequest) -> tuple[LoraFile, ...]:
    """The request's LoRAs resolved to the owner's files (a job outlives a config edit: then it fails clearly)."""
    files = []
    for choice in request.loras:
        entry = settings.loras.get(choice.name)
        if entry is None:
            raise ValueError(f"the LoRA {choice.name} is no longer listed under loras in the config")
        files.append(LoraFile(name=choice.name, path=entry.file.expanduser().absolute(), strength=choice.strength))
    return tuple(files)


def build_spec(
    settings: Settings, job: Job, image_path: Path | None = None, *, preview_dir: Path | None = None
) -> JobSpec:
    """The generator's spec for ``job``; ``image_path`` is the job's image on this host, when it was fetched."""
    uploads = settings.uploads_dir.resolve()
    image = (image_path or Path(job.input_path)).resolve()
    if not image.is_relative_to(uploads):
        raise ValueError("the job's image is outside the uploads folder")
    t = settings.vae_tiling
    request = GenerationRequest.model_validate(job.params)
    end_image = end_image_path(settings, request, image)
    if request.family not in settings.enabled_families():
        raise ValueError(f"the {FAMILY_NAMES[request.family]} model family is not enabled on this bot")
    ltxv = settings.ltxv
    return JobSpec(
        request=request,
        image_path=image,
        end_image_path=end_image,
        source_video_path=upload_path(settings, request.source_video, "source clip"),
        audio_path=upload_path(settings, request.audio_file, "audio track"),
        loras=lora_files(settings, request),
        output_path=job_dir(settings, job.id) / CLIP_NAME,
        models=ModelFiles(**_absolute(settings.models.model_dump())),
        ltxv_models=LtxvModelFiles(**_absolute(ltxv.model_dump(include=set(LtxvModelFiles.model_fields)))),
        tiling=Tiling(
            spatial_px=t.spatial_px, spatial_overlap_px=t.spatial_overlap_px,
            temporal_frames=t.temporal_frames, temporal_overlap_frames=t.temporal_overlap_frames,
        ),
        fp8_cast=settings.generator.fp8_cast,
        guidance_batch=settings.generator.guidance_batch,
        vram_budget_gib=settings.generator.vram_budget_gib,
        embedding_cache_dir=settings.embedding_cache_dir,
        embedding_cache_bytes=int(settings.generator.embedding_cache_gib * 2**30),
        quantization=settings.generator.quantization,
        compile_blocks=settings.generator.compile_blocks,
        cuda_graphs=settings.generator.cuda_graphs,
        compile_cache_dir=settings.compile_cache_dir,
        prepared_dir=settings.prepared_dir,
        prepared_cache_gib=settings.generator.prepared_cache_gib,
        host_ram_budget_gib=settings.generator.host_ram_budget_gib,
        pin_staged=settings.generator.pin_staged,
        device=settings.generator.device,
        crf=settings.generation.crf,
        max_bytes=job.max_bytes,
        **draft_fields(settings, job, preview_dir),
    )


def draft_fields(settings: Settings, job: Job, preview_dir: Path | None) -> dict[str, Any]:
    """The spec's draft and preview fields (docs/DESIGN.md, 'Drafts and previews')."""
    fields: dict[str, Any] = {}
    if job.draft == DraftStep.DRAFT:
        fields |= {"draft": "draft", "draft_state": draft_state_path(settings, job.id).absolute()}
    elif job.draft == DraftStep.FINALIZE:
        if job.draft_of is None or not draft_state_path(settings, job.draft_of).is_file():
            raise ValueError(f"the draft it finalizes (job {job.draft_of}) has been deleted; Rerun it instead")
        fields |= {"draft": "finalize", "draft_state": draft_state_path(settings, job.draft_of).absolute()}
    interval = settings.generator.preview_interval_seconds
    if preview_dir is not None and interval <= 0:
        interval = DEFAULT_PREVIEW_SECONDS  # an owner who asks for a folder of previews wants some
    if interval > 0 and job.draft != DraftStep.FINALIZE:  # a finalize has no stage 1
        folder = preview_dir if preview_dir is not None else job_dir(settings, job.id) / PREVIEWS_DIR
        fields |= {"preview_every_seconds": interval, "preview_dir": folder.absolute()}
    return fields


def child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWLIST}
    if settings.generator.expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env["PYTHONUNBUFFERED"] = "1"
    if settings.worker.gpu is not None:
        # One worker per GPU: its generators see that GPU alone, as device 0.
        env["CUDA_VISIBLE_DEVICES"] = str(settings.worker.gpu)
    # The generator ends with this process: see generator/lifeline.py.
    me = ProcessId.current()
    env[SUPERVISOR_ENV] = f"{me.pid}:{me.start_ticks}"
    # Model files are local paths; nothing in a render may reach the network.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if settings.generator.host_ram_budget_gib > 0:
        # What a standby may stage before its job (generator/ltx2/staging.py).
        env[STAGING_ENV] = json.dumps({"dir": str(settings.prepared_dir),
                                       "budget_gib": settings.generator.host_ram_budget_gib})
    if settings.generator.compile_blocks:
        env[WARM_COMPILER_ENV] = "1"
    return env


async def _wait_gone(pid: int, start_ticks: int | None, seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while process_start_ticks(pid) == start_ticks and loop.time() < deadline:
        await asyncio.sleep(0.05)


class BoundedLog:
    """The generator's stderr, written through as it comes and kept to about ``limit`` bytes.

    Every line reaches the file at once (unbuffered), so a kill -9 of the bot keeps what the
    generator said up to that moment, including where a hung one stopped. The first half of the
    budget keeps the head; after it the file holds a rolling tail, rewritten behind a
    "lines dropped" marker whenever it outgrows the other half.
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.limit = limit
        self.handle = path.open("ab", buffering=0)
        self.head_bytes = 0
        self.head_end: int | None = None  # where the tail starts, once the head is full
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_bytes = 0
        self.tail_on_disk = 0
        self.dropped = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=20)

    def write(self, line: str) -> None:
        self.recent.append(line)
        data = line.encode("utf-8", errors="replace")[: self.limit // 4]
        if self.head_end is None:
            if self.head_bytes + len(data) <= self.limit // 2:
                self.handle.write(data)
                self.head_bytes += len(data)
                return
            self.head_end = self.handle.tell()
        self.handle.write(data)
        self.tail_on_disk += len(data)
        self.tail.append(data)
        self.tail_bytes += len(data)
        while self.tail_bytes > self.limit // 4 and len(self.tail) > 1:
            self.tail_bytes -= len(self.tail.popleft())
            self.dropped += 1
        if self.tail_on_disk > self.limit // 2:
            self.handle.truncate(self.head_end)
            marker = f"... {self.dropped} lines dropped ...\n".encode()
            self.handle.write(marker + b"".join(self.tail))
            self.tail_on_disk = len(marker) + self.tail_bytes

    def close(self) -> list[str]:
        """Close the file; the last lines, for the worker's own log."""
        self.handle.close()
        return list(self.recent)


def live_after(settings: Settings, now: datetime) -> datetime:
    """Workers heard from since then count as live: two leases, so one late heartbeat is not taken for a death."""
    return now - timedelta(seconds=2 * settings.worker.lease_seconds)


def worker_name(settings: Settings) -> str:
    gpu = settings.worker.gpu
    return settings.worker.name or (host_name() + (f":gpu{gpu}" if gpu is not None else ""))


def _bot_side_libraries() -> dict[str, str]:
    """Versions as installed beside the bot (the generator reports its own with its first job)."""
    versions = {}
    for name in ("torch", "ltx-core", "transformers"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


async def gpu_name(index: int | None) -> str | None:
    """The GPU's name from nvidia-smi, without touching CUDA here; None without one."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            tool, "--query-gpu=name", "--format=csv,noheader", "-i", str(index or 0),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    except (OSError, TimeoutError):
        return None
    name = out.decode(errors="replace").strip().splitlines()
    return name[0][:255] if proc.returncode == 0 and name else None


class Worker:
    def __init__(
        self, settings: Settings, store: JobStore, *, standby: bool = False, preview_dir: Path | None = None
    ) -> None:
        """``standby``: keep the next generator process started and imported, waiting for its job.

        It cuts the per-job start from about 13 s to well under one; it holds no GPU memory
        while it waits (CUDA starts only with the job) and still runs exactly one job.
        One worker per process: the store records this process as the supervisor of its jobs.
        """
        self.settings = settings
        self.store = store
        self.preview_dir = preview_dir  # `ltxbot animate --preview-dir`: previews there instead of the job's folder
        self.me = ProcessId.current()
        self.listeners: list[Listener] = []
        self.current: tuple[int, asyncio.subprocess.Process] | None = None
        self._progress_saved_at = 0.0
        self.standby_enabled = standby
        self._standby: asyncio.subprocess.Process | None = None
        self._standby_family: ModelFamily | None = None
        self._recovered = False
        self.files = SharedFiles(settings, store)
        budget = settings.generator.vram_budget_gib
        self.claiming = ClaimingWorker(
            id=uuid.uuid4().hex, families=tuple(settings.enabled_families()),
            lease_seconds=settings.worker.lease_seconds,
            # A number is a promise this worker keeps; "auto" is decided by the card at job start, so it takes any job.
            vram_budget_gib=float(budget) if isinstance(budget, int | float) else None,
        )
        self.heartbeat_seconds = max(0.5, settings.worker.lease_seconds / 3)
        self.registered = False
        self.drain_requested = False
        self._reported: dict[str, Any] = {}
        self._expired_checked_at = float("-inf")

    # --- the standby generator --------------------------------------------------

    async def _next_family(self) -> ModelFamily:
        """The family of the next queued job, else the default: the standby is started for it."""
        for job_id in (await self.store.queued_ids())[:1]:
            job = await self.store.get(job_id)
            if job is not None:
                family = (job.params or {}).get("family", "ltx2")
                if family in self.settings.enabled_families():
                    return family  # type: ignore[no-any-return]
        return self.settings.generation.family

    async def prepare_standby(self, family: ModelFamily | None = None) -> None:
        """Start the next job's generator now, in its family's interpreter, so its imports are done.

        Best effort: when it cannot start, the next job starts its own generator (and reports why).
        """
        if not self.standby_enabled:
            return
        try:
            await self._prepare_standby(family)
        except Exception:
            log.exception("the standby generator could not be started; the next job starts its own")

    async def _prepare_standby(self, family: ModelFamily | None) -> None:
        family = family or await self._next_family()
        if self._standby is not None and self._standby.returncode is None:
            if self._standby_family == family:
                return
            await self.close()  # waiting in the other family's interpreter
        self.settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._standby = await asyncio.create_subprocess_exec(
            self.settings.interpreter(family), "-m", "generator", "--standby", family,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=child_env(self.settings), cwd=str(self.settings.jobs_dir), start_new_session=True,
        )
        self._standby_family = family
        # Recorded so a start after a kill -9 of this process can end it, should it outlive us.
        await self.store.record_standby(self.me, ProcessId.of(self._standby.pid))

    async def _start_generator(self, spec: JobSpec, spec_path: Path, folder: Path) -> asyncio.subprocess.Process:
        """The job's generator: the standby, handed the spec, or a fresh process.

        Either way its stdin is a pipe this process holds open until the generator ends: when this
        process dies, the pipe's end of input tells the generator to end (generator/lifeline.py).
        """
        standby, self._standby = self._standby, None
        if standby is not None and standby.returncode is None and self._standby_family != spec.family:
            kill_group(standby.pid)
            await standby.wait()
        elif standby is not None and standby.returncode is None and standby.stdin is not None:
            try:
                standby.stdin.write(f"{spec_path}\n".encode())
                await standby.stdin.drain()
                await self.store.forget_standby(self.me)
                return standby
            except (BrokenPipeError, ConnectionResetError):
                log.warning("the standby generator had exited; starting a fresh one")
        interpreter = self.settings.interpreter(spec.family)
        try:
            return await asyncio.create_subprocess_exec(
                interpreter, "-m", "generator", str(spec_path),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=child_env(self.settings), cwd=str(folder), start_new_session=True,
            )
        except OSError as exc:
            log.error("cannot start the %s generator's interpreter %s: %s", spec.family, interpreter, exc)
            raise GeneratorStartError(spec.family) from exc

    async def close(self) -> None:
        if self.registered:
            with contextlib.suppress(Exception):
                await self.heartbeat(WorkerState.STOPPED)
        standby, self._standby = self._standby, None
        if standby is not None and standby.returncode is None:
            kill_group(standby.pid)
            await standby.wait()
            await self.store.forget_standby(self.me)

    def ring(self) -> None:
        self.store.doorbell.ring()

    async def _notify(self, job: Job, event: Any) -> None:
        for listener in self.listeners:
            try:
                await listener(job, event)
            except Exception:
                log.exception("a progress listener failed for job %s", job.id)

    # --- start-up ---------------------------------------------------------------

    async def recover(self) -> None:
        """Before the first job: end what a dead supervisor left behind, keep its finished clips, requeue the rest.

        Only jobs whose supervising process is gone are touched: a job that a live bot (or another
        ``ltxbot animate``) is running is left to it.
        """
        for standby in await self.store.take_orphaned_standbys():
            if is_our_generator(standby.pid, standby.start_ticks):
                log.warning("stopping standby generator pid %s left by a previous run", standby.pid)
                kill_group(standby.pid)
                await _wait_gone(standby.pid, standby.start_ticks)
        for job in await self.store.running():
            if not is_orphaned(job, self.me, one_host=self.store.one_host):
                log.info("job %s is running under another live process; left to it", job.id)
                continue
            if job.generator_pid and is_our_generator(job.generator_pid, job.generator_start_ticks):
                log.warning("stopping generator pid %s left by a previous run (job %s)", job.generator_pid, job.id)
                kill_group(job.generator_pid)
                await _wait_gone(job.generator_pid, job.generator_start_ticks)
            clip = job_dir(self.settings, job.id) / CLIP_NAME
            if clip.is_file():
                # Rendered, but the bot died before recording it: deliver it, never render again.
                await self.store.finish(
                    job.id, job.attempts, output_path=str(clip), output_bytes=clip.stat().st_size,
                    phases=job.phases or [], draft_kept_until=self._kept_until(),
                )
        await self.store.recover_orphans(self.settings.generator.max_attempts, self.me)
        self._recovered = True

    # --- the loop ---------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """``run_forever`` as the bot's worker task, watched: should it ever end but by cancellation, that is logged."""
        task = asyncio.create_task(self.run_forever(recover=not self._recovered), name="ltxbot-worker")
        task.add_done_callback(_report_worker_end)
        return task

    async def register(self) -> None:
        """Tell the database this worker exists: what GPU it has and which families it renders."""
        gpu = self.settings.worker.gpu
        await self.store.register_worker(WorkerInfo(
            id=self.claiming.id, name=worker_name(self.settings), host=host_name(), pid=self.me.pid, gpu=gpu,
            gpu_name=await gpu_name(gpu), vram_budget_gib=self.claiming.vram_budget_gib,
            families=list(self.claiming.families), libraries=_bot_side_libraries(),
        ))
        self.registered = True

    async def heartbeat(self, state: WorkerState, job_id: int | None = None, *, rendered: int = 0) -> None:
        """The worker row's heartbeat; picks up an admin's drain request."""
        if not self.registered:
            return
        reported, self._reported = self._reported, {}
        drain = await self.store.worker_heartbeat(self.claiming.id, state, job_id, rendered=rendered, **reported)
        if drain and not self.drain_requested:
            log.info("worker %s: drain requested; it takes no new jobs", worker_name(self.settings))
        self.drain_requested = self.drain_requested or drain

    async def take_back_expired(self, *, force: bool = False) -> None:
        """Requeue jobs whose worker stopped renewing its lease (at most every half lease)."""
        loop = asyncio.get_running_loop()
        if not force and loop.time() - self._expired_checked_at < self.settings.worker.lease_seconds / 2:
            return
        self._expired_checked_at = loop.time()
        for job in await self.store.recover_expired(self.settings.generator.max_attempts):
            log.warning("job %s: its worker stopped renewing its lease; it goes back to the queue", job.id)

    async def refuse_unservable(self) -> None:
        """Fail queued jobs that no live worker can render, instead of leaving them queued for ever."""
        now = datetime.now(UTC)
        grace = timedelta(seconds=self.settings.worker.unserved_grace_seconds)
        waiting = await self.store.queued_since(now - grace)
        if not waiting:
            return
        served = await self.store.capabilities(live_after(self.settings, now))
        for family in self.claiming.families:  # this worker, registered or not
            add_capability(served, family, self.claiming.vram_budget_gib)
        for job in waiting:
            message = unservable_reason(job, served)
            if message is None:
                continue
            refused = await self.store.refuse_queued(job.id, message)
            if refused is not None:
                log.warning("job %s: no worker can render it; it failed (%s)", job.id, message)
                await self._notify(refused, Ending(EndCode.INVALID, message))

    async def run_forever(self, *, recover: bool = True) -> None:
        """Run jobs until cancelled or drained. An unexpected error is logged with an id and the loop goes on
        after a pause (doubling while errors repeat): a bot that takes jobs must never stop running them."""
        self._recovered = self._recovered or not recover
        delay = RETRY_DELAY_SECONDS
        standby_ready = False
        while True:
            try:
                if not self.registered:
                    await self.register()
                if not self._recovered:
                    await self.recover()
                await self.heartbeat(WorkerState.IDLE)
                if self.drain_requested:
                    await self.heartbeat(WorkerState.STOPPED)
                    log.info("worker %s drained: it takes no more jobs", worker_name(self.settings))
                    return
                if not standby_ready:
                    await self.prepare_standby()
                    standby_ready = True
                await self.take_back_expired()
                if await self.store.is_paused():
                    await self._wait_doorbell(5.0)
                    continue
                job = await self.step()
                delay = RETRY_DELAY_SECONDS
                if job is None:
                    await self._wait_doorbell(min(5.0, self.heartbeat_seconds))
            except Exception:
                error_id = new_error_id()
                log.exception("the worker loop failed (error %s); it carries on in %.0f s", error_id, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_SECONDS)
                # No attempt runs now: a job this process claimed but could not settle goes back to the queue.
                self._recovered = False

    async def _wait_doorbell(self, timeout: float) -> None:
        # A ring only hints that a job was queued; the poll after ``timeout`` finds it regardless.
        await self.store.doorbell.wait(timeout)

    async def step(self, only_job: int | None = None) -> Job | None:
        """Claim one queued job and run it to the end of this attempt; None when nothing was queued.

        The first step recovers what a dead supervisor left (every worker that starts does, the
        local CLI's included). Any error while the attempt runs ends that attempt through the
        store (logged with an error id) instead of escaping: the job is never left ``running``.
        """
        if not self._recovered:
            await self.recover()
        await self.refuse_unservable()
        # `ltxbot animate` names its job and renders it paused or not; the queue's claims stop while paused.
        job = await self.store.claim_next(only_id=only_job, supervisor=self.me, worker=self.claiming,
                                          unless_paused=only_job is None)
        if job is None:
            return None
        await self.heartbeat(WorkerState.RENDERING, job.id)
        try:
            ending = await self._attempt(job)
        except asyncio.CancelledError:
            # The bot is stopping and _attempt has ended the generator's group. The job goes back
            # to the queue now; a clip already written stays for recover() to deliver on the next start.
            if not (job_dir(self.settings, job.id) / CLIP_NAME).is_file():
                await asyncio.shield(self.store.release(job.id, job.attempts))
            raise
        except Exception:
            error_id = new_error_id()
            log.exception("job %s: the worker failed while running it (error %s)", job.id, error_id)
            ending = Ending(EndCode.CRASHED, f"Something went wrong in the bot while rendering this clip "
                                             f"(error {error_id}; the owner can look it up in the bot's log).")
        await asyncio.shield(self._record(job, ending))
        await self.heartbeat(WorkerState.IDLE, rendered=int(ending.code == EndCode.OK))
        await self.prepare_standby()
        final = await self.store.get(job.id)
        if final is not None:
            await self._notify(final, ending)
        return final

    def _kept_until(self) -> datetime:
        """Until when a draft finished now stays finalizable (the store ignores it for other jobs)."""
        return datetime.now(UTC) + timedelta(hours=self.settings.generation.draft_keep_hours)

    async def _record(self, job: Job, ending: Ending) -> None:
        attempts = self.settings.generator.max_attempts
        if ending.code == EndCode.OK and ending.done is not None:
            # Stored before the job reads as done, so a front end on another host finds it.
            await self.files.publish_clip(job.id, ending.done.output_path)
            if job.draft == DraftStep.DRAFT:
                await self.files.publish_draft(job.id, draft_state_path(self.settings, job.id))
            await self.store.finish(
                job.id, job.attempts, output_path=str(ending.done.output_path), output_bytes=ending.done.bytes,
                phases=[p.model_dump(mode="json", exclude={"event"}) for p in ending.done.phases],
                draft_kept_until=self._kept_until(),
            )
        elif ending.code == EndCode.CANCELLED:
            await self.store.mark_cancelled(job.id, job.attempts)
        else:
            await self.store.fail(
                job.id, job.attempts, code=ending.code, message=ending.message,
                retry=ending.code not in NOT_RETRIED, max_attempts=attempts,
            )

    async def _attempt(self, job: Job) -> Ending:
        folder = job_dir(self.settings, job.id)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            image = await self.files.input_for(job)
            for field in UPLOAD_FIELDS:
                name = (job.params or {}).get(field)
                if isinstance(name, str):
                    await self.files.ensure_upload(name)
            if job.draft == DraftStep.FINALIZE and job.draft_of is not None:
                await self.files.draft_here(job.draft_of, draft_state_path(self.settings, job.draft_of))
            spec = build_spec(self.settings, job, image, preview_dir=self.preview_dir)
        except MissingFileError as exc:
            return Ending(EndCode.INVALID, str(exc))
        except ValidationError as exc:
            return Ending(EndCode.INVALID, f"{INVALID_PREFIX} {describe_validation_error(exc)}")
        except ValueError as exc:
            return Ending(EndCode.INVALID, f"{INVALID_PREFIX} {exc}.")
        spec_path = folder / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
        spec.output_path.unlink(missing_ok=True)
        log_file = BoundedLog(folder / "generator.log", self.settings.generator.log_max_bytes)
        try:
            log_file.write(f"=== job {job.id} attempt {job.attempts} ===\n")
            proc = await self._start_generator(spec, spec_path, folder)
        except GeneratorStartError:
            log_file.close()
            name = FAMILY_NAMES[spec.family]
            return Ending(EndCode.MODEL_MISSING, f"The bot could not start its {name} generator; "
                                                 "the owner needs to check its Python path in the config.")
        except BaseException:
            log_file.close()
            raise
        self.current = (job.id, proc)
        state: dict[str, Any] = {"done": None, "error": None, "phases": []}
        readers = [
            asyncio.create_task(self._read_events(job, proc, state)),
            asyncio.create_task(self._read_stderr(proc, log_file)),
        ]
        reason = None
        try:
            await self.store.record_process(job.id, job.attempts, proc.pid, process_start_ticks(proc.pid))
            reason = await self._supervise(job, proc, timeout_for(self.settings, spec.request))
        finally:
            if proc.returncode is None:
                await self._terminate(proc)
            kill_group(proc.pid)  # grandchildren, if any
            if proc.stdin is not None:
                proc.stdin.close()
            await asyncio.gather(*readers, return_exceptions=True)
            tail = log_file.close()
            self.current = None
        return self._ending(spec, proc.returncode, reason, state, tail)
    async def _supervise(self, job: Job, proc: asyncio.subprocess.Process, timeout: float) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        renewed_at = loop.time()
        waiter = asyncio.ensure_future(proc.wait())
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=min(1.0, max(0.0, deadline - loop.time())))
                if done:
                    return None
                if await self.store.cancel_requested(job.id):
                    await self._terminate(proc)
                    return "cancelled"
                if loop.time() >= deadline:
                    await self._terminate(proc)
                    return "timeout"
                if loop.time() - renewed_at >= self.heartbeat_seconds:
                    renewed_at = loop.time()
                    if not await self._renew(job):
                        await self._terminate(proc)
                        return "lost"
        finally:
            if not waiter.done():
                waiter.cancel()

    async def _renew(self, job: Job) -> bool:
        """Renew the attempt's lease and the worker's heartbeat; False once the job was given to another worker.

        A database hiccup is not a lost lease: the render goes on, and should the lease run out
        meanwhile, the attempt's writes are fenced like any lost worker's.
        """
        try:
            held = await self.store.renew_lease(job.id, job.attempts, self.claiming.id,
                                                self.settings.worker.lease_seconds)
            await self.heartbeat(WorkerState.RENDERING, job.id)
        except Exception:
            log.warning("job %s: the lease could not be renewed this time", job.id, exc_info=True)
            return True
        if not held:
            log.warning("job %s: its lease was taken back (this worker was cut off too long); stopping it", job.id)
        return held

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the group, SIGKILL after the grace period."""
        kill_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.settings.generator.kill_grace_seconds)
        except TimeoutError:
            kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _read_events(self, job: Job, proc: asyncio.subprocess.Process, state: dict[str, Any]) -> None:
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        async for raw in proc.stdout:
            try:
                event = parse_event(raw)
            except ValidationError:
                log.warning("job %s: unparseable generator output ignored", job.id)
                continue
            if isinstance(event, ProgressEvent):
                now = loop.time()
                if event.step in (0, event.total) or now - self._progress_saved_at > 1.0:
                    self._progress_saved_at = now
                    await self.store.update_progress(job.id, job.attempts, event.model_dump(exclude={"event"}))
            elif isinstance(event, PhaseEvent):
                state["phases"].append(event.model_dump(mode="json", exclude={"event"}))
                await self.store.record_phases(job.id, job.attempts, state["phases"])
            elif isinstance(event, DoneEvent):
                state["done"] = event
            elif isinstance(event, ErrorEvent):
                state["error"] = event
            elif isinstance(event, StartedEvent):
                self._reported = {"gpu_name": event.device_name, "libraries": event.libraries}
            await self._notify(job, event)

    @staticmethod
    async def _read_stderr(proc: asyncio.subprocess.Process, log_file: BoundedLog) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            log_file.write(raw.decode("utf-8", errors="replace"))

    @staticmethod
    def _ending(
        spec: JobSpec, returncode: int | None, reason: str | None, state: dict[str, Any], tail: list[str]
    ) -> Ending:
        if reason == "cancelled":
            spec.output_path.unlink(missing_ok=True)
            return Ending(EndCode.CANCELLED, "Cancelled.")
        if reason == "timeout":
            return Ending(EndCode.TIMEOUT, "The render took longer than the time limit and was stopped.")
        if reason == "lost":  # another worker has the job now; the store fences this ending
            return Ending(EndCode.INTERRUPTED, "This worker lost its claim on the clip.")
        done: DoneEvent | None = state["done"]
        error: ErrorEvent | None = state["error"]
        if returncode == 0 and done is not None and spec.output_path.is_file():
            return Ending(EndCode.OK, "Done.", done)
        if error is not None:
            # The generator words its known failures for the user; anything else is ours to say.
            if error.code in GENERATOR_ERRORS:
                return Ending(GENERATOR_ERRORS[error.code], error.message)
            return Ending(EndCode.CRASHED, "The generator stopped with an error.")
        how = f"was killed by signal {-returncode}" if returncode is not None and returncode < 0 else (
            f"exited with status {returncode}")
        log.warning("generator %s without finishing; last log lines:\n%s", how, "".join(tail[-5:]))
        return Ending(EndCode.CRASHED, f"The generator {how} before finishing.")


def _report_worker_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is None:
        return  # drained on an admin's request
    log.critical("the worker task ended (error %s): no job runs until the bot is restarted",
                 new_error_id(), exc_info=error)

"""The worker: one job at a time, each in a fresh ``python -m generator`` process group.

The database is the queue and an asyncio.Event is the doorbell. A hang, a crash,
an out-of-memory error, a cancel or a restart of the bot never loses a job, never
runs one twice at once, and never leaves a generator holding GPU memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from generator.protocol import (
    FAMILY_NAMES,
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    JobSpec,
    LtxvModelFiles,
    ModelFamily,
    ModelFiles,
    PhaseEvent,
    ProgressEvent,
    Tiling,
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
    "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LTXBOT_FAULT", "LTXBOT_FAULT_ONCE",
)
CLIP_NAME = "clip.mp4"
OOM_HINT = "The GPU ran out of memory for this clip. Try fewer frames or a smaller size."
NOT_RETRIED = {"oom", "invalid", "model_missing", "too_large"}


@dataclass(frozen=True)
class Ending:
    """How one attempt ended, as the store and the user should hear it."""

    code: str  # "ok", "oom", "timeout", "cancelled", "crashed", "invalid", "model_missing", "too_large"
    message: str
    done: DoneEvent | None = None


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


def build_spec(settings: Settings, job: Job) -> JobSpec:
    uploads = settings.uploads_dir.resolve()
    image = Path(job.input_path).resolve()
    if not image.is_relative_to(uploads):
        raise ValueError("the job's image is outside the uploads folder")
    t = settings.vae_tiling
    request = GenerationRequest.model_validate(job.params)
    if request.family not in settings.enabled_families():
        raise ValueError(f"the {FAMILY_NAMES[request.family]} model family is not enabled on this bot")
    ltxv = settings.ltxv
    return JobSpec(
        request=request,
        image_path=image,
        output_path=job_dir(settings, job.id) / CLIP_NAME,
        models=ModelFiles(**_absolute(settings.models.model_dump())),
        ltxv_models=LtxvModelFiles(**_absolute(ltxv.model_dump(include=set(LtxvModelFiles.model_fields)))),
        tiling=Tiling(
            spatial_px=t.spatial_px, spatial_overlap_px=t.spatial_overlap_px,
            temporal_frames=t.temporal_frames, temporal_overlap_frames=t.temporal_overlap_frames,
        ),
        fp8_cast=settings.generator.fp8_cast,
        guidance_batch=settings.generator.guidance_batch,
        device=settings.generator.device,
        crf=settings.generation.crf,
        max_bytes=job.max_bytes,
    )


def child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOWLIST}
    if settings.generator.expandable_segments and "PYTORCH_CUDA_ALLOC_CONF" not in env:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env["PYTHONUNBUFFERED"] = "1"
    # Model files are local paths; nothing in a render may reach the network.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: tells a process from a later one that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_our_generator(pid: int, start_ticks: int | None) -> bool:
    if start_ticks is None or process_start_ticks(pid) != start_ticks:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"generator" in cmdline


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_gone(pid: int, start_ticks: int | None, seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while process_start_ticks(pid) == start_ticks and loop.time() < deadline:
        await asyncio.sleep(0.05)


class BoundedLog:
    """The generator's stderr, kept to ``limit`` bytes: the head, then the tail."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.written = 0
        self.dropped = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.handle = path.open("a", encoding="utf-8", errors="replace")

    def write(self, line: str) -> None:
        if self.written + len(line) <= self.limit // 2:
            self.handle.write(line)
            self.written += len(line)
        else:
            if len(self.tail) == self.tail.maxlen:
                self.dropped += 1
            self.tail.append(line)

    def close(self) -> list[str]:
        tail = list(self.tail)
        if tail:
            if self.dropped:
                self.handle.write(f"... {self.dropped} lines dropped ...\n")
            budget = self.limit // 2
            kept = []
            for line in reversed(tail):
                budget -= len(line)
                if budget < 0:
                    break
                kept.append(line)
            self.handle.writelines(reversed(kept))
        self.handle.close()
        return tail[-20:]


class Worker:
    def __init__(self, settings: Settings, store: JobStore, *, standby: bool = False) -> None:
        """``standby``: keep the next generator process started and imported, waiting for its job.

        It cuts the per-job start from about 13 s to well under one; it holds no GPU memory
        while it waits (CUDA starts only with the job) and still runs exactly one job.
        """
        self.settings = settings
        self.store = store
        self.doorbell = asyncio.Event()
        self.listeners: list[Listener] = []
        self.current: tuple[int, asyncio.subprocess.Process] | None = None
        self._progress_saved_at = 0.0
        self.standby_enabled = standby
        self._standby: asyncio.subprocess.Process | None = None
        self._standby_family: ModelFamily | None = None

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
        """Start the next job's generator now, in its family's interpreter, so its imports are done."""
        if not self.standby_enabled:
            return
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

    async def _start_generator(self, spec: JobSpec, spec_path: Path, folder: Path) -> asyncio.subprocess.Process:
        standby, self._standby = self._standby, None
        if standby is not None and standby.returncode is None and self._standby_family != spec.family:
            kill_group(standby.pid)
            await standby.wait()
        elif standby is not None and standby.returncode is None and standby.stdin is not None:
            try:
                standby.stdin.write(f"{spec_path}\n".encode())
                await standby.stdin.drain()
                standby.stdin.close()
                return standby
            except (BrokenPipeError, ConnectionResetError):
                log.warning("the standby generator had exited; starting a fresh one")
        return await asyncio.create_subprocess_exec(
            self.settings.interpreter(spec.family), "-m", "generator", str(spec_path),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=child_env(self.settings), cwd=str(folder), start_new_session=True,
        )

    async def close(self) -> None:
        standby, self._standby = self._standby, None
        if standby is not None and standby.returncode is None:
            kill_group(standby.pid)
            await standby.wait()

    def ring(self) -> None:
        self.doorbell.set()

    async def _notify(self, job: Job, event: Any) -> None:
        for listener in self.listeners:
            try:
                await listener(job, event)
            except Exception:
                log.exception("a progress listener failed for job %s", job.id)

    # --- start-up ---------------------------------------------------------------

    async def recover(self) -> None:
        """Before the first job: end generators left by a previous bot, keep finished clips, requeue the rest."""
        for job in await self.store.running():
            if job.generator_pid and _is_our_generator(job.generator_pid, job.generator_start_ticks):
                log.warning("stopping generator pid %s left by a previous run (job %s)", job.generator_pid, job.id)
                kill_group(job.generator_pid)
                await _wait_gone(job.generator_pid, job.generator_start_ticks)
            clip = job_dir(self.settings, job.id) / CLIP_NAME
            if clip.is_file():
                # Rendered, but the bot died before recording it: deliver it, never render again.
                await self.store.finish(
                    job.id, job.attempts, output_path=str(clip), output_bytes=clip.stat().st_size,
                    phases=job.phases or [],
                )
        await self.store.recover_orphans(self.settings.generator.max_attempts)

    # --- the loop ---------------------------------------------------------------

    async def run_forever(self, *, recover: bool = True) -> None:
        if recover:
            await self.recover()
        await self.prepare_standby()
        while True:
            if await self.store.is_paused():
                await self._wait_doorbell(5.0)
                continue
            job = await self.step()
            if job is None:
                await self._wait_doorbell(5.0)

    async def _wait_doorbell(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.doorbell.wait(), timeout)
        self.doorbell.clear()

    async def step(self, only_job: int | None = None) -> Job | None:
        """Claim one queued job and run it to the end of this attempt; None when nothing was queued."""
        job = await self.store.claim_next(only_id=only_job)
        if job is None:
            return None
        try:
            ending = await self._attempt(job)
        except asyncio.CancelledError:
            # The bot is stopping and _attempt has ended the generator's group. The job goes back
            # to the queue now; a clip already written stays for recover() to deliver on the next start.
            if not (job_dir(self.settings, job.id) / CLIP_NAME).is_file():
                await asyncio.shield(self.store.release(job.id, job.attempts))
            raise
        await asyncio.shield(self._record(job, ending))
        await self.prepare_standby()
        final = await self.store.get(job.id)
        if final is not None:
            await self._notify(final, ending)
        return final

    async def _record(self, job: Job, ending: Ending) -> None:
        attempts = self.settings.generator.max_attempts
        if ending.code == "ok" and ending.done is not None:
            await self.store.finish(
                job.id, job.attempts, output_path=str(ending.done.output_path), output_bytes=ending.done.bytes,
                phases=[p.model_dump(mode="json", exclude={"event"}) for p in ending.done.phases],
            )
        elif ending.code == "cancelled":
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
            spec = build_spec(self.settings, job)
        except (ValidationError, ValueError) as exc:
            return Ending("invalid", f"This job's settings are not valid any more: {exc}")
        spec_path = folder / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2), encoding="utf-8")
        spec.output_path.unlink(missing_ok=True)
        log_file = BoundedLog(folder / "generator.log", self.settings.generator.log_max_bytes)
        log_file.write(f"=== job {job.id} attempt {job.attempts} ===\n")
        proc = await self._start_generator(spec, spec_path, folder)
        self.current = (job.id, proc)
        await self.store.record_process(job.id, job.attempts, proc.pid, process_start_ticks(proc.pid))
        state: dict[str, Any] = {"done": None, "error": None, "phases": []}
        readers = [
            asyncio.create_task(self._read_events(job, proc, state)),
            asyncio.create_task(self._read_stderr(proc, log_file)),
        ]
        reason = None
        try:
            reason = await self._supervise(job, proc, timeout_for(self.settings, spec.request))
        finally:
            if proc.returncode is None:
                await self._terminate(proc)
            kill_group(proc.pid)  # grandchildren, if any
            await asyncio.gather(*readers, return_exceptions=True)
            tail = log_file.close()
            self.current = None
        return self._ending(spec, proc.returncode, reason, state, tail)

    async def _supervise(self, job: Job, proc: asyncio.subprocess.Process, timeout: float) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
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
        finally:
            if not waiter.done():
                waiter.cancel()

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
            return Ending("cancelled", "Cancelled.")
        if reason == "timeout":
            return Ending("timeout", "The render took longer than the time limit and was stopped.")
        done: DoneEvent | None = state["done"]
        error: ErrorEvent | None = state["error"]
        if returncode == 0 and done is not None and spec.output_path.is_file():
            return Ending("ok", "Done.", done)
        if error is not None:
            mapping = {"oom": ("oom", OOM_HINT), "invalid_spec": ("invalid", error.message),
                       "model_missing": ("model_missing", error.message), "too_large": ("too_large", error.message)}
            code, message = mapping.get(error.code, ("crashed", "The generator stopped with an error."))
            return Ending(code, message)
        how = f"was killed by signal {-returncode}" if returncode is not None and returncode < 0 else (
            f"exited with status {returncode}")
        log.warning("generator %s without finishing; last log lines:\n%s", how, "".join(tail[-5:]))
        return Ending("crashed", f"The generator {how} before finishing.")

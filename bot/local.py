"""``ltxbot animate``: one clip from a local file, through the same intake, store, worker and generator."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bot.db.models import DraftStep, JobStatus
from bot.db.store import CancelOutcome, NewJob
from bot.drafts import NOT_DRAFTABLE, draftable
from bot.intake import IntakeError
from bot.intake.audio import AudioLimits, NormalisedAudio, normalise_audio
from bot.intake.image import DecodeLimits, NormalisedImage, TargetSize, normalise_image, read_local_image
from bot.intake.request import RequestOptions, SizedRequest, fixed_size, least_vram, with_audio_track, with_end_image
from bot.terminal import StageProgress, make_console, phase_table, weights_table
from bot.worker import Worker, draft_state_path, live_after
from generator.protocol import FAMILY_NAMES

if TYPE_CHECKING:
    from pathlib import Path

    from bot.config import Settings
    from bot.db.models import Job
    from bot.db.store import JobStore

LOCAL_USER = "local"
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by SIGINT


async def animate(settings: Settings, store: JobStore, args: argparse.Namespace) -> int:
    limits = settings.limits
    try:
        track = lipsync_track(settings, args) if args.audio is not None else None
    except IntakeError as exc:
        print(f"Cannot animate that: {exc.message} ({exc.code})", file=sys.stderr)
        return 2
    lipsync = {} if track is None else {
        "frames": track.frames, "pipeline": args.pipeline or "two_stage", "audio": not args.no_audio,
        "family": args.model or "ltx2"}
    sized = SizedRequest(
        settings, **({
            "prompt": args.prompt, "width": args.width, "height": args.height, "frames": args.frames,
            "seconds": args.seconds, "seed": args.seed, "pipeline": args.pipeline,
            "audio": False if args.no_audio else None, "family": args.model, "loop": args.loop or None,
            "lora": args.lora, "lora_strength": args.lora_strength,
        } | lipsync),
    )

    def fit(path: Path, target: TargetSize) -> NormalisedImage:
        data = read_local_image(path, limits.max_upload_bytes)
        return normalise_image(data, target, settings.uploads_dir, max_pixels=limits.max_image_pixels,
                               min_side=limits.min_image_side, limits=DecodeLimits.of(limits))

    try:
        RequestOptions(loop=args.loop).check_end_image(args.end_image is not None)
        image = fit(args.image, sized)
        request = sized.request
        assert request is not None
        if args.end_image is not None:
            request = with_end_image(request, fit(args.end_image, fixed_size(request)).path.name)
        if track is not None:
            request = with_audio_track(request, track.path.name)
    except IntakeError as exc:
        print(f"Cannot animate that: {exc.message} ({exc.code})", file=sys.stderr)
        return 2
    if args.draft and not draftable(request):
        print(f"Cannot animate that: {NOT_DRAFTABLE}", file=sys.stderr)
        return 2
    worker = Worker(settings, store, preview_dir=args.preview_dir)
    await worker.files.publish_input(image.path, image.sha256)
    await worker.files.publish_request_uploads(request)
    job = await store.create(
        NewJob(
            user_id=LOCAL_USER, prompt=request.prompt, negative_prompt=request.negative_prompt,
            params=request.model_dump(mode="json"), input_path=str(image.path), input_sha256=image.sha256,
            predicted_peak_gib=least_vram(settings, request), draft=DraftStep.DRAFT if args.draft else None,
        )
    )
    kind = "a draft of " if args.draft else ""
    print(f"Job {job.id}: {kind}{FAMILY_NAMES[request.family]} {request.pipeline}, "
          f"{request.width}x{request.height}, {request.frames} frames, "
          f"seed {request.seed}", file=sys.stderr)
    if args.no_worker:
        try:
            if not await store.capabilities(live_after(settings, datetime.now(UTC))):
                print("No worker is running: the clip waits in the queue until one starts (`ltxbot worker`).",
                      file=sys.stderr)
            code = await _render(worker, store, job, out=args.out, here=False)
        except asyncio.CancelledError:
            # asyncio.run cancels this task on Ctrl-C. Left queued, the job would be rendered later for nobody.
            return await _cancel_interrupted(store, job)
    else:
        code = await _render(worker, store, job, out=args.out)
    if code == 0 and args.draft:
        print(f"Draft done: `ltxbot finalize {job.id}` renders the full clip from it.", file=sys.stderr)
    return code


async def _cancel_interrupted(store: JobStore, job: Job) -> int:
    """Ctrl-C while other workers have the job: cancel it as /cancel does, say so in one line, exit 130."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()  # the interrupt is handled here; the cancel's own database writes must still run
    outcome = await store.cancel(job.id, None)
    if outcome == CancelOutcome.CANCELLED:
        print(f"Job {job.id} cancelled before it started.", file=sys.stderr)
    elif outcome == CancelOutcome.STOPPING:
        print(f"Job {job.id} cancelled: its worker stops the render.", file=sys.stderr)
    else:
        print(f"Job {job.id} had already ended; nothing to cancel.", file=sys.stderr)
    return EXIT_INTERRUPTED


async def finalize(settings: Settings, store: JobStore, args: argparse.Namespace) -> int:
    """``ltxbot finalize JOB``: the full clip of a draft, from its kept latents."""
    draft = await store.get(args.job_id)
    if draft is None or draft.draft != DraftStep.DRAFT or draft.status != JobStatus.SUCCEEDED:
        print(f"Job {args.job_id} is not a finished draft.", file=sys.stderr)
        return 2
    files = Worker(settings, store).files
    if draft.draft_kept_until is None or not await files.has_draft(draft.id, draft_state_path(settings, draft.id)):
        print(f"The draft of job {draft.id} was deleted (drafts are kept for "
              f"{settings.generation.draft_keep_hours:g} hours); render it again.", file=sys.stderr)
        return 2
    job = await store.create(
        NewJob(
            user_id=draft.user_id, prompt=draft.prompt, negative_prompt=draft.negative_prompt, params=draft.params,
            input_path=draft.input_path, input_sha256=draft.input_sha256, draft=DraftStep.FINALIZE,
            draft_of=draft.id, predicted_peak_gib=draft.predicted_peak_gib,
        )
    )
    print(f"Job {job.id}: the full clip of draft {draft.id}", file=sys.stderr)
    return await _render(Worker(settings, store), store, job, out=args.out)


async def _render(worker: Worker, store: JobStore, job: Job, *, out: Path | None, here: bool = True) -> int:
    """Run one job here (or, not ``here``, wait while other workers run it) to its end, showing its
    progress; print the clip's path."""
    # stderr: stdout carries only the clip's path, for scripts.
    console = make_console(stderr=True)
    final = job
    with StageProgress(console) as progress:
        worker.listeners.append(progress)
        while True:
            ran = await worker.step(only_job=job.id) if here else None
            final = ran or await store.get(job.id) or job
            if final.status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}:
                break
            if ran is None:  # another worker (a running bot) has it; wait for it
                await asyncio.sleep(1.0)
    if final.phases:
        console.print(phase_table(final.phases))
        weights = weights_table(final.phases)
        if weights is not None:
            console.print(weights)
    if final.status != JobStatus.SUCCEEDED or final.output_path is None:
        print(f"Job {job.id} {final.status}: {final.error_message}", file=sys.stderr)
        return 1
    clip = await worker.files.clip_for(final)
    if clip is None:
        print(f"Job {job.id} finished, but its clip is not on this machine or in the database.", file=sys.stderr)
        return 1
    output = str(clip)
    if out is not None:
        shutil.copyfile(output, out)
        output = str(out)
    # The clip is on this host now, as a posted clip is in Discord: the copy kept for other hosts goes.
    await worker.files.forget_clip(final.id)
    print(output)
    return 0


# --- lipsync (docs/DESIGN.md, 'Lip-sync') ---
def lipsync_track(settings: Settings, args: argparse.Namespace) -> NormalisedAudio:
    """``--audio``: the track through the same intake as /lipsync's; its length sets the clip's."""
    for flag, given in (("--frames", args.frames), ("--seconds", args.seconds), ("--lora", args.lora),
                        ("--draft", args.draft)):
        if given:
            why = "the clip is as long as the track" if flag in ("--frames", "--seconds") else "not for lip-sync"
            raise IntakeError("invalid_request", f"{flag} does not go with --audio ({why}).")
    limits = settings.limits
    try:
        data = read_local_image(args.audio, limits.max_upload_bytes)
        return normalise_audio(data, settings.uploads_dir, max_seconds=limits.max_audio_seconds,
                               fps=settings.generation.fps, max_frames=limits.max_frames,
                               limits=AudioLimits.of(limits))
    except IntakeError as exc:
        raise IntakeError(exc.code, f"audio: {exc.message}") from None

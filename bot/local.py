"""``ltxbot animate``: one clip from a local file, through the same intake, store, worker and generator."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from typing import TYPE_CHECKING, Any

from bot.db.models import JobStatus
from bot.db.store import NewJob
from bot.intake import IntakeError
from bot.intake.image import normalise_image, read_local_image
from bot.intake.request import SizedRequest
from bot.worker import Worker
from generator.protocol import FAMILY_NAMES, PhaseEvent, ProgressEvent

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.db.models import Job
    from bot.db.store import JobStore

LOCAL_USER = "local"
BAR_WIDTH = 28


class ProgressBar:
    """One line on stderr per stage, redrawn in place."""

    def __init__(self) -> None:
        self.stage: str | None = None

    async def __call__(self, job: Job, event: Any) -> None:
        if isinstance(event, ProgressEvent):
            if self.stage is not None and event.stage != self.stage:
                sys.stderr.write("\n")
            self.stage = event.stage
            filled = BAR_WIDTH * event.step // max(event.total, 1)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            sys.stderr.write(f"\r  {event.stage:<18} [{bar}] {event.step}/{event.total}")
            sys.stderr.flush()
        elif isinstance(event, PhaseEvent) and event.name == "finalize":
            sys.stderr.write("\n")


def phase_table(phases: list[dict[str, Any]]) -> str:
    rows = [f"{'phase':<14} {'seconds':>8} {'peak GiB':>9} {'reserved':>9} {'RSS GiB':>8}"]
    for p in phases:
        alloc = p.get("peak_allocated_gib")
        reserved = p.get("peak_reserved_gib")
        rows.append(
            f"{p['name']:<14} {p['seconds']:>8.2f} "
            f"{'-' if alloc is None else f'{alloc:.2f}':>9} {'-' if reserved is None else f'{reserved:.2f}':>9} "
            f"{p['peak_rss_gib']:>8.2f}"
        )
    return "\n".join(rows)


async def animate(settings: Settings, store: JobStore, args: argparse.Namespace) -> int:
    limits = settings.limits
    sized = SizedRequest(
        settings, prompt=args.prompt, width=args.width, height=args.height, frames=args.frames,
        seconds=args.seconds, seed=args.seed, pipeline=args.pipeline, audio=False if args.no_audio else None,
        family=args.model,
    )
    try:
        data = read_local_image(args.image, limits.max_upload_bytes)
        image = normalise_image(
            data, sized, settings.uploads_dir, max_pixels=limits.max_image_pixels, min_side=limits.min_image_side
        )
    except IntakeError as exc:
        print(f"Cannot animate that: {exc.message} ({exc.code})", file=sys.stderr)
        return 2
    request = sized.request
    assert request is not None
    job = await store.create(
        NewJob(
            user_id=LOCAL_USER, prompt=request.prompt, negative_prompt=request.negative_prompt,
            params=request.model_dump(mode="json"), input_path=str(image.path), input_sha256=image.sha256,
        )
    )
    print(f"Job {job.id}: {FAMILY_NAMES[request.family]} {request.pipeline}, "
          f"{request.width}x{request.height}, {request.frames} frames, "
          f"seed {request.seed}", file=sys.stderr)
    worker = Worker(settings, store)
    worker.listeners.append(ProgressBar())
    final = job
    while True:
        ran = await worker.step(only_job=job.id)
        final = ran or await store.get(job.id) or job
        if final.status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}:
            break
        if ran is None:  # another worker (a running bot) has it; wait for it
            await asyncio.sleep(1.0)
    print(file=sys.stderr)
    if final.phases:
        print(phase_table(final.phases), file=sys.stderr)
    if final.status != JobStatus.SUCCEEDED or final.output_path is None:
        print(f"Job {job.id} {final.status}: {final.error_message}", file=sys.stderr)
        return 1
    output = final.output_path
    if args.out is not None:
        shutil.copyfile(output, args.out)
        output = str(args.out)
    print(output)
    return 0

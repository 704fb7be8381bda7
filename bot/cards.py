"""What users see: status cards, delivery captions, history lines. Pure functions of a job, easy to test."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import discord

from bot.db.models import DraftStep, EndCode, JobStatus, WorkerState
from generator.protocol import EXTEND_OVERLAP_FRAMES, FAMILY_NAMES

if TYPE_CHECKING:
    from bot.db.models import Job, WorkerRecord

COLOURS = {
    JobStatus.QUEUED: discord.Colour.blurple(),
    JobStatus.RUNNING: discord.Colour.gold(),
    JobStatus.SUCCEEDED: discord.Colour.green(),
    JobStatus.FAILED: discord.Colour.red(),
    JobStatus.CANCELLED: discord.Colour.light_grey(),
}
HINTS: dict[str, str] = {
    EndCode.OOM: "Try fewer frames (`seconds:`) or a smaller `size:`.",
    EndCode.TIMEOUT: "Try a shorter clip or a smaller size.",
    EndCode.TOO_LARGE: "Try a shorter clip or a smaller size.",
    EndCode.CRASHED: "It was tried several times; please try again later or tell the server admins.",
    EndCode.INTERRUPTED: "Please try again.",
    EndCode.MODEL_MISSING: "The bot's model files need attention; please tell the server admins.",
    EndCode.INVALID: "Please start a new /animate.",
}


def shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def timestamp(moment: datetime, style: str = "R") -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"<t:{int(moment.timestamp())}:{style}>"


@dataclass(frozen=True)
class QueueView:
    """Where a job stands: its position, and when it should be ready."""

    position: int | None
    length: int
    eta: datetime | None


def estimate_ready(
    position: int, durations: list[float], running_started: datetime | None, now: datetime | None = None
) -> datetime | None:
    """When the job at ``position`` (1 = next) should finish, from this GPU's own recent job times."""
    if not durations:
        return None
    now = now or datetime.now(UTC)
    typical = statistics.median(durations)
    remaining = 0.0
    if running_started is not None:
        started = running_started if running_started.tzinfo else running_started.replace(tzinfo=UTC)
        remaining = max(typical - (now - started).total_seconds(), typical * 0.1)
    return now + timedelta(seconds=remaining + typical * position)


def stage_text(progress: dict[str, Any] | None) -> str:
    if not progress:
        return "starting"
    stage, step, total = progress.get("stage", "working"), progress.get("step", 0), progress.get("total", 0)
    if stage == "done":
        return "done"
    if total and total > 1:
        return f"{stage} {step}/{total}"
    return str(stage)


def _family(params: dict[str, Any]) -> str:
    """Jobs from before the second family have none in their parameters: they are LTX-2."""
    return FAMILY_NAMES[params.get("family", "ltx2")]


def mode_text(params: dict[str, Any]) -> str | None:
    """How the clip ends, when the user chose it (jobs from before these options have neither key)."""
    if params.get("mode") == "retake":
        return f"retake of job {params.get('source_job')}, {params['retake_start']:g}–{params['retake_end']:g} s"
    if params.get("mode") == "lipsync":
        return "lip-sync"
    if params.get("mode") == "extend":
        return f"extends job {params.get('source_job')}"
    if params.get("loop"):
        return "loop"
    if params.get("end_image"):
        return "end image"
    return None


def _describe(job: Job) -> str:
    p = job.params
    frames = p["frames"]
    if p.get("source_frames"):  # an extension: the joined clip (docs/DESIGN.md, 'Extend')
        frames = p["source_frames"] + frames - EXTEND_OVERLAP_FRAMES
    seconds = frames / p["fps"]
    extras = [mode] if (mode := mode_text(p)) else []
    extras += [f"LoRA {lora['name']} {lora['strength']:g}" for lora in p.get("loras") or []]
    return (f"{_family(p)} · {p['width']}×{p['height']} · {seconds:.1f} s ({frames} frames) · seed {p['seed']}"
            + "".join(f" · {extra}" for extra in extras))


def status_embed(job: Job, queue: QueueView | None = None) -> discord.Embed:
    status = JobStatus(job.status)
    embed = discord.Embed(title=f"Job {job.id} · {_status_word(job)}", colour=COLOURS[status])
    embed.description = shorten(job.prompt, 300) or "(prompt removed)"
    embed.add_field(name="Clip", value=_describe(job), inline=False)
    if status == JobStatus.QUEUED and queue is not None and queue.position is not None:
        embed.add_field(name="Queue", value=f"{queue.position} of {queue.length}")
        ready = f"about {timestamp(queue.eta)}" if queue.eta else "after the first timed clip"
        embed.add_field(name="Ready", value=ready)
    elif status == JobStatus.RUNNING:
        embed.add_field(name="Stage", value=stage_text(job.progress))
        if job.cancel_requested:
            embed.add_field(name="Cancel", value="stopping…")
    elif status == JobStatus.SUCCEEDED:
        took = job.duration_seconds
        embed.add_field(name="Took", value=f"{took:.0f} s" if took is not None else "—")
        if job.posted_message_url:
            embed.add_field(name="Clip", value=f"[open]({job.posted_message_url})")
    elif status in (JobStatus.FAILED, JobStatus.CANCELLED):
        embed.add_field(name="Why", value=failure_text(job), inline=False)
    return embed


def _status_word(job: Job) -> str:
    if job.status == JobStatus.RUNNING:
        words: dict[str | None, str] = {DraftStep.DRAFT: "drafting", DraftStep.FINALIZE: "finalizing"}
        return words.get(job.draft, "rendering")
    if job.status == JobStatus.SUCCEEDED:
        return "draft done" if job.draft == DraftStep.DRAFT else "done"
    return str(job.status)


def failure_text(job: Job) -> str:
    message = job.error_message or "It did not finish."
    hint = HINTS.get(job.error_code or "")
    return f"{message} {hint}" if hint and hint not in message else message


def delivery_caption(job: Job) -> str:
    if job.draft == DraftStep.DRAFT:
        return (
            f"<@{job.user_id}> draft of **{shorten(job.prompt, 160)}** (half size, stage 1 only)\n"
            f"{_describe(job)} · job {job.id} · **Finalize** renders the full clip from it"
        )
    finalized = f" · finalized from job {job.draft_of}" if job.draft == DraftStep.FINALIZE else ""
    return (
        f"<@{job.user_id}> **{shorten(job.prompt, 180)}**\n"
        f"{_describe(job)} · job {job.id}{finalized}"
    )


def failure_notice(job: Job) -> str:
    return f"<@{job.user_id}> job {job.id} could not be made: {failure_text(job)}"


def history_line(job: Job) -> str:
    took = job.duration_seconds
    parts = [
        f"`{job.id}`",
        str(job.status),
        f"“{shorten(job.prompt, 40)}”",
        timestamp(job.created_at),
    ]
    mode = mode_text(job.params)
    if mode:
        parts.insert(3, mode)
    if took is not None:
        parts.append(f"{took:.0f} s")
    if job.posted_message_url and job.status == JobStatus.SUCCEEDED:
        parts.append(f"[clip]({job.posted_message_url})")
    return " · ".join(parts)


def details_embed(job: Job) -> discord.Embed:
    embed = status_embed(job)
    p = job.params
    embed.add_field(name="Model", value=f"{_family(p)} {p.get('pipeline')} · {p.get('steps') or 'default'} steps"
                    f" · audio {'on' if p.get('audio') else 'off'}")
    embed.add_field(name="Created", value=timestamp(job.created_at, "f"))
    if job.attempts > 1:
        embed.add_field(name="Attempts", value=str(job.attempts))
    if job.phases:
        rows = ["phase          sec   GPU GiB"]
        for phase in job.phases:
            peak = phase.get("peak_allocated_gib")
            rows.append(f"{phase['name']:<13}{phase['seconds']:>6.1f}  {'-' if peak is None else f'{peak:.2f}':>7}")
        embed.add_field(name="Phases", value="```\n" + "\n".join(rows) + "\n```", inline=False)
    return embed


# A worker that has not beaten for this long is shown as not answering (its lease runs out too).
WORKER_SILENT_AFTER = timedelta(minutes=3)


def worker_status(worker: WorkerRecord, now: datetime | None = None) -> str:
    """idle / rendering / draining / stopped, or 'not answering' when its heartbeat stopped."""
    now = now or datetime.now(UTC)
    beat = worker.heartbeat_at if worker.heartbeat_at.tzinfo else worker.heartbeat_at.replace(tzinfo=UTC)
    if worker.state != WorkerState.STOPPED and now - beat > WORKER_SILENT_AFTER:
        return "not answering"
    return str(worker.state)


def worker_line(worker: WorkerRecord, now: datetime | None = None) -> str:
    """One line of /admin workers: name, GPU, state, current job, clips, last heartbeat."""
    state = worker_status(worker, now)
    doing = f" job {worker.current_job_id}" if worker.current_job_id and state == "rendering" else ""
    gpu = worker.gpu_name or "no GPU reported"
    if worker.gpu is not None:
        gpu = f"GPU {worker.gpu}: {gpu}"
    families = "/".join(FAMILY_NAMES.get(f, f) for f in worker.families)
    return (f"**{worker.name}** · {gpu} · {families} · {state}{doing} · {worker.clips_rendered} clips · "
            f"heartbeat {timestamp(worker.heartbeat_at)}")

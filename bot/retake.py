"""Retake requests: a region of a delivered clip made again (docs/DESIGN.md, 'Retake').

What a Retake press may start, and the request it makes from the source job's own
parameters; the button, the form and the job service call these.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from bot.db.models import DraftStep, JobStatus
from generator.protocol import EXTEND_OVERLAP_FRAMES, FAMILY_NAMES, GenerationRequest

if TYPE_CHECKING:
    from bot.db.models import Job

# The source job's parameters a retake keeps: the clip's size, length, rate, sound and look.
KEPT_FROM_SOURCE = ("negative_prompt", "family", "width", "height", "frames", "fps", "steps", "audio",
                    "image_strength", "loras")
# Stands for the source clip's upload name while the request is checked, before the clip is copied.
PENDING_SOURCE = "0" * 64 + ".mp4"


def clip_frames(params: dict[str, Any]) -> int:
    """Frames of the clip a job made: an extension's ``frames`` is only its new segment."""
    if params.get("mode") == "extend" and params.get("source_frames"):
        return int(params["source_frames"]) + int(params["frames"]) - EXTEND_OVERLAP_FRAMES
    return int(params["frames"])


def clip_seconds(params: dict[str, Any]) -> float:
    return clip_frames(params) / float(params["fps"])


def retake_refusal(job: Job) -> str | None:
    """Why this job's clip cannot be retaken, in a sentence; None when it can."""
    if job.status != JobStatus.SUCCEEDED:
        return f"Job {job.id} has no finished clip to retake."
    if job.draft == DraftStep.DRAFT:
        return f"Job {job.id} is a half-size draft: press Finalize first, then Retake on the full clip."
    family = job.params.get("family", "ltx2")
    if family != "ltx2":
        return f"Retake needs the LTX-2 model; job {job.id} was made with {FAMILY_NAMES.get(family, family)}."
    return None


def parse_second(raw: str, label: str) -> float:
    """A form's seconds field: a plain number (a comma as decimal point is fine); the sentence names the field."""
    text = raw.strip().replace(",", ".").removesuffix("s").strip()
    if not text:
        raise ValueError(f"{label} is required: a number of seconds, like 1.5.")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{label} must be a number of seconds, like 1.5; got {raw.strip()!r}.") from None
    if not math.isfinite(value):
        raise ValueError(f"{label} must be a number of seconds, like 1.5; got {raw.strip()!r}.")
    return value


def retake_request(
    params: dict[str, Any], *, prompt: str, start: float, end: float, seed: int, source_video: str, source_job: int,
) -> GenerationRequest:
    """The request for a retake of the clip ``params`` made: its size, frames, fps, audio and LoRAs, a new seed.

    A retake is one denoising stage at the clip's own size (ltx-pipelines' ``RetakePipeline``):
    distilled for a distilled clip, else guided with the dev checkpoint (``one_stage``). The
    clip's own frames stand for its images, so end image and loop do not carry over.
    Raises pydantic's ValidationError, whose sentences name the field.
    """
    # Only what describes the clip carries over: another mode's own fields (an extend's, say) would not fit.
    data = {key: params[key] for key in KEPT_FROM_SOURCE if key in params} | {
        "mode": "retake", "prompt": prompt, "seed": seed, "source_video": source_video, "source_job": source_job,
        "retake_start": start, "retake_end": end, "frames": clip_frames(params),
        "pipeline": "distilled" if params.get("pipeline") == "distilled" else "one_stage",
    }
    return GenerationRequest.model_validate(data)

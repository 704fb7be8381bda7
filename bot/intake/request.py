"""Build a validated GenerationRequest from what a user typed and the image they sent."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from bot.intake.errors import IntakeError
from generator.checks import checkpoint_version
from generator.predict import largest_fit, least_vram_gib, predict
from generator.protocol import (
    FAMILY_NAMES,
    GenerationRequest,
    ModelFamily,
    PipelineKind,
    describe_validation_error,
    size_multiple,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from bot.config import Settings

# Very wide or tall images are cropped to at most this aspect ratio.
MAX_ASPECT = 2.5


def size_for_aspect(source_w: int, source_h: int, pixel_budget: int, multiple: int) -> tuple[int, int]:
    """The largest size on the model's grid with the image's aspect ratio and at most ``pixel_budget`` pixels."""
    aspect = min(max(source_w / source_h, 1 / MAX_ASPECT), MAX_ASPECT)
    height = math.sqrt(pixel_budget / aspect)
    width = height * aspect
    w = max(multiple, int(width // multiple) * multiple)
    h = max(multiple, int(height // multiple) * multiple)
    return w, h


def frames_for_seconds(seconds: float, fps: int) -> int:
    """The nearest valid frame count (8k+1) for a duration."""
    return max(1, round(seconds * fps / 8)) * 8 + 1


def choose_seed(settings: Settings, seed: int | None) -> int:
    if seed is not None:
        return seed
    if settings.generation.seed_policy == "fixed":
        return settings.generation.fixed_seed
    return secrets.randbelow(2**32)


def build_request(
    settings: Settings,
    *,
    prompt: str,
    source_size: tuple[int, int] | None = None,
    preset: str | None = None,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
    seconds: float | None = None,
    seed: int | None = None,
    audio: bool | None = None,
    pipeline: PipelineKind | None = None,
    negative_prompt: str | None = None,
    family: ModelFamily | None = None,
    guild_id: int | None = None,
    end_image: str | None = None,
    loop: bool | None = None,
    lora: str | None = None,
    lora_strength: float | None = None,
) -> GenerationRequest:
    """Fill defaults from the config and validate; problems raise IntakeError('invalid_request').

    The model family is the one asked for, else the guild's default; each family has its
    own default pipeline and pixel budget, and LTX-Video clips are silent.
    """
    gen = settings.generation
    family = family or settings.family_for(guild_id)
    if family not in settings.enabled_families():
        raise IntakeError(
            "invalid_request",
            f"The {FAMILY_NAMES[family]} model is not set up on this bot; choose "
            f"{' or '.join(FAMILY_NAMES[f] for f in settings.enabled_families())}, or ask the owner.",
        )
    kind: PipelineKind = pipeline or settings.default_pipeline(family)
    # A size asked for half-way, or twice, is refused: silently picking one would render
    # a size the user did not ask for.
    if (width is None) != (height is None):
        given, missing = ("width", "height") if width is not None else ("height", "width")
        raise IntakeError("invalid_request", f"{given} needs {missing} too: give both width and height, or "
                          "neither (the size then follows your image).")
    if preset is not None and width is not None:
        raise IntakeError("invalid_request", f"Choose either size ({preset}) or width and height "
                          f"({width}×{height}), not both.")
    if preset is not None:
        if preset not in gen.presets:
            names = ", ".join(sorted(gen.presets))
            raise IntakeError("invalid_request", f"size must be one of: {names}; got {preset!r}.")
        width, height = gen.presets[preset].width, gen.presets[preset].height
    if width is None or height is None:
        if source_size is None:
            width, height = gen.presets["landscape"].width, gen.presets["landscape"].height
        else:
            width, height = size_for_aspect(*source_size, settings.pixel_budget(family), size_multiple(kind, family))
    if lora_strength is not None and lora is None:
        raise IntakeError("invalid_request", "lora_strength needs lora: pick a LoRA too, or leave the strength out.")
    if frames is None:
        frames = frames_for_seconds(seconds, gen.fps) if seconds is not None else gen.frames
    data = {
        "prompt": prompt,
        "negative_prompt": negative_prompt if negative_prompt is not None else gen.negative_prompt,
        "width": width,
        "height": height,
        "frames": frames,
        "fps": gen.fps,
        "steps": gen.steps,
        "seed": choose_seed(settings, seed),
        "pipeline": kind,
        "family": family,
        "audio": (gen.audio and family != "ltxv") if audio is None else audio,
        "image_strength": gen.image_strength,
        "end_image": end_image,
        "loop": bool(loop),
        "loras": [] if lora is None else [lora_choice(settings, lora, lora_strength, kind)],
    }
    try:
        request = GenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise IntakeError("invalid_request", describe_validation_error(exc)) from None
    check_owner_limits(settings, request)
    return request


def lora_choice(settings: Settings, name: str, strength: float | None, kind: PipelineKind) -> dict[str, Any]:
    """A LoRA from the owner's list whose file is there and fits this bot's checkpoint; else IntakeError."""
    entry = settings.loras.get(name)
    if entry is None:
        names = ", ".join(sorted(settings.loras))
        known = f"lora must be one of: {names}" if names else "This bot has no LoRAs set up (loras in the config)"
        raise IntakeError("invalid_request", f"{known}; got {name!r}.")
    if not entry.file.expanduser().is_file():
        raise IntakeError("invalid_request", f"The LoRA {name} is not available: loras.{name}.file "
                          f"({entry.file.name}) was not found. Ask the bot's owner.")
    key = "distilled_checkpoint" if kind == "distilled" else "checkpoint"
    checkpoint = getattr(settings.models, key)
    version = checkpoint_version(checkpoint.expanduser()) if checkpoint is not None else None
    if version is not None and not version.startswith(entry.fits):
        raise IntakeError("invalid_request", f"The LoRA {name} does not fit this bot's model: loras.{name}.fits is "
                          f"{entry.fits}, models.{key} is version {version}. Ask the bot's owner.")
    return {"name": name, "strength": entry.strength if strength is None else strength}


def check_owner_limits(settings: Settings, request: GenerationRequest) -> None:
    """The owner's limits, below the contract's hard maxima: checked once, where a request comes in.

    Downstream (the worker, the generator) a stored request is held only to the contract,
    so raising a limit never fails jobs that are already queued.
    """
    limits = settings.limits
    if request.frames > limits.max_frames:
        raise IntakeError("invalid_request",
                          f"frames must be at most {limits.max_frames} on this server; got {request.frames}.")
    for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        if text is not None and len(text) > limits.max_prompt_chars:
            raise IntakeError("invalid_request", f"The {name} is {len(text)} characters; the limit on this "
                              f"server is {limits.max_prompt_chars}.")
    check_fits_budget(settings, request)


def least_vram(settings: Settings, request: GenerationRequest) -> float | None:
    """What the job needs at least (GiB, whole process), for workers with a smaller budget to pass it by."""
    return least_vram_gib(request.family, request.pipeline, request.width, request.height, request.frames,
                          request.audio, guidance_batch=settings.generator.guidance_batch)


def check_fits_budget(settings: Settings, request: GenerationRequest) -> None:
    """Refuse, before anything is queued, a clip whose predicted GPU memory does not fit the owner's budget.

    The prediction is the generator planner's own model (``generator/predict.py``); an
    ``auto`` budget depends on the card's free memory at job start and is left to the generator.
    """
    budget = settings.generator.vram_budget_gib
    if not isinstance(budget, int | float):
        return
    found = predict(request.family, request.pipeline, request.width, request.height, request.frames,
                    request.audio, float(budget), guidance_batch=settings.generator.guidance_batch)
    if found is None or found.fits(float(budget)):
        return
    args = (request.family, request.pipeline, request.width, request.height, request.frames, request.audio,
            float(budget))
    multiple = size_multiple(request.pipeline, request.family)
    shorter = largest_fit(*args, multiple=multiple, guidance_batch=settings.generator.guidance_batch)
    options = []
    if shorter is not None and (shorter[0], shorter[1]) == (request.width, request.height):
        options.append(f"{shorter[0]}×{shorter[1]} with up to {shorter[2]} frames")
    for scale in (0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25):
        w = max(multiple, int(request.width * scale) // multiple * multiple)
        h = max(multiple, int(request.height * scale) // multiple * multiple)
        fits = predict(request.family, request.pipeline, w, h, request.frames, request.audio, float(budget),
                       guidance_batch=settings.generator.guidance_batch)
        if fits is None or fits.fits(float(budget)):
            options.append(f"{w}×{h} with {request.frames} frames")
            break
    suggestion = " or ".join(options) if options else "a much smaller clip"
    raise IntakeError(
        "invalid_request",
        f"A {request.width}×{request.height}, {request.frames}-frame clip needs about "
        f"{found.process_peak_gib:.1f} GiB of GPU memory; this server's budget is {float(budget):g} GiB. "
        f"The largest that fits: {suggestion}.",
    )


class SizedRequest:
    """A ``normalise_image`` target: builds the request once the image's oriented size is known.

    The size derived from the image is the one the image is fitted to, so both come from
    one ``build_request`` call; ``request`` holds it afterwards.
    """

    def __init__(
        self, settings: Settings, *, build: Callable[[tuple[int, int]], GenerationRequest] | None = None,
        **options: Any,
    ) -> None:
        """``build`` makes the request from the image's size; else ``build_request`` with ``options``."""
        self.settings = settings
        self._build = build or (lambda size: build_request(settings, source_size=size, **options))
        self.request: GenerationRequest | None = None

    def __call__(self, width: int, height: int) -> tuple[int, int]:
        self.request = self._build((width, height))
        return self.request.width, self.request.height


@dataclass(frozen=True)
class RequestOptions:
    """What a user chose beside the prompt and the image (from ``/animate`` or a form); None: the default."""

    preset: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seconds: float | None = None
    seed: int | None = None
    audio: bool | None = None
    pipeline: PipelineKind | None = None
    family: ModelFamily | None = None
    loop: bool | None = None
    lora: str | None = None
    lora_strength: float | None = None

    def check_end_image(self, given: bool) -> None:
        """Refuse an end image with a loop before anything is downloaded."""
        if given and self.loop:
            raise IntakeError("invalid_request", "end_image and loop cannot go together: loop already ends on "
                              "your first image. Drop one of them.")

    def build(
        self, settings: Settings, *, prompt: str, source_size: tuple[int, int] | None, guild_id: int | None
    ) -> GenerationRequest:
        return build_request(
            settings, prompt=prompt, source_size=source_size, guild_id=guild_id, preset=self.preset,
            width=self.width, height=self.height, frames=self.frames, seconds=self.seconds, seed=self.seed,
            audio=self.audio, pipeline=self.pipeline, family=self.family, loop=self.loop, lora=self.lora,
            lora_strength=self.lora_strength,
        )

    def sized(self, settings: Settings, *, prompt: str, guild_id: int | None) -> SizedRequest:
        """The ``normalise_image`` target for these options: the size waits for the image's own."""
        return SizedRequest(settings, build=lambda size: self.build(settings, prompt=prompt, source_size=size,
                                                                    guild_id=guild_id))


def with_end_image(request: GenerationRequest, upload_name: str) -> GenerationRequest:
    """``request`` with its end image, validated again (the model's own rules name the field)."""
    try:
        return GenerationRequest.model_validate(request.model_dump() | {"end_image": upload_name})
    except ValidationError as exc:
        raise IntakeError("invalid_request", describe_validation_error(exc)) from None


def fixed_size(request: GenerationRequest) -> Callable[[int, int], tuple[int, int]]:
    """The ``normalise_image`` target for an end image: fitted to the first image's clip size."""
    return lambda _width, _height: (request.width, request.height)


# --- lipsync (docs/DESIGN.md, 'Lip-sync') ---
def lipsync_options(options: RequestOptions, frames: int) -> RequestOptions:
    """``options`` for a lip-sync clip: LTX-2's two-stage audio-to-video pipeline, with sound, ``frames`` long."""
    return RequestOptions(
        preset=options.preset, width=options.width, height=options.height, frames=frames, seed=options.seed,
        audio=True, pipeline="two_stage", family="ltx2",
    )


def with_audio_track(request: GenerationRequest, upload_name: str) -> GenerationRequest:
    """``request`` as a lip-sync job driven by the audio upload ``upload_name``, validated again."""
    try:
        return GenerationRequest.model_validate(
            request.model_dump() | {"mode": "lipsync", "audio_file": upload_name})
    except ValidationError as exc:
        raise IntakeError("invalid_request", describe_validation_error(exc)) from None

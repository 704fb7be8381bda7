"""The contract between the bot and the generator subprocess: job spec, events, exit codes.

Imported by both sides, so it must never import torch.
"""

from __future__ import annotations

import unicodedata
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PipelineKind = Literal["two_stage", "distilled", "one_stage", "two_stage_hq"]
PIPELINE_KINDS: tuple[PipelineKind, ...] = ("two_stage", "distilled", "one_stage", "two_stage_hq")
# off: the whole clip; draft: stage 1 only, kept for finalize; finalize: the rest of a draft.
DraftStep = Literal["off", "draft", "finalize"]
# ltx2: LTX-2 / LTX-2.3 through ltx-core; ltxv: LTX-Video 0.9.x through the ltx-video package.
ModelFamily = Literal["ltx2", "ltxv"]
# What a job makes (docs/DESIGN.md, 'Modes'): a clip from the image (animate), a longer clip from a
# delivered one (extend), a delivered clip with a time region made again (retake), or a clip driven
# by the user's audio track (lipsync).
JobMode = Literal["animate", "extend", "retake", "lipsync"]
# The request's fields that name a file in the uploads folder besides the first image.
UPLOAD_FIELDS = ("end_image", "source_video", "audio_file")
MODEL_FAMILIES: tuple[ModelFamily, ...] = ("ltx2", "ltxv")
FAMILY_NAMES: dict[str, str] = {"ltx2": "LTX-2", "ltxv": "LTX-Video"}
Quantization = Literal["fp8_cast", "fp8_scaled_mm", "bf16"]
ErrorCode = Literal["oom", "invalid_spec", "model_missing", "too_large", "internal"]

MIN_FRAMES = 9
MAX_FRAMES = 481
# Extend (docs/DESIGN.md, 'Extend'): the new segment's first frames are the clip's last ones; 8k+1, so
# the joined clip stays on the model's 8k+1 grid. The joined clip's own hard maximum (60 s at 24 fps).
EXTEND_OVERLAP_FRAMES = 9
MAX_EXTENDED_FRAMES = 1441
# LTX-2's video VAE packs 8 video frames into one latent frame (the first latent frame holds one).
FRAMES_PER_LATENT_FRAME = 8
MAX_SEED = 2**32 - 1
# The contract's hard maximum; an owner's lower limit is checked once, where a request comes in
# (bot/intake/request.py). 4000 is also the longest text a Discord modal field takes.
MAX_PROMPT_CHARS = 4000


class ExitCode(IntEnum):
    """Exit statuses of ``python -m generator``; the last event says the same in words."""

    OK = 0
    INTERNAL = 1
    INVALID_SPEC = 2
    OOM = 3
    MODEL_MISSING = 4
    TOO_LARGE = 5


def size_multiple(pipeline: PipelineKind, family: ModelFamily = "ltx2") -> int:
    """LTX-2's two-stage pipelines render stage 1 at half size, so the full size must divide by 64.

    LTX-Video's multi-scale pipelines pick their first-pass size themselves and resize the
    result back, so its sizes only need the VAE's 32.
    """
    return 32 if pipeline == "one_stage" or family == "ltxv" else 64


def clean_prompt(text: str) -> str:
    """Control characters become spaces; runs of whitespace collapse; ends are trimmed."""
    chars = [" " if unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"} else ch for ch in text]
    return " ".join("".join(chars).split())


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_LORAS = 4
MIN_LORA_STRENGTH, MAX_LORA_STRENGTH = -2.0, 2.0


class LoraChoice(_Frozen):
    """A LoRA the owner listed (``loras.NAME`` in the config), at the strength asked for."""

    name: str = Field(pattern=LORA_NAME_PATTERN)
    strength: float = Field(default=1.0, ge=MIN_LORA_STRENGTH, le=MAX_LORA_STRENGTH)


class GenerationRequest(_Frozen):
    """What a user asks for, validated against the model's constraints and the contract's hard maxima.

    The owner's own, lower limits (``limits.max_frames``, ``limits.max_prompt_chars``) are not
    checked here: a job validated at intake must stay valid in the worker and the generator,
    which read it back without the owner's settings.
    """

    prompt: str
    negative_prompt: str | None = None
    family: ModelFamily = "ltx2"
    width: int = Field(ge=64, le=4096)
    height: int = Field(ge=64, le=4096)
    frames: int = Field(ge=MIN_FRAMES, le=MAX_FRAMES)
    fps: int = Field(default=24, ge=1, le=60)
    steps: int | None = Field(default=None, ge=1, le=100)
    seed: int = Field(ge=0, le=MAX_SEED)
    pipeline: PipelineKind = "two_stage"
    audio: bool = True
    image_strength: float = Field(default=1.0, ge=0.0, le=1.0)
    # The upload name (in the bot's uploads folder) of an image for the last frame; the
    # worker resolves it inside that folder (docs/DESIGN.md, 'Modes').
    end_image: str | None = Field(default=None, max_length=200)
    # The first image at the last frame too, so the clip loops.
    loop: bool = False
    # Fused into the transformer of every stage, before the distilled LoRA (as ltx-pipelines orders them).
    loras: tuple[LoraChoice, ...] = Field(default=(), max_length=MAX_LORAS)
    mode: JobMode = "animate"
    # Extend and retake: the delivered clip they start from, copied into the uploads folder by
    # content name (``<sha256>.mp4``), and the job that delivered it (shown in /job).
    source_video: str | None = Field(default=None, max_length=200)
    source_job: int | None = Field(default=None, ge=1)
    # Lipsync: the user's audio track after the audio intake, an upload name (``<sha256>.wav``).
    audio_file: str | None = Field(default=None, max_length=200)
    # --- extend (docs/DESIGN.md, 'Extend') ---
    # The delivered clip's frame count: ``frames`` is the new segment, whose first
    # EXTEND_OVERLAP_FRAMES frames are the clip's last ones, so the joined clip has
    # ``total_frames``. The generator checks the source file has exactly these frames.
    source_frames: int | None = Field(default=None, ge=MIN_FRAMES, le=MAX_EXTENDED_FRAMES)

    @model_validator(mode="after")
    def _extend_inputs(self) -> GenerationRequest:
        if (self.mode == "extend") != (self.source_frames is not None):
            raise ValueError(f"source_frames is {'required' if self.mode == 'extend' else 'only'} for extend")
        if self.source_frames is None:
            return self
        if (self.source_frames - 1) % 8:
            raise ValueError(f"source_frames must be one more than a multiple of 8; got {self.source_frames}")
        if self.frames < EXTEND_OVERLAP_FRAMES + 8:
            raise ValueError(f"frames must be at least {EXTEND_OVERLAP_FRAMES + 8} for extend: its first "
                             f"{EXTEND_OVERLAP_FRAMES} frames overlap the clip; got {self.frames}")
        if self.total_frames > MAX_EXTENDED_FRAMES:
            raise ValueError(f"an extended clip may have at most {MAX_EXTENDED_FRAMES} frames; "
                             f"this one would have {self.total_frames}")
        return self

    @property
    def total_frames(self) -> int:
        """Frames of the clip this request makes: an extension is the source clip and the new frames."""
        if self.source_frames is None:
            return self.frames
        return self.source_frames + self.frames - EXTEND_OVERLAP_FRAMES
    # --- retake (docs/DESIGN.md, 'Retake') ---
    # The region of the source clip made again, in seconds from its start; the rest of it is kept.
    retake_start: float | None = Field(default=None, allow_inf_nan=False)
    retake_end: float | None = Field(default=None, allow_inf_nan=False)

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _clean(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        cleaned = clean_prompt(value)
        if info.field_name == "prompt" and not cleaned:
            raise ValueError("the prompt is empty: describe the motion you want, for example 'waves roll in'")
        if len(cleaned) > MAX_PROMPT_CHARS:
            raise ValueError(f"the {(info.field_name or 'text').replace('_', ' ')} is {len(cleaned)} characters; "
                             f"the limit is {MAX_PROMPT_CHARS}")
        return cleaned or None

    @field_validator("frames")
    @classmethod
    def _frames_grid(cls, value: int) -> int:
        if (value - 1) % 8:
            lower = (value - 1) // 8 * 8 + 1
            raise ValueError(f"frames must be one more than a multiple of 8 (9, 17, 25, ... 481); "
                             f"got {value}, try {lower} or {lower + 8}")
        return value

    @model_validator(mode="after")
    def _size_grid(self) -> GenerationRequest:
        multiple = size_multiple(self.pipeline, self.family)
        where = f"the {self.pipeline} pipeline" if self.family == "ltx2" else FAMILY_NAMES[self.family]
        for name in ("width", "height"):
            value = getattr(self, name)
            if value % multiple:
                lower = value // multiple * multiple
                raise ValueError(
                    f"{name} must be a multiple of {multiple} for {where}; "
                    f"got {value}, try {max(lower, multiple)} or {lower + multiple}"
                )
        return self

    @model_validator(mode="after")
    def _family_features(self) -> GenerationRequest:
        if self.family == "ltxv" and self.audio:
            raise ValueError("LTX-Video makes silent clips: turn audio off, or choose the LTX-2 model for sound")
        if self.family == "ltxv" and self.pipeline == "two_stage_hq":
            raise ValueError("pipeline two_stage_hq is LTX-2's: choose two_stage, distilled or one_stage for LTX-Video")
        if self.end_image is not None and self.loop:
            raise ValueError("end_image and loop cannot go together: loop already ends on your first image; "
                             "drop one of them")
        if self.family == "ltxv" and (self.end_image is not None or self.loop):
            name = "loop" if self.loop else "end_image"
            raise ValueError(f"{name} needs the LTX-2 model: LTX-Video conditions on the first frame only")
        if self.family == "ltxv" and self.loras:
            raise ValueError("lora needs the LTX-2 model: this bot's LoRAs are LTX-2 LoRAs")
        if len({lora.name for lora in self.loras}) != len(self.loras):
            raise ValueError("lora: each LoRA may be chosen once")
        for name in UPLOAD_FIELDS:
            value = getattr(self, name)
            if value is not None and (not value or "/" in value or "\\" in value or value.startswith(".")):
                raise ValueError(f"{name} must be the name of an uploaded file, not a path")
        return self

    @model_validator(mode="after")
    def _mode_inputs(self) -> GenerationRequest:
        needs_video = self.mode in ("extend", "retake")
        if needs_video != (self.source_video is not None):
            raise ValueError(f"source_video is {'required' if needs_video else 'only'} for extend and retake")
        if (self.mode == "lipsync") != (self.audio_file is not None):
            raise ValueError(f"audio_file is {'required' if self.mode == 'lipsync' else 'only'} for lipsync")
        if self.mode != "animate" and self.family == "ltxv":
            raise ValueError(f"{self.mode} needs the LTX-2 model: LTX-Video has no {self.mode} pipeline")
        return self

    @model_validator(mode="after")
    def _retake_region(self) -> GenerationRequest:
        region = (self.retake_start, self.retake_end)
        if self.mode != "retake":
            if region != (None, None):
                raise ValueError("the retake region (retake_start, retake_end) is only for mode retake")
            return self
        if None in region:
            raise ValueError("a retake needs a Start second and an End second")
        if self.pipeline not in RETAKE_PIPELINES:
            raise ValueError(f"a retake renders in one stage at the clip's own size: pipeline must be one of "
                             f"{', '.join(RETAKE_PIPELINES)}, not {self.pipeline}")
        if self.keyframed:
            raise ValueError("a retake keeps the clip's own frames: end_image and loop are for animate")
        assert self.retake_start is not None and self.retake_end is not None
        problem = retake_region_problem(self.retake_start, self.retake_end, self.frames, self.fps)
        if problem:
            raise ValueError(problem)
        return self

    # --- lipsync (docs/DESIGN.md, 'Lip-sync') ---
    @model_validator(mode="after")
    def _lipsync_fits(self) -> GenerationRequest:
        if self.mode != "lipsync":
            return self
        if self.pipeline != "two_stage":
            raise ValueError(f"pipeline must be two_stage for lipsync (the audio-to-video pipeline is two-stage); "
                             f"got {self.pipeline}")
        if not self.audio:
            raise ValueError("audio must stay on for lipsync: the clip carries your audio track")
        if self.keyframed:
            raise ValueError("end_image and loop do not go with lipsync: the audio drives the whole clip")
        if self.loras:
            raise ValueError("lora does not go with lipsync: the audio-to-video pipeline is checked without LoRAs")
        return self

    @property
    def keyframed(self) -> bool:
        """An image is set at the last frame too (an end image, or a loop)."""
        return self.end_image is not None or self.loop


# A retake is ltx-pipelines' RetakePipeline: one denoising stage at the clip's size, guided (the dev
# checkpoint) or distilled; the front end picks distilled for a distilled clip, else one_stage.
RETAKE_PIPELINES: tuple[PipelineKind, ...] = ("one_stage", "distilled")


def retake_region_problem(start: float, end: float, frames: int, fps: int) -> str | None:
    """Why ``[start, end)`` seconds cannot be retaken in a clip of ``frames`` at ``fps``, or None.

    The model remakes whole latent frames (8 video frames each): ltx-pipelines' mask takes every
    latent frame that overlaps the region, so a region shorter than one would still remake
    one, more than was asked. Half a video frame of slack on both checks lets a user type the
    rounded numbers this message shows.
    """
    length = frames / fps
    slack = 0.5 / fps
    shortest = FRAMES_PER_LATENT_FRAME / fps
    if start < 0:
        return f"Start second must be 0 or more; got {start:g}."
    if end > length + slack:
        return f"End second must be at most {length:.2f}: the clip is {length:.2f} s long; got {end:g}."
    if start >= end:
        return f"Start second must be before End second; got {start:g} and {end:g}."
    if end - start < shortest - slack:
        return (f"The region from Start second to End second must be at least {shortest:.2f} s "
                f"({FRAMES_PER_LATENT_FRAME} frames, the smallest part the model remakes); got {end - start:.2f} s.")
    return None


def describe_validation_error(exc: ValidationError) -> str:
    """One sentence per problem, naming the field and what is allowed."""
    sentences = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        ctx = err.get("ctx") or {}
        kind = err["type"]
        if kind in {"greater_than_equal", "less_than_equal"}:
            bounds = _FIELD_BOUNDS.get(field)
            allowed = f"between {bounds[0]} and {bounds[1]}" if bounds else (
                f"at least {ctx.get('ge')}" if "ge" in ctx else f"at most {ctx.get('le')}")
            sentences.append(f"{field} must be {allowed}; got {err['input']}.")
        elif kind == "literal_error":
            sentences.append(f"{field} must be one of {ctx.get('expected')}; got {err['input']!r}.")
        elif kind == "value_error":
            message = str(err["msg"]).removeprefix("Value error, ")
            sentences.append(message[0].upper() + message[1:] + ("" if message.endswith(".") else "."))
        elif kind == "missing":
            sentences.append(f"{field} is required.")
        else:
            sentences.append(f"{field}: {err['msg']}.")
    return " ".join(sentences)


_FIELD_BOUNDS: dict[str, tuple[int | float, int | float]] = {
    "width": (64, 4096),
    "height": (64, 4096),
    "frames": (MIN_FRAMES, MAX_FRAMES),
    "fps": (1, 60),
    "steps": (1, 100),
    "seed": (0, MAX_SEED),
    "image_strength": (0.0, 1.0),
}


class Tiling(_Frozen):
    """VAE decoder tiles; the config's ``vae_tiling`` section."""

    spatial_px: int = Field(default=512, ge=64)
    spatial_overlap_px: int = Field(default=64, ge=0)
    temporal_frames: int = Field(default=64, ge=16)
    temporal_overlap_frames: int = Field(default=24, ge=0)

    @model_validator(mode="after")
    def _multiples(self) -> Tiling:
        # ltx-core refuses these with a ValueError (ltx_core/model/video_vae/tiling.py), deep inside a render.
        if self.spatial_px % 32 or self.spatial_overlap_px % 32 or self.spatial_overlap_px >= self.spatial_px:
            raise ValueError("spatial_px and spatial_overlap_px must be multiples of 32, overlap < tile")
        if self.temporal_frames % 8 or self.temporal_overlap_frames % 8:
            raise ValueError("temporal_frames and temporal_overlap_frames must be multiples of 8")
        # Temporal overlap below the tile is LTX-2's rule only: LTX-Video's windowed decode reads
        # temporal_overlap_frames as context on each side, which may exceed the window (JobSpec checks).
        return self


class ModelFiles(_Frozen):
    """Model files for the LTX-2 family, in the official layout; names match config keys."""

    checkpoint: Path | None = None
    distilled_checkpoint: Path | None = None
    distilled_lora: Path | None = None
    spatial_upsampler: Path | None = None
    gemma_root: Path | None = None


class LtxvModelFiles(_Frozen):
    """Model files for the LTX-Video 0.9.x family, in the official layout; names match config keys."""

    checkpoint: Path | None = None
    distilled_checkpoint: Path | None = None
    spatial_upsampler: Path | None = None
    text_encoder_root: Path | None = None


class LoraFile(_Frozen):
    """A chosen LoRA resolved to its file by the worker; ``name`` is its key under ``loras`` in the config."""

    name: str = Field(pattern=LORA_NAME_PATTERN)
    path: Path
    strength: float = Field(ge=MIN_LORA_STRENGTH, le=MAX_LORA_STRENGTH)


class JobSpec(_Frozen):
    """Everything one generator run needs; written by the worker as ``spec.json``."""

    request: GenerationRequest
    image_path: Path
    # The image at the last frame: the request's end image, or image_path itself for a loop.
    end_image_path: Path | None = None
    # The request's source_video and audio_file, resolved inside the uploads folder.
    source_video_path: Path | None = None
    audio_path: Path | None = None
    output_path: Path
    models: ModelFiles = ModelFiles()
    loras: tuple[LoraFile, ...] = ()
    ltxv_models: LtxvModelFiles = LtxvModelFiles()
    tiling: Tiling = Tiling()
    fp8_cast: bool = True
    # Stage-1 guidance passes per transformer forward (1: one by one, as ltx-pipelines runs them).
    guidance_batch: int = Field(default=1, ge=1, le=4)
    # Whole-process GPU memory this job may use (GiB; "auto": free memory at start less a margin;
    # None: no budget). The generator streams weights and picks activation sizes to fit it.
    vram_budget_gib: float | Literal["auto"] | None = None
    # reuse: stage 2 fuses the distilled LoRA into stage 1's transformer and reads only the
    # LoRA; reload: it builds the transformer again from the checkpoint, as ltx-pipelines
    # does. Both give the same clip bit for bit (tests/test_weights.py); reload is the reference.
    stage_2_transformer: Literal["reuse", "reload"] = "reuse"
    # Prompt embeddings kept between jobs (generator/ltx2/embed_cache.py); None or 0 bytes: off.
    embedding_cache_dir: Path | None = None
    embedding_cache_bytes: int = Field(default=0, ge=0)
    # How the transformer blocks' Linears multiply (None: fp8_cast when fp8_cast is true, else bf16);
    # fp8_scaled_mm needs compute capability 8.9+ (generator/ltx2/scaled_mm.py).
    quantization: Quantization | None = None
    # The blocks through one torch.compile'd function (generator/ltx2/compiled.py), its cache here.
    compile_blocks: bool = False
    compile_cache_dir: Path | None = None
    # The compiled blocks replayed as CUDA graphs once a job's shapes repeat (needs compile_blocks, CUDA).
    cuda_graphs: bool = False
    # Prepared weights (fp8-cast transformer) are kept here, at most this many GiB; None: no cache.
    # What the standby may stage in host memory; pinned (page-locked) once the job has CUDA.
    # (docs/DESIGN.md, 'Prepared weights and staging')
    prepared_dir: Path | None = None
    prepared_cache_gib: float = Field(default=0.0, ge=0)
    host_ram_budget_gib: float = Field(default=0.0, ge=0)
    pin_staged: bool = True
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    crf: int = Field(default=23, ge=0, le=51)
    max_bytes: int | None = Field(default=None, ge=4096)
    # --- drafts and previews (docs/DESIGN.md, 'Drafts and previews') ---
    # draft: stage 1 only; its half-size clip goes to output_path and what stage 2 needs
    # (latents, embeddings, conditioning, the RNG state) to draft_state. finalize: upsample,
    # stage 2 and the decode from draft_state; the clip is the full run's, bit for bit.
    draft: DraftStep = "off"
    draft_state: Path | None = None
    # A PNG of stage 1's current estimate into preview_dir at most this often (0: none).
    preview_every_seconds: float = Field(default=0.0, ge=0.0)
    preview_dir: Path | None = None

    @property
    def family(self) -> ModelFamily:
        return self.request.family

    @property
    def weights(self) -> Quantization:
        """The quantization this job runs: ``quantization``, or what the older ``fp8_cast`` switch says."""
        return self.quantization or ("fp8_cast" if self.fp8_cast else "bf16")

    @model_validator(mode="after")
    def _cuda_graphs_compiled(self) -> JobSpec:
        if self.cuda_graphs and not self.compile_blocks:
            raise ValueError("cuda_graphs replays the compiled blocks: it needs compile_blocks")
        return self

    @model_validator(mode="after")
    def _loras_resolved(self) -> JobSpec:
        asked = [(lora.name, lora.strength) for lora in self.request.loras]
        if [(lora.name, lora.strength) for lora in self.loras] != asked:
            raise ValueError("loras must be the request's LoRAs, in its order, each resolved to its file")
        return self

    @model_validator(mode="after")
    def _end_image_given(self) -> JobSpec:
        if self.request.keyframed and self.end_image_path is None:
            raise ValueError("end_image_path is required when the request has end_image or loop")
        if not self.request.keyframed and self.end_image_path is not None:
            raise ValueError("end_image_path is set but the request has neither end_image nor loop")
        return self

    @model_validator(mode="after")
    def _mode_files_given(self) -> JobSpec:
        for field, path in (("source_video", self.source_video_path), ("audio_file", self.audio_path)):
            if (getattr(self.request, field) is None) != (path is None):
                raise ValueError(f"{field}'s path must be set exactly when the request has {field}")
        return self

    @model_validator(mode="after")
    def _draft_needs_two_stages(self) -> JobSpec:
        if self.draft != "off":
            if self.family != "ltx2" or self.request.pipeline not in ("two_stage", "distilled"):
                raise ValueError("draft: only LTX-2's two-stage pipelines (two_stage, distilled) have a draft")
            if self.draft_state is None:
                raise ValueError("draft: draft_state names the file that keeps the draft for its finalize")
        if self.preview_every_seconds > 0 and self.preview_dir is None:
            raise ValueError("preview_every_seconds: previews need a preview_dir")
        return self

    @model_validator(mode="after")
    def _modes_render_whole(self) -> JobSpec:
        # Lip-sync's stages hold the user's audio, a retake is one full-size stage, an extension is
        # joined to its clip at the end: none of them is an image-to-video stage 1 to finalize later.
        if self.request.mode != "animate" and self.draft != "off":
            raise ValueError(f"draft: a {self.request.mode} clip is rendered whole; it has no draft")
        return self

    @model_validator(mode="after")
    def _tiles_fit_the_family(self) -> JobSpec:
        if self.family == "ltx2" and self.tiling.temporal_overlap_frames >= self.tiling.temporal_frames:
            raise ValueError("vae_tiling.temporal_overlap_frames must be smaller than temporal_frames for LTX-2")
        return self


# --- events: one JSON object per line on stdout ---------------------------------


class ReadyEvent(_Frozen):
    """A standby generator (``--standby``) has done its imports and waits for a spec path on stdin."""

    event: Literal["ready"] = "ready"
    pid: int
    import_seconds: float
    # The compiler's imports were done too (``WARM_COMPILER_ENV``), inside ``import_seconds``.
    compiler_warmed: bool = False


class StartedEvent(_Frozen):
    event: Literal["started"] = "started"
    pid: int
    device: str
    device_name: str
    family: ModelFamily
    import_seconds: float
    # Versions of the libraries this interpreter renders with (each family has its own virtualenv).
    libraries: dict[str, str] = {}


# The worker hands a standby generator its staging settings in this environment variable,
# JSON {"dir": prepared dir, "budget_gib": host RAM budget} (generator/ltx2/staging.py).
STAGING_ENV = "LTXBOT_STAGING"
# Set ("1") when the worker's jobs compile their transformer blocks: a standby then imports the
# compiler too (generator/ltx2/compiled.py, ``warm_imports``).
WARM_COMPILER_ENV = "LTXBOT_WARM_COMPILER"


class WeightReads(_Frozen):
    """Where a phase's weights came from and what each source cost (docs/DESIGN.md, 'Prepared weights and staging').

    Files are the model files (``checkpoint_*``) and the prepared cache (``prepared_*``);
    of their bytes, ``disk_bytes`` the kernel fetched from storage and the rest
    (``page_cache_bytes``) it had cached. ``staged_*``: host memory the standby filled,
    ``pinned_bytes`` of it page-locked; its seconds include the pinning.
    """

    checkpoint_bytes: int = Field(default=0, ge=0)
    checkpoint_seconds: float = Field(default=0.0, ge=0)
    prepared_bytes: int = Field(default=0, ge=0)
    prepared_seconds: float = Field(default=0.0, ge=0)
    staged_bytes: int = Field(default=0, ge=0)
    pinned_bytes: int = Field(default=0, ge=0)
    staged_seconds: float = Field(default=0.0, ge=0)
    disk_bytes: int | None = None
    page_cache_bytes: int | None = None
    written_bytes: int = Field(default=0, ge=0)  # prepared copy written for the next job


class PhaseEvent(_Frozen):
    event: Literal["phase"] = "phase"
    name: str
    seconds: float = Field(ge=0)
    device: str
    peak_allocated_gib: float | None = None
    peak_reserved_gib: float | None = None
    peak_rss_gib: float = Field(ge=0)
    # The phase raised (out of memory, say): its figures run up to the error.
    failed: bool = False
    # What the VRAM budget's planner chose for this phase (resident and streamed blocks, batch,
    # tiles, chunk) and what streaming did (bytes copied to the device, host bytes pinned).
    plan: dict[str, Any] | None = None
    weights: WeightReads | None = None


class ProgressEvent(_Frozen):
    event: Literal["progress"] = "progress"
    stage: str
    step: int = Field(ge=0)
    total: int = Field(ge=0)


class PreviewEvent(_Frozen):
    """A small PNG of the denoised estimate at this step of a stage (generator/preview.py)."""

    event: Literal["preview"] = "preview"
    stage: str
    step: int = Field(ge=0)
    total: int = Field(ge=0)
    path: Path
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    seconds: float = Field(ge=0)  # what making it cost


class DoneEvent(_Frozen):
    event: Literal["done"] = "done"
    output_path: Path
    bytes: int
    frames: int
    width: int
    height: int
    fps: int
    duration_seconds: float
    has_audio: bool
    reencoded: bool
    phases: list[PhaseEvent]
    # Models still referenced after the phase that should have freed them (should be empty).
    leaked_models: list[str] = []


class ErrorEvent(_Frozen):
    event: Literal["error"] = "error"
    code: ErrorCode
    message: str


Event = Annotated[
    ReadyEvent | StartedEvent | PhaseEvent | ProgressEvent | PreviewEvent | DoneEvent | ErrorEvent,
    Field(discriminator="event"),
]
_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(line: str | bytes) -> Event:
    return _EVENT_ADAPTER.validate_json(line)

"""ltxbot configuration: one YAML file plus ``LTXBOT_...`` environment overrides.

The Discord token is deliberately not a setting: it comes from ``DISCORD_TOKEN``
or from the file named by ``token_file``, so it never sits in the YAML.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from generator.protocol import (
    LORA_NAME_PATTERN,
    MAX_FRAMES,
    MAX_LORA_STRENGTH,
    MAX_PROMPT_CHARS,
    MIN_FRAMES,
    MIN_LORA_STRENGTH,
    ModelFamily,
    ModelFiles,
    PipelineKind,
    Quantization,
    Tiling,
)

# Discord lists at most 25 autocomplete choices.
MAX_AUTOCOMPLETE_CHOICES = 25
EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "config.example.yaml"

TOKEN_HELP = (
    "No Discord token: set DISCORD_TOKEN (or token_file in config.yaml). Create one at "
    "https://discord.com/developers/applications > your app > Bot > Reset Token; invite the bot with the "
    "'bot' and 'applications.commands' scopes and the Send Messages, Attach Files, Embed Links and "
    "Read Message History permissions (enable the Message Content intent only if you set "
    "discord.message_content_intent: true)."
)


class ConfigError(Exception):
    """A configuration problem, phrased for the person running the bot."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SizePreset(_Section):
    width: int = Field(ge=64, le=4096)
    height: int = Field(ge=64, le=4096)


def _default_presets() -> dict[str, SizePreset]:
    return {
        "landscape": SizePreset(width=1024, height=768),
        "portrait": SizePreset(width=768, height=1024),
        "square": SizePreset(width=896, height=896),
        "landscape-small": SizePreset(width=768, height=512),
        "portrait-small": SizePreset(width=512, height=768),
        "square-small": SizePreset(width=640, height=640),
        "landscape-wide": SizePreset(width=1280, height=768),
        "landscape-hd": SizePreset(width=1536, height=1152),
    }


class GenerationDefaults(_Section):
    family: ModelFamily = "ltx2"
    # Guild id -> model family, for servers that should default to another family than ``family``.
    guild_families: dict[int, ModelFamily] = Field(default_factory=dict)
    pipeline: PipelineKind = "two_stage"
    frames: int = Field(default=97, ge=MIN_FRAMES, le=MAX_FRAMES)
    fps: int = Field(default=24, ge=1, le=60)
    steps: int | None = Field(default=None, ge=1, le=100)
    seed_policy: Literal["random", "fixed"] = "random"
    fixed_seed: int = Field(default=10, ge=0, le=2**32 - 1)
    pixel_budget: int = Field(default=1024 * 768, ge=64 * 64)
    negative_prompt: str | None = None
    audio: bool = True
    image_strength: float = Field(default=1.0, ge=0.0, le=1.0)
    crf: int = Field(default=23, ge=0, le=51)
    presets: dict[str, SizePreset] = Field(default_factory=_default_presets)
    # Drafts (README, 'Drafts'): /animate renders stage 1 only and waits for Finalize, by
    # default here or in the guilds listed; draft_keep_hours is how long a draft stays finalizable.
    draft: bool = False
    guild_drafts: dict[int, bool] = Field(default_factory=dict)
    draft_keep_hours: float = Field(default=24.0, gt=0, le=24 * 30)

    @model_validator(mode="after")
    def _frames_on_grid(self) -> GenerationDefaults:
        if (self.frames - 1) % 8:
            raise ValueError(f"frames must be 8k+1 (9, 17, ..., 97, ...); got {self.frames}")
        return self


class Limits(_Section):
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(default=40_000_000, ge=64 * 64)
    min_image_side: int = Field(default=64, ge=1)
    max_frames: int = Field(default=257, ge=MIN_FRAMES, le=MAX_FRAMES)
    max_queued_per_user: int = Field(default=3, ge=1)
    daily_quota: int = Field(default=20, ge=0)
    cooldown_seconds: float = Field(default=30.0, ge=0)
    max_prompt_chars: int = Field(default=1000, ge=1, le=MAX_PROMPT_CHARS)
    intake_threads: int = Field(default=2, ge=1, le=32)
    download_timeout_seconds: float = Field(default=30.0, gt=0)
    # Per image, for the decoder process (bot/intake/decoder.py): its address space (which caps its
    # peak RSS), its CPU time, and the wall time after which it is killed.
    decode_memory_mib: int = Field(default=300, ge=128, le=65536)
    decode_cpu_seconds: int = Field(default=10, ge=1, le=600)
    decode_timeout_seconds: float = Field(default=20.0, gt=0, le=3600)
    # Per user, seconds of generator phases in the last 24 hours (null: no GPU-time budget).
    daily_gpu_seconds: float | None = Field(default=None, gt=0)
    # --- lipsync (docs/DESIGN.md, 'Lip-sync') ---
    # The longest audio track /lipsync takes; the clip follows the track, up to max_frames.
    max_audio_seconds: float = Field(default=10.0, gt=0, le=60)
    # The audio decoder process's address space (PyAV's libraries need more than Pillow's).
    audio_decode_memory_mib: int = Field(default=512, ge=192, le=65536)


class LtxvSettings(_Section):
    """The LTX-Video 0.9.x family: its own interpreter (ltx-video pins transformers<4.52) and files."""

    enabled: bool = False
    python: Path = Path(".venv-ltxv/bin/python")
    checkpoint: Path | None = None
    distilled_checkpoint: Path | None = None
    spatial_upsampler: Path | None = None
    text_encoder_root: Path | None = None
    pipeline: PipelineKind = "distilled"
    pixel_budget: int = Field(default=768 * 512, ge=64 * 64)


class GeneratorSettings(_Section):
    python: Path | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    fp8_cast: bool = True
    guidance_batch: int = Field(default=1, ge=1, le=4)  # stage-1 guidance passes per transformer forward
    # Whole-process GPU memory a job may use, GiB: a number, "auto" (the card's free memory at job
    # start less a margin) or null (no budget: everything resident). Streams weights to fit it.
    vram_budget_gib: float | Literal["auto"] | None = None
    # Prompt embeddings kept under the data dir for Reruns and Tweaks (0: off); emptied by /admin purge.
    embedding_cache_gib: float = Field(default=1.0, ge=0, le=1024)
    # How the transformer's Linears multiply; null follows fp8_cast (fp8_cast when true, else bf16).
    quantization: Quantization | None = None
    # The transformer blocks through torch.compile, its cache under the data dir (off until measured).
    compile_blocks: bool = False
    # The compiled blocks replayed as CUDA graphs (needs compile_blocks and an NVIDIA GPU; off until measured).
    cuda_graphs: bool = False

    @model_validator(mode="after")
    def _quantization_agrees(self) -> GeneratorSettings:
        if self.cuda_graphs and not self.compile_blocks:
            raise ValueError("generator.cuda_graphs replays the compiled blocks, but generator.compile_blocks "
                             "is false; set compile_blocks: true as well, or cuda_graphs: false")
        if self.cuda_graphs and self.device == "cpu":
            raise ValueError("generator.cuda_graphs needs an NVIDIA GPU, but generator.device is cpu; "
                             "set cuda_graphs: false")
        if self.quantization == "fp8_scaled_mm" and self.device == "cpu":
            raise ValueError("generator.quantization fp8_scaled_mm needs an NVIDIA GPU with fp8 tensor cores "
                             "(compute capability 8.9 or newer), but generator.device is cpu; use fp8_cast or bf16")
        if (self.quantization in ("fp8_cast", "fp8_scaled_mm") and "fp8_cast" in self.model_fields_set
                and not self.fp8_cast):
            raise ValueError(f"generator.fp8_cast is false but generator.quantization is {self.quantization}; "
                             "set one of them (quantization: bf16 means no fp8)")
        return self
    timeout_base_seconds: float = Field(default=300.0, gt=0)
    # Extra seconds per million output pixels x frames (1024x768x97 is about 76).
    timeout_seconds_per_mpx_frame: float = Field(default=6.0, ge=0)
    max_attempts: int = Field(default=3, ge=1, le=10)
    kill_grace_seconds: float = Field(default=10.0, ge=0)
    log_max_bytes: int = Field(default=1_000_000, ge=4096)
    expandable_segments: bool = True
    # Keep the next generator process started and imported (about 13 s of imports) before its job.
    standby: bool = True
    # Disk for prepared weights under the data dir (the fp8-cast transformer: 18 GiB); 0 turns it off.
    prepared_cache_gib: float = Field(default=24.0, ge=0)
    # Host memory the standby may fill with the next job's weights ahead of time; 0: none staged.
    host_ram_budget_gib: float = Field(default=0.0, ge=0)
    # Page-lock staged weights once the job has CUDA (copies at pinned speed).
    pin_staged: bool = True
    # A preview of stage 1's estimate on the status card at most this often; 0: none. Off by
    # default: the decoder it needs adds 0.76 GiB to stage 1's peak (bench/results/h200-draft).
    preview_interval_seconds: float = Field(default=0.0, ge=0.0, le=3600.0)


class WorkerSettings(_Section):
    """This process's worker: which GPU it renders on and how long its claim on a job holds."""

    # Shown in /admin workers and named by /admin drain (default: host name, plus ":gpuN" with --gpu).
    name: str | None = Field(default=None, min_length=1, max_length=200)
    # The GPU index this worker's generators see (CUDA_VISIBLE_DEVICES); `ltxbot worker --gpu N` sets it.
    gpu: int | None = Field(default=None, ge=0, le=63)
    # A running job whose worker has not renewed its claim for this long is given to another worker.
    lease_seconds: float = Field(default=60.0, ge=2.0, le=3600.0)
    # A queued job that no live worker can render (its family is served nowhere, or it needs more VRAM
    # than any worker's budget) fails with a clear message after waiting this long, so that a worker
    # that is still starting can take it first.
    unserved_grace_seconds: float = Field(default=60.0, ge=0.0, le=86400.0)


class DiscordSettings(_Section):
    guilds: list[int] = Field(default_factory=list)
    required_role: str | None = None
    admin_role: str | None = None
    admin_user_ids: list[int] = Field(default_factory=list)
    allow_dms: bool = False
    message_content_intent: bool = False
    progress_interval_seconds: float = Field(default=2.0, ge=0.5)
    # Clips are encoded to fit the server's upload limit; this caps them lower (null: the server's limit).
    max_clip_bytes: int | None = Field(default=None, ge=16 * 1024)
    cdn_hosts: list[str] = Field(default_factory=lambda: ["cdn.discordapp.com", "media.discordapp.net"])
    # Only for tests against the loopback fake Discord: also allow http:// URLs.
    allow_insecure_cdn: bool = False
    # How often the front end looks for progress and finished clips of workers in other processes.
    remote_poll_seconds: float = Field(default=2.0, ge=0.2, le=60.0)


class LoraEntry(_Section):
    """One LoRA users may pick with ``/animate lora:``; its key under ``loras`` is the name they see."""

    file: Path
    # The strength when the user gives none.
    strength: float = Field(default=1.0, ge=MIN_LORA_STRENGTH, le=MAX_LORA_STRENGTH)
    # The checkpoint version it was trained on, as a prefix of the checkpoint's model_version
    # metadata: "2.3" fits LTX-2.3 (2.3.0, 2.3.1), "2" any LTX-2.
    fits: str = Field(min_length=1, max_length=16, pattern=r"^[0-9]+(\.[0-9]+)*$")
    description: str | None = Field(default=None, max_length=80)


class ExtendSettings(_Section):
    """The Extend button (docs/DESIGN.md, 'Extend'): how much each press adds, and the longest clip it makes."""

    # Each press adds about this much (the new segment, less its overlap with the clip, on the 8k+1 grid).
    segment_seconds: float = Field(default=4.0, gt=0, le=20)
    # No extension makes a clip longer than this; a press on a clip at it is refused.
    max_seconds: float = Field(default=20.0, gt=0, le=60)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LTXBOT_", env_nested_delimiter="__", extra="forbid", frozen=True
    )
    _yaml_path: ClassVar[Path | None] = None

    data_dir: Path = Path("data")
    database_url: str | None = None
    # How input images and clips reach workers and front ends on other hosts: through the database
    # ("database"), or not at all because every process shares this data dir ("local").
    # "auto": the database on PostgreSQL, local on SQLite (one file, one machine).
    share_files: Literal["auto", "database", "local"] = "auto"
    token_file: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The contract's own models, so a config the bot accepts is one the generator accepts.
    models: ModelFiles = ModelFiles()
    # LoRAs by the name users pick them by (camera moves, styles); LTX-2 only.
    loras: dict[str, LoraEntry] = Field(default_factory=dict)
    generation: GenerationDefaults = GenerationDefaults()
    limits: Limits = Limits()
    vae_tiling: Tiling = Tiling()
    generator: GeneratorSettings = GeneratorSettings()
    worker: WorkerSettings = WorkerSettings()
    ltxv: LtxvSettings = LtxvSettings()
    discord: DiscordSettings = DiscordSettings()
    extend: ExtendSettings = ExtendSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._yaml_path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls._yaml_path))
        return tuple(sources)

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("use sqlite+aiosqlite:///PATH or postgresql+asyncpg://...")
        return value

    @field_validator("loras")
    @classmethod
    def _lora_names(cls, value: dict[str, LoraEntry]) -> dict[str, LoraEntry]:
        for name in value:
            if not re.fullmatch(LORA_NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a usable LoRA name: letters, digits, '.', '_' and '-', "
                                 "at most 64, starting with a letter or digit")
        if len(value) > MAX_AUTOCOMPLETE_CHOICES:
            raise ValueError(f"at most {MAX_AUTOCOMPLETE_CHOICES} LoRAs (what Discord's autocomplete can list)")
        return value

    @model_validator(mode="after")
    def _limits_agree(self) -> Settings:
        if self.generation.frames > self.limits.max_frames:
            raise ValueError(
                f"generation.frames ({self.generation.frames}) is above limits.max_frames ({self.limits.max_frames})"
            )
        return self

    @model_validator(mode="after")
    def _ltx2_tiles(self) -> Settings:
        # LTX-2 is always enabled, and ltx-core refuses a temporal overlap as large as the tile.
        t = self.vae_tiling
        if t.temporal_overlap_frames >= t.temporal_frames:
            raise ValueError(
                f"vae_tiling.temporal_overlap_frames ({t.temporal_overlap_frames}) must be smaller than "
                f"vae_tiling.temporal_frames ({t.temporal_frames})"
            )
        return self

    @model_validator(mode="after")
    def _families_enabled(self) -> Settings:
        used = {"generation.family": self.generation.family} | {
            f"generation.guild_families.{guild}": family for guild, family in self.generation.guild_families.items()
        }
        for key, family in used.items():
            if family == "ltxv" and not self.ltxv.enabled:
                raise ValueError(f"{key} is ltxv, but ltxv.enabled is false (set it true to use LTX-Video)")
        return self

    def enabled_families(self) -> list[ModelFamily]:
        return ["ltx2", "ltxv"] if self.ltxv.enabled else ["ltx2"]

    def family_for(self, guild_id: int | None) -> ModelFamily:
        """The default model family of a guild (or of DMs and the local CLI when None)."""
        if guild_id is not None and guild_id in self.generation.guild_families:
            return self.generation.guild_families[guild_id]
        return self.generation.family

    def draft_for(self, guild_id: int | None) -> bool:
        """Whether /animate makes a draft when the user does not say (the guild's default, else the bot's)."""
        if guild_id is not None and guild_id in self.generation.guild_drafts:
            return self.generation.guild_drafts[guild_id]
        return self.generation.draft

    def interpreter(self, family: ModelFamily) -> str:
        """The generator's Python for this family, absolute (the generator runs in the job's folder).

        Not ``resolve()``d: a virtualenv's python is a symlink, and following it leaves the venv.
        """
        path = self.ltxv.python if family == "ltxv" else self.generator.python
        return str(path.expanduser().absolute()) if path is not None else sys.executable

    def default_pipeline(self, family: ModelFamily) -> PipelineKind:
        return self.ltxv.pipeline if family == "ltxv" else self.generation.pipeline

    def pixel_budget(self, family: ModelFamily) -> int:
        """The size budget for a size derived from the image's aspect."""
        return self.ltxv.pixel_budget if family == "ltxv" else self.generation.pixel_budget

    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_path / 'ltxbot.db'}"

    def files_through_database(self) -> bool:
        if self.share_files == "auto":
            return self.db_url.startswith("postgresql")
        return self.share_files == "database"

    @property
    def uploads_dir(self) -> Path:
        return self.data_path / "uploads"

    @property
    def jobs_dir(self) -> Path:
        return self.data_path / "jobs"

    @property
    def embedding_cache_dir(self) -> Path:
        return self.data_path / "cache" / "embeddings"

    @property
    def compile_cache_dir(self) -> Path:
        return self.data_path / "cache" / "compile"

    @property
    def prepared_dir(self) -> Path:
        return self.data_path / "prepared"

    def discord_token(self) -> str:
        """The bot token, from the environment or the token file; never from the YAML."""
        token = os.environ.get("DISCORD_TOKEN", "").strip()
        if not token and self.token_file is not None:
            try:
                token = self.token_file.expanduser().read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"token_file could not be read ({exc.strerror}).") from None
        if not token:
            raise ConfigError(TOKEN_HELP)
        return token


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        reason = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {reason}")
    return "\n".join(lines)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; any problem raises ConfigError naming the key and the reason."""
    yaml_path = path.expanduser() if path is not None else None
    if yaml_path is not None and not yaml_path.is_file():
        raise ConfigError(f"{yaml_path}: no such config file (copy config.example.yaml to start).")

    class _FromFile(Settings):
        _yaml_path: ClassVar[Path | None] = yaml_path

    try:
        settings: Settings = _FromFile(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(yaml_path or "environment"))) from None
    except Exception as exc:  # YAML syntax errors come from PyYAML with their own line numbers.
        raise ConfigError(f"{yaml_path}: could not be read: {exc}") from None
    return settings


def ensure_config_file(path: Path) -> bool:
    """Create ``path`` from the example when it is absent; True when it was created."""
    if path.exists():
        return False
    shutil.copyfile(EXAMPLE_CONFIG, path)
    return True

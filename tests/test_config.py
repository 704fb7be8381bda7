from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from bot.config import EXAMPLE_CONFIG, ConfigError, load_settings
from generator.protocol import JobSpec, ModelFiles, Tiling


def test_example_config_loads_with_documented_defaults() -> None:
    settings = load_settings(EXAMPLE_CONFIG)
    assert settings.generation.pipeline == "two_stage"
    assert settings.db_url.endswith("/data/ltxbot.db")
    assert settings.db_url.startswith("sqlite+aiosqlite:///")
    assert settings.generation.presets["landscape"].width == 1024


def test_every_key_of_the_example_has_a_comment() -> None:
    for line in EXAMPLE_CONFIG.read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            if stripped.split(":")[0] in {"landscape", "portrait", "square", "landscape-small", "portrait-small",
                                          "square-small", "landscape-wide", "landscape-hd"}:
                continue
            assert "#" in line, f"no comment on: {line}"


@pytest.mark.parametrize(
    ("yaml_text", "key", "reason"),
    [
        ("limits:\n  daily_quota: -1\n", "limits.daily_quota", "greater than or equal to 0"),
        ("generation:\n  frames: 100\n", "generation", "8k+1"),
        ("generation:\n  pipeline: turbo\n", "generation.pipeline", "two_stage"),
        ("vae_tiling:\n  spatial_px: 100\n", "vae_tiling", "multiples of 32"),
        ("limits:\n  max_frames: lots\n", "limits.max_frames", "integer"),
        ("discord:\n  tokn: abc\n", "discord.tokn", "Extra inputs"),
        ("database_url: mysql://x\n", "database_url", "sqlite+aiosqlite"),
        ("generation:\n  frames: 257\nlimits:\n  max_frames: 97\n", "max_frames", "above"),
        ("generator:\n  device: cpu\n  quantization: fp8_scaled_mm\n", "generator.quantization", "8.9"),
        ("generator:\n  fp8_cast: false\n  quantization: fp8_cast\n", "generator.fp8_cast", "bf16"),
        ("generator:\n  quantization: int4\n", "generator.quantization", "fp8_scaled_mm"),
        ("generator:\n  cuda_graphs: true\n", "generator.cuda_graphs", "compile_blocks: true"),
        ("generator:\n  device: cpu\n  compile_blocks: true\n  cuda_graphs: true\n", "generator.cuda_graphs",
         "NVIDIA GPU"),
    ],
)
def test_bad_values_name_the_key_and_the_reason(tmp_path: Path, yaml_text: str, key: str, reason: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert key in message
    assert reason in message


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("limits:\n  daily_quota: 5\n")
    monkeypatch.setenv("LTXBOT_LIMITS__DAILY_QUOTA", "7")
    assert load_settings(path).limits.daily_quota == 7


def test_token_never_comes_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("token: abc\n")
    with pytest.raises(ConfigError, match="token"):
        load_settings(path)
    monkeypatch.delenv("DISCORD_TOKEN", raising=False)
    settings = load_settings(None, data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        settings.discord_token()
    token_file = tmp_path / "token"
    token_file.write_text("secret-token\n")
    assert load_settings(None, token_file=str(token_file)).discord_token() == "secret-token"


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_settings(tmp_path / "nope.yaml")


def test_ltxv_as_a_default_needs_the_family_enabled(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"generation.guild_families.5 is ltxv, but ltxv.enabled is false"):
        load_settings(None, generation={"guild_families": {5: "ltxv"}})
    settings = load_settings(None, ltxv={"enabled": True}, generation={"family": "ltxv"})
    assert settings.family_for(None) == "ltxv" and settings.enabled_families() == ["ltx2", "ltxv"]


def test_interpreters_are_absolute_and_keep_the_venv_symlink(tmp_path: Path) -> None:
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    settings = load_settings(None, ltxv={"enabled": True, "python": str(venv_python)})
    assert settings.interpreter("ltxv") == str(venv_python)  # not the symlink's target
    assert Path(load_settings(None).interpreter("ltxv")).is_absolute()
    assert load_settings(None).interpreter("ltx2") == sys.executable


def test_the_config_uses_the_contracts_models_so_the_spec_refuses_what_ltx_core_would() -> None:
    settings = load_settings(None, vae_tiling={"spatial_px": 256}, models={"checkpoint": "m/dev.safetensors"})
    assert isinstance(settings.vae_tiling, Tiling) and isinstance(settings.models, ModelFiles)
    for bad in ({"spatial_px": 96, "spatial_overlap_px": 48}, {"temporal_frames": 20}, {"spatial_px": 32}):
        with pytest.raises(ValidationError):
            Tiling(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="multiples of 8"):
        JobSpec.model_validate({"request": {"prompt": "p", "width": 64, "height": 64, "frames": 9, "seed": 1},
                                "image_path": "i.png", "output_path": "o.mp4", "tiling": {"temporal_frames": 20}})


def test_a_temporal_overlap_as_large_as_the_tile_is_refused_for_ltx2_but_not_in_ltxv_specs() -> None:
    """ltx-core refuses it deep in a render; LTX-Video reads the same number as window context."""
    from bot.config import Settings
    from generator.protocol import GenerationRequest

    with pytest.raises(ValidationError, match=r"vae_tiling\.temporal_overlap_frames"):
        Settings.model_validate({"vae_tiling": {"temporal_frames": 16, "temporal_overlap_frames": 16}})
    wide = Tiling(temporal_frames=16, temporal_overlap_frames=48)
    request = {"prompt": "p", "width": 64, "height": 64, "frames": 9, "fps": 24, "steps": 2, "seed": 1}
    spec = {"image_path": "/x.png", "output_path": "/y.mp4", "tiling": wide}
    JobSpec(request=GenerationRequest(**request, family="ltxv", pipeline="distilled", audio=False), **spec)
    with pytest.raises(ValidationError, match="smaller than temporal_frames"):
        JobSpec(request=GenerationRequest(**request, family="ltx2", pipeline="two_stage"), **spec)

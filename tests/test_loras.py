"""LoRAs at the boundary: the owner's list in the config, refused with the config key named."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.config import ConfigError, Settings
from bot.db.models import Job
from bot.intake import IntakeError
from bot.intake.request import build_request
from bot.worker import build_spec


def fake_safetensors(path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A header-only safetensors file: enough for the checks, which read only the header."""
    header = json.dumps({"__metadata__": metadata or {}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


@pytest.fixture
def lora_settings(tmp_path: Path, make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def factory(fits: str = "2.3", exists: bool = True) -> Settings:
        path = tmp_path / "dolly.safetensors"
        if exists:
            fake_safetensors(path)
        return make_settings(loras={"dolly-in": {"file": str(path), "strength": 0.7, "fits": fits,
                                                 "description": "camera moves in"}})
    return factory


def _request(settings: Settings, **options: Any) -> Any:
    return build_request(settings, prompt="waves", width=128, height=128, frames=9, **options)


def test_a_listed_lora_takes_the_owners_strength_or_the_users(lora_settings: Callable[..., Settings]) -> None:
    settings = lora_settings()
    assert [(c.name, c.strength) for c in _request(settings, lora="dolly-in").loras] == [("dolly-in", 0.7)]
    chosen = _request(settings, lora="dolly-in", lora_strength=1.5).loras
    assert [(c.name, c.strength) for c in chosen] == [("dolly-in", 1.5)]


def test_an_unknown_lora_is_refused_listing_the_names(lora_settings: Callable[..., Settings]) -> None:
    with pytest.raises(IntakeError, match=r"lora must be one of: dolly-in; got 'zoom'"):
        _request(lora_settings(), lora="zoom")


def test_a_missing_lora_file_is_refused_naming_the_config_key(lora_settings: Callable[..., Settings]) -> None:
    with pytest.raises(IntakeError, match=r"loras\.dolly-in\.file \(dolly\.safetensors\) was not found"):
        _request(lora_settings(exists=False), lora="dolly-in")


def test_a_lora_for_another_checkpoint_version_is_refused_naming_both_keys(
    lora_settings: Callable[..., Settings],
) -> None:
    # The tiny checkpoint is version 2.3.0: a LoRA made for 2.0 does not fit it.
    with pytest.raises(IntakeError, match=r"loras\.dolly-in\.fits is 2\.0, models\.checkpoint is version 2\.3\.0"):
        _request(lora_settings(fits="2.0"), lora="dolly-in")
    assert _request(lora_settings(fits="2"), lora="dolly-in").loras  # "2" fits every LTX-2


def test_a_strength_without_a_lora_or_out_of_range_is_refused(lora_settings: Callable[..., Settings]) -> None:
    settings = lora_settings()
    with pytest.raises(IntakeError, match="lora_strength needs lora"):
        _request(settings, lora_strength=0.5)
    with pytest.raises(IntakeError, match=r"loras\.0\.strength must be"):
        _request(settings, lora="dolly-in", lora_strength=3.0)


def test_a_bad_lora_name_in_the_config_is_refused_naming_it(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match=r"loras: 'dolly in' is not a usable LoRA name"):
        make_settings(loras={"dolly in": {"file": "x.safetensors", "fits": "2.3"}})


def test_the_worker_resolves_the_lora_to_its_file_and_fails_clearly_once_it_is_unlisted(
    tmp_path: Path, lora_settings: Callable[..., Settings], make_settings: Callable[..., Settings]
) -> None:
    settings = lora_settings()
    request = _request(settings, lora="dolly-in", lora_strength=0.9)
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    image = settings.uploads_dir / "in.png"
    image.write_bytes(b"")
    job = Job(id=1, params=request.model_dump(mode="json"), input_path=str(image), max_bytes=None)
    spec = build_spec(settings, job)
    assert [(f.name, f.path, f.strength) for f in spec.loras] == [
        ("dolly-in", (tmp_path / "dolly.safetensors").absolute(), 0.9)]
    with pytest.raises(ValueError, match="no longer listed under loras"):
        build_spec(make_settings(), job)

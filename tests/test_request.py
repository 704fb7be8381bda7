"""The request model: property-based checks that accepted requests obey the model and rejections explain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.config import Settings, load_settings
from bot.intake import IntakeError
from bot.intake.request import build_request, frames_for_seconds, size_for_aspect
from generator.protocol import MAX_FRAMES, MIN_FRAMES, size_multiple

SETTINGS: Settings = load_settings(None, limits={"max_frames": 257})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.text(max_size=1200),
    width=st.integers(-10, 5000),
    height=st.integers(-10, 5000),
    frames=st.integers(-5, 600),
    seed=st.one_of(st.none(), st.integers(-5, 2**33)),
    pipeline=st.sampled_from(["two_stage", "distilled", "one_stage"]),
)
def test_accepted_requests_obey_the_model_and_rejections_explain(
    prompt: str, width: int, height: int, frames: int, seed: int | None, pipeline: str
) -> None:
    try:
        request = build_request(SETTINGS, prompt=prompt, width=width, height=height, frames=frames, seed=seed,
                                pipeline=pipeline)  # type: ignore[arg-type]
    except IntakeError as exc:
        assert exc.code == "invalid_request"
        assert len(exc.message) > 10 and exc.message.endswith(".")
        return
    multiple = size_multiple(request.pipeline)
    assert request.width % multiple == 0 and request.height % multiple == 0
    assert (request.frames - 1) % 8 == 0 and MIN_FRAMES <= request.frames <= min(257, MAX_FRAMES)
    assert 0 < len(request.prompt) <= SETTINGS.limits.max_prompt_chars
    assert all(ch.isprintable() for ch in request.prompt)
    assert 0 <= request.seed < 2**32


@given(w=st.integers(64, 8000), h=st.integers(64, 8000), budget=st.integers(64 * 64 * 4, 2048 * 1536))
def test_derived_size_stays_on_grid_and_within_budget(w: int, h: int, budget: int) -> None:
    width, height = size_for_aspect(w, h, budget, 64)
    assert width % 64 == 0 and height % 64 == 0
    assert width * height <= max(budget, 64 * 64)


@pytest.mark.parametrize(("field", "kwargs", "words"), [
    ("frames", {"frames": 100}, ["rames", "97", "105"]),
    ("width", {"width": 770, "height": 512}, ["idth", "multiple of 64", "768"]),
    ("prompt", {"prompt": "  \x00\x07 "}, ["prompt is empty"]),
    ("frames", {"frames": 1000}, ["frames", "9 and 481"]),
])
def test_messages_name_the_field_and_allowed_values(field: str, kwargs: dict[str, object], words: list[str]) -> None:
    args: dict[str, object] = {"prompt": "waves roll in"} | kwargs
    with pytest.raises(IntakeError) as info:
        build_request(SETTINGS, **args)  # type: ignore[arg-type]
    for word in words:
        assert word in info.value.message


def test_seconds_become_valid_frames() -> None:
    assert frames_for_seconds(4, 24) == 97
    assert all((frames_for_seconds(s / 2, 24) - 1) % 8 == 0 for s in range(1, 40))


def test_default_size_follows_the_image_aspect(make_settings: Callable[..., Settings]) -> None:
    portrait = build_request(SETTINGS, prompt="x", source_size=(3000, 4000))
    assert portrait.height > portrait.width
    assert portrait.width * portrait.height <= SETTINGS.generation.pixel_budget


LTXV_SETTINGS: Settings = load_settings(
    None, ltxv={"enabled": True}, generation={"guild_families": {42: "ltxv"}},
)


def test_ltxv_requests_take_that_familys_defaults() -> None:
    request = build_request(LTXV_SETTINGS, prompt="waves", source_size=(1600, 900), family="ltxv")
    assert request.family == "ltxv" and request.pipeline == "distilled" and request.audio is False
    assert request.width % 32 == 0 and request.height % 32 == 0
    assert request.width * request.height <= LTXV_SETTINGS.ltxv.pixel_budget
    ltx2 = build_request(LTXV_SETTINGS, prompt="waves", source_size=(1600, 900))
    assert ltx2.family == "ltx2" and ltx2.pipeline == "two_stage" and ltx2.audio is True


def test_the_guild_default_family_applies_and_a_choice_overrides_it() -> None:
    assert build_request(LTXV_SETTINGS, prompt="waves", guild_id=42).family == "ltxv"
    assert build_request(LTXV_SETTINGS, prompt="waves", guild_id=7).family == "ltx2"
    assert build_request(LTXV_SETTINGS, prompt="waves", guild_id=42, family="ltx2").family == "ltx2"


def test_ltxv_sizes_need_32_and_sound_is_refused_kindly() -> None:
    assert build_request(LTXV_SETTINGS, prompt="waves", width=800, height=480, family="ltxv").width == 800
    with pytest.raises(IntakeError, match="multiple of 32 for LTX-Video"):
        build_request(LTXV_SETTINGS, prompt="waves", width=810, height=480, family="ltxv")
    with pytest.raises(IntakeError, match="silent clips"):
        build_request(LTXV_SETTINGS, prompt="waves", family="ltxv", audio=True)


def test_a_family_that_is_not_enabled_is_refused_with_the_alternatives() -> None:
    with pytest.raises(IntakeError, match="LTX-Video model is not set up on this bot; choose LTX-2"):
        build_request(SETTINGS, prompt="waves", family="ltxv")

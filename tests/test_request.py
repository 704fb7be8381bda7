"""The request model: property-based checks that accepted requests obey the model and rejections explain."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bot.config import Settings, load_settings
from bot.db.models import JobStatus
from bot.db.store import JobStore, NewJob
from bot.intake import IntakeError
from bot.intake.image import normalise_image
from bot.intake.request import build_request, frames_for_seconds, size_for_aspect
from bot.worker import Worker
from generator.protocol import MAX_FRAMES, MIN_FRAMES, GenerationRequest, size_multiple
from tests.conftest import image_bytes

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


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"width": 512}, ["width needs height"]),
    ({"height": 512}, ["height needs width"]),
    ({"preset": "square", "width": 512, "height": 512}, ["size (square)", "width and height (512×512)"]),
])
def test_a_size_asked_half_way_or_twice_is_refused_naming_both_fields(
    kwargs: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(IntakeError) as info:
        build_request(SETTINGS, prompt="waves", source_size=(4, 3), **kwargs)  # type: ignore[arg-type]
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


def test_the_owners_prompt_limit_is_checked_at_intake_and_the_contract_keeps_only_its_maximum() -> None:
    roomy = load_settings(None, limits={"max_prompt_chars": 2000})
    assert len(build_request(roomy, prompt="w" * 1999).prompt) == 1999
    with pytest.raises(IntakeError, match="prompt is 2001 characters; the limit on this server is 2000"):
        build_request(roomy, prompt="w" * 2001)
    with pytest.raises(IntakeError, match="frames must be at most 257 on this server; got 265"):
        build_request(SETTINGS, prompt="waves", frames=265)
    # What intake accepted stays valid where the worker and the generator read it back, without the limits.
    request = build_request(roomy, prompt="w" * 1999)
    assert GenerationRequest.model_validate(request.model_dump(mode="json")) == request
    with pytest.raises(ValidationError, match="limit is 4000"):
        GenerationRequest.model_validate(request.model_dump(mode="json") | {"prompt": "w" * 4001})


@pytest.mark.slow
async def test_a_long_prompt_within_the_owners_limit_is_queued_and_renders(
    make_settings: Callable[..., Settings], store: JobStore
) -> None:
    """A 1,499-character prompt under a limit of 2000 renders, instead of failing ``invalid`` in the worker."""
    settings = make_settings(limits={"max_prompt_chars": 2000})
    prompt = ("waves " * 300)[:1499]
    request = build_request(settings, prompt=prompt, width=128, height=128)
    image = normalise_image(image_bytes(), lambda w, h: (128, 128), settings.uploads_dir, max_pixels=10**7)
    job = await store.create(NewJob(user_id="u", prompt=request.prompt, params=request.model_dump(mode="json"),
                                    input_path=str(image.path), input_sha256=image.sha256))
    worker = Worker(settings, store)
    try:
        done = await worker.step()
    finally:
        await worker.close()
    assert done is not None and done.id == job.id
    assert (done.status, done.error_code) == (JobStatus.SUCCEEDED, None), done.error_message
    assert len(done.prompt) == 1499


@pytest.mark.parametrize("mode", ["extend", "retake", "lipsync"])
def test_only_an_animate_clip_is_ever_a_draft(mode: str) -> None:
    from bot.drafts import draftable

    # A server that drafts by default renders these whole (the draft's finalize could not rebuild them).
    assert draftable(GenerationRequest.model_construct(family="ltx2", pipeline="two_stage", mode="animate"))
    assert not draftable(GenerationRequest.model_construct(family="ltx2", pipeline="two_stage", mode=mode))

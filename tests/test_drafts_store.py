"""The bot's draft rules and records: which requests get a draft, how long a draft is kept, purges."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from bot import drafts
from bot.config import Settings
from bot.db.models import DraftStep, JobStatus
from bot.db.store import JobStore, NewJob, utcnow
from bot.worker import build_spec, draft_state_path
from generator.protocol import GenerationRequest


@pytest.fixture(params=["sqlite", "postgresql"])
def db_backend(request: pytest.FixtureRequest) -> str:
    backend: str = request.param
    return backend


def _request(**change: Any) -> GenerationRequest:
    return GenerationRequest.model_validate({"prompt": "waves", "width": 128, "height": 128, "frames": 9, "seed": 1,
                                             "audio": False} | change)


def _new(**extra: Any) -> NewJob:
    return NewJob(user_id="u1", prompt="waves", params=_request().model_dump(mode="json"), input_path="/x.png",
                  input_sha256="0" * 64, **extra)


async def _finished_draft(store: JobStore, kept_until: Any) -> int:
    job = await store.create(_new(draft=DraftStep.DRAFT))
    claimed = await store.claim_next()
    assert claimed is not None
    assert await store.finish(job.id, 1, output_path="/c.mp4", output_bytes=1, phases=[], draft_kept_until=kept_until)
    return job.id


async def test_a_drafts_keeping_time_is_recorded_and_swept(store: JobStore, make_settings: Any) -> None:
    settings: Settings = make_settings()
    now = utcnow()
    old = await _finished_draft(store, now - timedelta(minutes=1))
    young = await _finished_draft(store, now + timedelta(hours=1))
    # A whole clip keeps nothing, whatever the worker passes.
    plain = await store.create(_new())
    assert await store.claim_next() is not None
    assert await store.finish(plain.id, 1, output_path="/c.mp4", output_bytes=1, phases=[],
                              draft_kept_until=now + timedelta(hours=1))
    assert await store.kept_drafts() == [old, young]
    for job_id in (old, young):
        draft_state_path(settings, job_id).parent.mkdir(parents=True)
        draft_state_path(settings, job_id).write_bytes(b"kept")
    assert await drafts.sweep(settings, store, now) == 1
    assert not draft_state_path(settings, old).exists() and draft_state_path(settings, young).is_file()
    assert await store.kept_drafts() == [young]
    assert (await store.get(old)).draft_kept_until is None  # type: ignore[union-attr]


async def test_finalize_of_finds_a_live_finalize_but_not_a_failed_one(store: JobStore) -> None:
    draft = await _finished_draft(store, utcnow() + timedelta(hours=1))
    assert await store.finalize_of(draft) is None
    first = await store.create(_new(draft=DraftStep.FINALIZE, draft_of=draft))
    assert (await store.finalize_of(draft)).id == first.id  # type: ignore[union-attr]
    assert await store.claim_next() is not None
    await store.fail(first.id, 1, code="oom", message="x", retry=False, max_attempts=1)  # type: ignore[arg-type]
    assert (await store.get(first.id)).status == JobStatus.FAILED  # type: ignore[union-attr]
    assert await store.finalize_of(draft) is None


async def test_purging_a_user_forgets_their_drafts(store: JobStore) -> None:
    draft = await _finished_draft(store, utcnow() + timedelta(hours=1))
    await store.purge_user("u1")
    assert await store.kept_drafts() == [] and (await store.get(draft)).draft_kept_until is None  # type: ignore[union-attr]


def test_draft_step_follows_the_option_then_the_servers_default(make_settings: Any) -> None:
    settings: Settings = make_settings(generation={"draft": False, "guild_drafts": {7: True}})
    two_stage, one_stage = _request(), _request(pipeline="one_stage")
    assert drafts.draft_step(settings, two_stage, None, None) is None
    assert drafts.draft_step(settings, two_stage, None, 7) == DraftStep.DRAFT
    assert drafts.draft_step(settings, one_stage, None, 7) is None  # a default applies only where it can
    assert drafts.draft_step(settings, two_stage, False, 7) is None
    assert drafts.draft_step(settings, _request(pipeline="distilled"), True, None) == DraftStep.DRAFT
    with pytest.raises(ValueError, match="draft: only LTX-2 clips with a two-stage pipeline"):
        drafts.draft_step(settings, one_stage, True, None)


async def test_the_spec_of_a_finalize_points_at_its_drafts_state(store: JobStore, make_settings: Any) -> None:
    settings: Settings = make_settings(generator={"preview_interval_seconds": 3})
    image = settings.uploads_dir / "x.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"png")
    draft = await store.create(NewJob(user_id="u1", prompt="waves", params=_request().model_dump(mode="json"),
                                      input_path=str(image), input_sha256="0" * 64, draft=DraftStep.DRAFT))
    spec = build_spec(settings, draft)
    assert spec.draft == "draft" and spec.draft_state == draft_state_path(settings, draft.id).absolute()
    assert spec.preview_every_seconds == 3 and spec.preview_dir is not None
    final = await store.create(NewJob(user_id="u1", prompt="waves", params=draft.params, input_path=str(image),
                                      input_sha256="0" * 64, draft=DraftStep.FINALIZE, draft_of=draft.id))
    with pytest.raises(ValueError, match=f"the draft it finalizes \\(job {draft.id}\\) has been deleted"):
        build_spec(settings, final)
    draft_state_path(settings, draft.id).parent.mkdir(parents=True)
    draft_state_path(settings, draft.id).write_bytes(b"kept")
    spec = build_spec(settings, final)
    assert spec.draft == "finalize" and spec.draft_state == draft_state_path(settings, draft.id).absolute()
    assert spec.preview_every_seconds == 0  # a finalize has no stage 1 to show
    assert Path(spec.output_path).parent.name == str(final.id)

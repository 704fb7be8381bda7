"""Drafts and previews end to end: the real bot process and discord.py client, the real generator
on the tiny checkpoints (CPU), the loopback fake Discord, a real SQLite file."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.db.models import JobStatus
from tests.conftest import image_bytes
from tests.support.discord_harness import ADMIN, ALICE, BOB, Harness, decode_mp4
from tests.support.fake_discord import FakeDiscord, custom_ids

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
async def make_harness(tmp_path: Path, tiny_models: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[Harness, FakeDiscord]] = []

    async def factory(env: dict[str, str] | None = None, **overrides: Any) -> Harness:
        fake = FakeDiscord()
        await fake.start()
        root = tmp_path / f"bot{len(started)}"
        root.mkdir()
        harness = Harness(fake, root, tiny_models, env=env, **overrides)
        started.append((harness, fake))
        await harness.start_bot()
        return harness

    yield factory
    for harness, fake in started:
        await harness.close()
        await fake.stop()


def _phase_names(job: Any) -> list[str]:
    return [p["name"] for p in job.phases or []]


async def test_a_draft_is_finalized_into_the_full_clip_even_after_a_restart(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    asked = await fake.slash(ALICE, "animate", {"prompt": "waves roll in", "draft": True},
                             attachment=fake.attachment(image_bytes(size=(320, 240)), "photo.png"))
    assert "Job 1 is queued" in await h.answer_text(asked) and "the draft" in await h.answer_text(asked)
    draft_post = (await h.wait_clip_post())[0]
    # The draft: stage 1's half-size clip, with Finalize and Rerun.
    assert decode_mp4(draft_post.files[0].data) == (9, 32, 32)
    assert custom_ids(draft_post.json) == ["ltxbot:finalize:1", "ltxbot:rerun:1"]
    assert "draft" in draft_post.json["content"]
    draft = await h.wait_job(1, lambda j: j.posted_message_id is not None)
    assert draft.status == JobStatus.SUCCEEDED and draft.draft == "draft" and draft.draft_kept_until is not None
    assert "stage_2" not in _phase_names(draft) and "stage_1" in _phase_names(draft)
    assert (h.data_dir / "jobs" / "1" / "draft.pt").is_file()

    # Somebody else cannot finalize Alice's draft.
    stranger = await fake.click(BOB, fake.messages[draft_post.message_id], "ltxbot:finalize:1")
    assert "You have no job 1" in await h.answer_text(stranger)
    assert len(await h.jobs()) == 1

    # A restart between the draft and its finalize: the button and the kept latents still work.
    await h.stop_bot()
    await h.start_bot()
    pressed = await fake.click(ALICE, fake.messages[draft_post.message_id], "ltxbot:finalize:1")
    assert "Job 2 is queued" in await h.answer_text(pressed) and "the full clip" in await h.answer_text(pressed)
    final_post = (await h.wait_clip_post(2))[1]
    assert decode_mp4(final_post.files[0].data) == (9, 64, 64)
    # Posted as a reply to the draft, mentioning Alice, with the buttons of a finished clip.
    assert str(final_post.json["message_reference"]["message_id"]) == draft_post.message_id
    assert f"<@{ALICE.id}>" in final_post.json["content"] and "finalized from job 1" in final_post.json["content"]
    assert custom_ids(final_post.json) == ["ltxbot:rerun:2", "ltxbot:tweak:2", "ltxbot:extend:2", "ltxbot:retake:2"]
    final = await h.wait_job(2, lambda j: j.posted_message_id is not None)
    assert final.draft == "finalize" and final.draft_of == 1 and final.params == draft.params
    phases = _phase_names(final)
    assert "text_encode" not in phases and "stage_1" not in phases and phases[:3] == ["load_draft", "upsample",
                                                                                        "stage_2"]
    # A second press does not render it again.
    again = await fake.click(ALICE, fake.messages[draft_post.message_id], "ltxbot:finalize:1")
    assert "already finalized as job 2" in await h.answer_text(again)
    assert len(await h.jobs()) == 2


async def test_purged_draft_latents_make_finalize_say_so(make_harness: Callable[..., Any]) -> None:
    """The server's default makes the draft (no option given); an admin purges the kept drafts."""
    h: Harness = await make_harness(generation={"draft": True})
    fake = h.fake
    await h.answer_text(await fake.slash(ALICE, "animate", {"prompt": "waves roll in"},
                                         attachment=fake.attachment(image_bytes(), "photo.png")))
    draft_post = (await h.wait_clip_post())[0]
    assert custom_ids(draft_post.json)[0] == "ltxbot:finalize:1"
    await h.wait_job(1, lambda j: j.posted_message_id is not None)
    kept = h.data_dir / "jobs" / "1" / "draft.pt"
    assert kept.is_file()

    purge = await fake.slash(ADMIN, "purge", {"drafts": True}, group="admin")
    assert "kept latents of 1 drafts" in await h.answer_text(purge)
    assert not kept.exists() and (await h.job(1)).draft_kept_until is None
    pressed = await fake.click(ALICE, fake.messages[draft_post.message_id], "ltxbot:finalize:1")
    text = await h.answer_text(pressed)
    assert "can't be finalized any more" in text and "Rerun" in text
    assert fake.is_ephemeral(pressed) and len(await h.jobs()) == 1


async def test_the_card_shows_stage_1_previews_no_faster_than_its_interval(make_harness: Callable[..., Any]) -> None:
    interval = 0.5  # the harness's discord.progress_interval_seconds
    h: Harness = await make_harness(generation={"steps": 6}, generator={"preview_interval_seconds": 0.01})
    fake = h.fake
    await h.answer_text(await fake.slash(ALICE, "animate", {"prompt": "waves roll in"},
                                         attachment=fake.attachment(image_bytes(), "photo.png")))
    await h.wait_clip_post()
    card = h.card_for(1)
    await fake.wait_for(lambda: h.card_titles(card["id"])[-1] == "Job 1 · done", timeout=15)
    edits = [r for r in fake.find("PATCH", rf"/messages/{card['id']}$") if r.status == 200]
    with_image = [r for r in edits if r.files]
    assert with_image, "no card edit carried a preview"
    for edit in with_image:
        assert [f.filename for f in edit.files] == ["preview.png"] and edit.files[0].data[:8] == b"\x89PNG\r\n\x1a\n"
        assert edit.json["embeds"][0]["thumbnail"]["url"] == "attachment://preview.png"
    stages = [field["value"] for r in with_image for field in r.json["embeds"][0]["fields"]
              if field["name"] == "Stage"]
    assert any(stage.startswith("generating") for stage in stages), stages
    # Coalesced like the progress edits: never two edits of the card within the interval.
    gaps = [b.at - a.at for a, b in itertools.pairwise(edits)]
    assert min(gaps) >= interval * 0.9, gaps
    # The finished card drops the preview.
    assert edits[-1].json.get("attachments") == [] and "thumbnail" not in edits[-1].json["embeds"][0]
    assert fake.messages[card["id"]]["attachments"] == []

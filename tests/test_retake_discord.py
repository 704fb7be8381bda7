"""Retake end to end: the real bot and discord.py client, the real generator on the tiny checkpoint
(CPU), against the loopback fake Discord."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import image_bytes
from tests.support.discord_harness import ADMIN, ALICE, BOB, Harness, decode_mp4
from tests.support.fake_discord import custom_ids
from tests.test_discord_e2e import make_harness  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(600)


def _text_inputs(modal: dict[str, Any]) -> dict[str, dict[str, Any]]:
    inputs = {}
    for row in modal["components"]:
        for comp in row.get("components") or [row.get("component")]:
            if comp and comp.get("type") == 4:
                inputs[comp["label"]] = comp
    return inputs


async def test_retake_under_a_delivered_clip_posts_a_retaken_clip_only_for_its_owner(
    make_harness: Callable[..., Any],  # noqa: F811
) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    animate = await fake.slash(ALICE, "animate", {"prompt": "a kite rises"},
                               attachment=fake.attachment(image_bytes(size=(320, 240)), "photo.png"))
    assert "Job 1 is queued" in await h.answer_text(animate)
    clip = (await h.wait_clip_post(timeout=300))[0]
    assert "ltxbot:retake:1" in custom_ids(clip.json)
    delivered = fake.messages[clip.message_id]

    # Bob cannot retake Alice's clip: no form, a private refusal, no job.
    stranger = await fake.click(BOB, delivered, "ltxbot:retake:1")
    assert "You have no job 1" in await h.answer_text(stranger)
    assert not fake.modals(stranger)

    # A region past the end of the 9-frame clip (0.375 s) is refused, naming the field; nothing is queued.
    opened = await fake.click(ALICE, delivered, "ltxbot:retake:1")
    modal = (await fake.wait_for(lambda: fake.modals(opened), timeout=15))[0]
    inputs = _text_inputs(modal)
    assert list(inputs) == ["Start second", "End second", "Prompt"]
    assert inputs["Prompt"]["value"] == "a kite rises"  # the source job's prompt, to edit
    outside = await fake.submit_modal(ALICE, modal, {"Start second": "0.1", "End second": "5",
                                                     "Prompt": "the kite spins"})
    assert "End second must be at most 0.38" in await h.answer_text(outside)
    opened = await fake.click(ALICE, delivered, "ltxbot:retake:1")
    modal = (await fake.wait_for(lambda: fake.modals(opened), timeout=15))[0]
    words = await fake.submit_modal(ALICE, modal, {"Start second": "soon", "End second": "0.3",
                                                   "Prompt": "the kite spins"})
    assert "Start second must be a number of seconds" in await h.answer_text(words)
    assert [job.id for job in await h.jobs()] == [1]

    opened = await fake.click(ALICE, delivered, "ltxbot:retake:1")
    modal = (await fake.wait_for(lambda: fake.modals(opened), timeout=15))[0]
    submitted = await fake.submit_modal(ALICE, modal, {"Start second": "0.05", "End second": "0.375",
                                                       "Prompt": "the kite spins"})
    assert "Job 2 is queued" in await h.answer_text(submitted)
    posts = await h.wait_clip_post(count=2, timeout=400)
    retaken = posts[1]
    assert decode_mp4(retaken.files[0].data) == decode_mp4(clip.files[0].data) == (9, 64, 64)
    # Posted as a reply to the clip it retakes, with the buttons of any delivered clip.
    assert str(retaken.json["message_reference"]["message_id"]) == clip.message_id
    assert custom_ids(retaken.json) == ["ltxbot:rerun:2", "ltxbot:tweak:2", "ltxbot:extend:2", "ltxbot:retake:2"]
    assert "retake of job 1, 0.05–0.375 s" in retaken.json["content"]
    job = await h.job(2)
    params = job.params
    assert (params["mode"], params["source_job"], params["retake_start"], params["retake_end"]) == (
        "retake", 1, 0.05, 0.375)
    assert (params["width"], params["height"], params["frames"], params["fps"]) == (64, 64, 9, 24)
    assert params["pipeline"] == "one_stage" and job.prompt == "the kite spins" and job.user_id == ALICE.id
    assert (h.data_dir / "uploads" / params["source_video"]).is_file()

    listing = await fake.slash(ALICE, "jobs")
    await fake.wait_for(lambda: fake.callbacks(listing), timeout=30)
    assert "retake of job 1" in str(fake.callbacks(listing)[0].json["data"])
    detail = await fake.slash(ALICE, "job", {"id": 2})
    await fake.wait_for(lambda: fake.callbacks(detail), timeout=30)
    assert "retake of job 1, 0.05–0.375 s" in str(fake.callbacks(detail)[0].json["data"])


async def test_retake_survives_a_restart_is_cancellable_counts_against_the_limits_and_admins_may_press_it(
    make_harness: Callable[..., Any],  # noqa: F811
) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    animate = await fake.slash(ALICE, "animate", {"prompt": "a kite rises"},
                               attachment=fake.attachment(image_bytes(size=(320, 240)), "photo.png"))
    assert "Job 1 is queued" in await h.answer_text(animate)
    delivered = fake.messages[(await h.wait_clip_post(timeout=300))[0].message_id]
    # The button outlives the bot process: after a restart its press still opens the form (the
    # delivery is recorded first, so the new process does not post it again with a fresh view).
    await h.wait_job(1, lambda j: j.posted_message_id is not None)
    await h.stop_bot()
    await h.start_bot()
    pause = await fake.slash(ADMIN, "pause", group="admin")
    assert "paused" in await h.answer_text(pause)

    async def retake(user: Any, start: str, end: str) -> str:
        opened = await fake.click(user, delivered, "ltxbot:retake:1")
        modal = (await fake.wait_for(lambda: fake.modals(opened), timeout=15))[0]
        submitted = await fake.submit_modal(user, modal, {"Start second": start, "End second": end,
                                                          "Prompt": "the kite spins"})
        return await h.answer_text(submitted)

    # The admin may retake Alice's clip; the new job is the admin's.
    assert "Job 2 is queued" in await retake(ADMIN, "0", "0.375")
    assert (await h.job(2)).user_id == ADMIN.id
    assert "Job 3 is queued" in await retake(ALICE, "0", "0.34")
    assert "Job 4 is queued" in await retake(ALICE, "0.04", "0.375")
    # Alice now has two clips waiting, the harness's per-user limit: the button answers so, with no form.
    refused = await fake.click(ALICE, delivered, "ltxbot:retake:1")
    assert "You already have 2 clips waiting" in await h.answer_text(refused)
    assert not fake.modals(refused) and sorted(job.id for job in await h.jobs()) == [1, 2, 3, 4]
    cancel = await fake.slash(ALICE, "cancel", {"id": 4})
    assert "Job 4 is cancelled" in await h.answer_text(cancel)

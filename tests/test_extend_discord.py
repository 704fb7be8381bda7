"""Extend end to end: the real bot, discord.py client, worker and generator (tiny checkpoints, CPU) against the
loopback fake Discord. A delivered clip's Extend button opens a form prefilled with its prompt; the longer clip
is posted as a reply to it, starting with the original's frames and with sound over its whole length."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import pytest

from tests.conftest import image_bytes
from tests.support.discord_harness import ALICE, BOB, Harness
from tests.support.fake_discord import custom_ids
from tests.test_discord_e2e import make_harness  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(900)


def _decode(data: bytes) -> tuple[np.ndarray, float, float]:
    """Frames (RGB), fps and the sound's duration in seconds (0 when there is none)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    with av.open(io.BytesIO(data)) as container:
        samples, sample_rate = 0, 1
        if container.streams.audio:
            sample_rate = container.streams.audio[0].rate
            samples = sum(f.samples for f in container.decode(audio=0))
    return frames, rate, samples / sample_rate


def _modal_prompt(modal: dict[str, Any]) -> str:
    for row in modal["components"]:
        for comp in row.get("components") or [row.get("component")]:
            if comp and comp.get("type") == 4:
                return str(comp.get("value"))
    return ""


async def test_extend_posts_a_longer_clip_and_refuses_others_and_the_longest(
    make_harness: Callable[..., Any],  # noqa: F811
) -> None:
    # 9 frames a clip; each press adds 8 (17-frame segments, 9 of them overlapping); at most 18 frames.
    h: Harness = await make_harness(generation={"audio": True}, extend={"segment_seconds": 0.34, "max_seconds": 0.75})
    fake = h.fake
    asked = await fake.slash(ALICE, "animate", {"prompt": "waves roll in"},
                             attachment=fake.attachment(image_bytes(size=(320, 240)), "photo.png"))
    assert "Job 1 is queued" in await h.answer_text(asked)
    first = (await h.wait_clip_post(count=1, timeout=400))[0]
    assert "ltxbot:extend:1" in custom_ids(first.json) and first.message_id is not None
    message = fake.messages[first.message_id]

    stranger = await fake.click(BOB, message, "ltxbot:extend:1")
    assert "You have no job 1" in await h.answer_text(stranger)
    assert fake.modals(stranger) == []

    press = await fake.click(ALICE, message, "ltxbot:extend:1")
    modal = (await fake.wait_for(lambda: fake.modals(press), timeout=15))[0]
    assert _modal_prompt(modal) == "waves roll in"  # prefilled with the clip's prompt
    submitted = await fake.submit_modal(ALICE, modal, {"What happens next": "the tide goes out"})
    assert "Job 2 is queued" in await h.answer_text(submitted)
    posts = await h.wait_clip_post(count=2, timeout=600)
    longer = posts[1]
    assert longer.message_id is not None
    assert str(longer.json["message_reference"]["message_id"]) == first.message_id  # a reply to the clip
    assert "extends job 1" in longer.json["content"]

    original, fps, original_sound = _decode(first.files[0].data)
    joined, joined_fps, joined_sound = _decode(longer.files[0].data)
    # 9 frames, then the 17-frame segment less its 9 overlapping frames: exactly 17, same size and rate.
    assert original.shape == (9, 64, 64, 3)
    assert joined.shape == (17, 64, 64, 3) and joined_fps == fps == 24.0
    # Its first frames are the original's as decoded (one more H.264 pass: within a few levels).
    head = np.abs(joined[:9].astype(np.int16) - original.astype(np.int16))
    assert head.mean() < 4.0, head.mean()
    tail = np.abs(joined[9:].astype(np.int16) - original[-1:].astype(np.int16))
    assert tail.mean() > head.mean()  # and the rest is new
    # Sound over the whole clip: the model's own track is a little shorter than its frames (0.34 s for 9
    # frames here), and the joined one is as long as the segment's, which ends with the clip.
    assert original_sound > 0.3 and joined_sound > original_sound + 0.25
    assert joined_sound == pytest.approx(17 / 24, abs=0.1)

    # Its status card had a Cancel button, as every queued job's has.
    cards = [r.json for r in fake.requests if isinstance(r.json, dict) and any(
        e.get("title", "").startswith("Job 2 ") for e in r.json.get("embeds") or [])]
    assert any("ltxbot:cancel:2" in custom_ids(card) for card in cards)
    job = await h.job(2)
    assert job.params["mode"] == "extend" and job.params["source_job"] == 1 and job.params["source_frames"] == 9
    assert job.prompt == "the tide goes out" and job.params["frames"] == 17
    assert (h.data_dir / "uploads" / job.params["source_video"]).is_file()
    detail = await fake.slash(ALICE, "job", {"id": 2})
    await fake.wait_for(lambda: fake.callbacks(detail), timeout=30)
    assert "extends job 1" in str(fake.callbacks(detail)[0].json["data"])
    listing = await fake.slash(ALICE, "jobs")
    await fake.wait_for(lambda: fake.callbacks(listing), timeout=30)
    assert "extends job 1" in str(fake.callbacks(listing)[0].json["data"])

    # 17 frames now; another 8 would pass the 18-frame maximum: refused kindly, no form, no job.
    again = await fake.click(ALICE, fake.messages[longer.message_id], "ltxbot:extend:2")
    text = await h.answer_text(again)
    assert "already 0.7 s long" in text and "0.75 s" in text
    assert fake.modals(again) == []
    assert len(await h.jobs()) == 2

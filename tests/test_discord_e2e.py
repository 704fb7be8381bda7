"""End to end: the real bot process and discord.py client, the real generator subprocess on the
tiny checkpoint (CPU), against the loopback fake Discord."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.db.models import JobStatus
from tests.conftest import image_bytes
from tests.discord_harness import ADMIN, ALICE, BOB, CAROL, Harness, decode_mp4
from tests.fake_discord import FakeDiscord, custom_ids

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
async def make_harness(tmp_path: Path, tiny_models: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[Harness, FakeDiscord]] = []

    async def factory(**overrides: Any) -> Harness:
        fake = FakeDiscord()
        await fake.start()
        root = tmp_path / f"bot{len(started)}"
        root.mkdir()
        harness = Harness(fake, root, tiny_models, **overrides)
        started.append((harness, fake))
        await harness.start_bot()
        return harness

    yield factory
    for harness, fake in started:
        await harness.close()
        await fake.stop()


def _uploads(harness: Harness) -> list[Path]:
    folder = harness.data_dir / "uploads"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


async def test_animate_slash_command_delivers_the_clip(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    attachment = fake.attachment(image_bytes(size=(320, 240)), "photo.png")
    interaction = await fake.slash(ALICE, "animate", {"prompt": "waves roll in"}, attachment=attachment)
    sent_at = asyncio.get_running_loop().time()

    callbacks = await fake.wait_for(lambda: fake.callbacks(interaction), timeout=10)
    assert callbacks[0].json["type"] == 5, "the command must be deferred"
    assert callbacks[0].at - sent_at < 3.0
    assert "is queued" in await h.answer_text(interaction)

    posts = await h.wait_clip_post()
    assert len(posts) == 1
    post = posts[0]
    assert post.files[0].filename.endswith(".mp4")
    frames, width, height = decode_mp4(post.files[0].data)
    assert (frames, width, height) == (9, 64, 64)
    # A reply to the card, mentioning the requester and nobody else.
    assert f"<@{ALICE.id}>" in post.json["content"]
    assert [str(u) for u in post.json["allowed_mentions"]["users"]] == [ALICE.id]
    assert post.json["allowed_mentions"]["parse"] == []
    assert custom_ids(post.json) == [f"ltxbot:rerun:1", f"ltxbot:tweak:1"]

    job = await h.wait_job(1, lambda j: j.posted_message_url is not None)
    assert job.status == JobStatus.SUCCEEDED
    assert job.posted_message_id == post.message_id
    assert job.posted_message_url.endswith(f"/{fake.guild_id}/{fake.channel_id}/{post.message_id}")
    card = h.card_for(1)
    assert str(post.json["message_reference"]["message_id"]) == card["id"]
    titles = h.card_titles(card["id"])
    assert titles[0] == "Job 1 · queued"
    assert "Job 1 · rendering" in titles
    assert titles[-1] == "Job 1 · done"
    assert custom_ids(card) == []  # the cancel button is gone once it is done

"""End image and loop end to end: the real bot and discord.py client, the real generator on the tiny
checkpoint (CPU), against the loopback fake Discord."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import image_bytes
from tests.support.discord_harness import ALICE, BOB, Harness, decode_mp4
from tests.test_discord_e2e import make_harness  # noqa: F401 (the fixture)

pytestmark = pytest.mark.timeout(600)


def _end_png() -> bytes:
    import io

    from PIL import Image

    image = Image.new("RGB", (320, 240), (20, 200, 90))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_end_image_loop_and_the_menus_second_image_each_post_a_clip(
    make_harness: Callable[..., Any],  # noqa: F811
) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    first = fake.attachment(image_bytes(size=(320, 240)), "photo.png")
    end = fake.attachment(_end_png(), "end.png")
    ended = await fake.slash(ALICE, "animate", {"prompt": "the sun sets"}, attachment=first,
                             attachments={"end_image": end})
    assert "Job 1 is queued" in await h.answer_text(ended)
    looped = await fake.slash(ALICE, "animate", {"prompt": "waves roll in", "loop": True},
                              attachment=fake.attachment(image_bytes(size=(320, 240)), "photo.png"))
    assert "Job 2 is queued" in await h.answer_text(looped)
    posted = await fake.post_message(ALICE, "two frames", [
        fake.attachment(image_bytes(size=(320, 240)), "a.png"), fake.attachment(_end_png(), "b.png")])
    # Bob asks from the menu: Alice has the two queued jobs the harness allows a user.
    menu = await fake.context_menu(BOB, "Animate image", posted)
    modal = (await fake.wait_for(lambda: fake.modals(menu), timeout=15))[0]
    submitted = await fake.submit_modal(BOB, modal, {"Prompt": "a door opens", "Last frame (optional)": "second"})
    assert "Job 3 is queued" in await h.answer_text(submitted)

    posts = await h.wait_clip_post(count=3, timeout=500)
    for post in posts:
        assert decode_mp4(post.files[0].data) == (9, 64, 64)
    jobs = {job.id: job for job in await h.jobs()}
    assert jobs[1].params["end_image"] and not jobs[1].params["loop"]
    assert jobs[2].params["loop"] and jobs[2].params["end_image"] is None
    assert jobs[3].params["end_image"] and not jobs[3].params["loop"] and jobs[3].user_id == BOB.id
    # The stored end image is the fitted PNG beside the first image, not the upload.
    assert (h.data_dir / "uploads" / jobs[1].params["end_image"]).is_file()
    captions = {p.json["content"].rsplit("job ", 1)[1]: p.json["content"] for p in posts}
    assert "end image" in captions["1"] and "loop" in captions["2"]
    listing = await fake.slash(ALICE, "jobs")
    await fake.wait_for(lambda: fake.callbacks(listing), timeout=30)
    history = str(fake.callbacks(listing)[0].json["data"])
    assert "end image" in history and "loop" in history
    detail = await fake.slash(BOB, "job", {"id": 3})
    await fake.wait_for(lambda: fake.callbacks(detail), timeout=30)
    assert "end image" in str(fake.callbacks(detail)[0].json["data"])


async def test_end_image_with_loop_or_a_non_image_is_refused_naming_the_field(
    make_harness: Callable[..., Any],  # noqa: F811
) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    both = await fake.slash(ALICE, "animate", {"prompt": "waves", "loop": True},
                            attachment=fake.attachment(image_bytes(size=(320, 240)), "photo.png"),
                            attachments={"end_image": fake.attachment(_end_png(), "end.png")})
    assert "end_image and loop cannot go together" in await h.answer_text(both)
    text = await fake.slash(ALICE, "animate", {"prompt": "waves"},
                            attachment=fake.attachment(image_bytes(size=(320, 240)), "photo.png"),
                            attachments={"end_image": fake.attachment(b"hello", "notes.txt", "text/plain")})
    assert "end_image must be a JPEG, PNG or WebP picture" in await h.answer_text(text)
    menu_post = await fake.post_message(ALICE, "one", [fake.attachment(image_bytes(size=(320, 240)), "a.png")])
    menu = await fake.context_menu(ALICE, "Animate image", menu_post)
    modal = (await fake.wait_for(lambda: fake.modals(menu), timeout=15))[0]
    submitted = await fake.submit_modal(ALICE, modal, {"Prompt": "x", "Last frame (optional)": "second"})
    assert "only one image" in await h.answer_text(submitted)
    assert await h.jobs() == []

"""End to end: the real bot process and discord.py client, the real generator subprocess on the
tiny checkpoint (CPU), against the loopback fake Discord."""

from __future__ import annotations

import asyncio
import io
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.db.models import JobStatus
from bot.worker import process_start_ticks
from tests.conftest import image_bytes
from tests.support.discord_harness import ADMIN, ALICE, BOB, CAROL, Harness, decode_mp4
from tests.support.fake_discord import FakeDiscord, custom_ids

pytestmark = pytest.mark.timeout(600)


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


def _uploads(harness: Harness) -> list[Path]:
    folder = harness.data_dir / "uploads"
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


async def test_animate_slash_command_delivers_the_clip(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    # Commands were synced to the configured guild (instant), not globally.
    synced = fake.find("PUT", rf"^/applications/{fake.app_id}/guilds/{fake.guild_id}/commands$")
    assert synced and {c["name"] for c in synced[0].json} >= {"animate", "jobs", "job", "cancel", "queue", "admin",
                                                             "Animate image"}
    assert not fake.find("PUT", rf"^/applications/{fake.app_id}/commands$")
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
    assert custom_ids(post.json) == ["ltxbot:rerun:1", "ltxbot:tweak:1", "ltxbot:extend:1", "ltxbot:retake:1"]

    job = await h.wait_job(1, lambda j: j.posted_message_url is not None)
    assert job.status == JobStatus.SUCCEEDED
    assert job.posted_message_id == post.message_id
    assert job.posted_message_url.endswith(f"/{fake.guild_id}/{fake.channel_id}/{post.message_id}")
    card = h.card_for(1)
    assert str(post.json["message_reference"]["message_id"]) == card["id"]
    # The card's last edit follows the delivery, at most one progress interval later.
    await fake.wait_for(lambda: h.card_titles(card["id"])[-1] == "Job 1 · done", timeout=15)
    card = h.card_for(1)
    titles = h.card_titles(card["id"])
    assert titles[0] == "Job 1 · queued"
    assert "Job 1 · rendering" in titles
    assert titles[-1] == "Job 1 · done"
    assert custom_ids(card) == []  # the cancel button is gone once it is done

    # Rerun and Tweak from the delivered clip, with the queue paused so they stay queued.
    pause = await fake.slash(ADMIN, "pause", group="admin")
    assert "paused" in await h.answer_text(pause)
    rerun = await fake.click(ALICE, fake.messages[post.message_id], "ltxbot:rerun:1")
    assert "Job 2 is queued" in await h.answer_text(rerun)
    tweak = await fake.click(ALICE, fake.messages[post.message_id], "ltxbot:tweak:1")
    modal = (await fake.wait_for(lambda: fake.modals(tweak)))[0]
    submitted = await fake.submit_modal(ALICE, modal, {"Prompt": "waves roll out"})
    assert "Job 3 is queued" in await h.answer_text(submitted)
    first, again, tweaked = job, await h.job(2), await h.job(3)
    assert again.params["seed"] != first.params["seed"] and again.prompt == first.prompt
    assert tweaked.params["seed"] == first.params["seed"] and tweaked.prompt == "waves roll out"
    assert again.input_path == first.input_path and again.status == JobStatus.QUEUED
    # Somebody else cannot rerun Alice's clip.
    stranger = await fake.click(BOB, fake.messages[post.message_id], "ltxbot:rerun:1")
    assert "You have no job 1" in await h.answer_text(stranger)
    queue = await fake.slash(ALICE, "queue")
    text = await h.answer_text(queue)
    assert "**2** waiting" in text and "paused" in text and "1. job 2 (yours) · 2. job 3 (yours)" in text
    assert "Idle: " in text  # the bot's own worker, waiting while the queue is paused


def _png_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000), (10, 20, 30)).save(buffer, format="PNG")  # 4 MP: over the test's 1 MP limit
    return buffer.getvalue()


async def test_hostile_images_get_a_private_reason_and_leave_nothing(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    good = image_bytes()
    cases = {
        "bomb.png": (_png_bomb(), "too many pixels"),
        "cat.gif": (b"GIF89a" + b"\x00" * 200, "a gif"),
        "half.png": (good[: len(good) // 2], "incomplete"),
    }
    for name, (data, reason) in cases.items():
        interaction = await fake.slash(ALICE, "animate", {"prompt": "move"}, attachment=fake.attachment(data, name))
        text = await h.answer_text(interaction)
        assert fake.is_ephemeral(interaction), name
        assert "can't animate that" in text and reason in text.lower(), (name, text)
    assert await h.jobs() == []
    assert _uploads(h) == []
    assert h.clip_posts() == []


async def test_invalid_options_name_the_field_and_allowed_values(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    attachment = fake.attachment(image_bytes(), "photo.png")
    frames = await fake.slash(ALICE, "animate", {"prompt": "go", "frames": 100}, attachment=attachment)
    text = await h.answer_text(frames)
    assert fake.is_ephemeral(frames)
    assert "frames" in text.lower() and "97" in text and "105" in text, text
    width = await fake.slash(ALICE, "animate", {"prompt": "go", "width": 770, "height": 512}, attachment=attachment)
    text = await h.answer_text(width)
    assert fake.is_ephemeral(width)
    assert "width" in text.lower() and "64" in text, text
    size = await fake.slash(ALICE, "animate", {"prompt": "go", "size": "huge"}, attachment=attachment)
    text = await h.answer_text(size)
    assert "size must be one of" in text and "landscape" in text
    assert await h.jobs() == []
    # Nothing was downloaded for requests that were wrong before the image mattered.
    assert fake.find("GET", r"^/cdn/") == []


async def test_context_menu_and_mention_reply_each_produce_a_clip(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    posted = await fake.post_message(BOB, "my cat", [fake.attachment(image_bytes(size=(120, 300)), "cat.jpg",
                                                                     "image/jpeg")])
    menu = await fake.context_menu(ALICE, "Animate image", posted)
    modal = (await fake.wait_for(lambda: fake.modals(menu), timeout=15))[0]
    assert modal["title"] == "Animate image"
    submitted = await fake.submit_modal(ALICE, modal, {"Prompt": "the cat yawns", "Seed (optional)": "7"})
    assert "Job 1 is queued" in await h.answer_text(submitted)

    mention = await fake.post_message(CAROL, f"<@{fake.app_id}> the cat blinks", mention_bot=True, reply_to=posted)
    posts = await h.wait_clip_post(count=2, timeout=300)
    menu_job, mention_job = await h.job(1), await h.job(2)
    assert menu_job.params["seed"] == 7 and menu_job.prompt == "the cat yawns" and menu_job.user_id == ALICE.id
    assert mention_job.prompt == "the cat blinks" and mention_job.user_id == CAROL.id
    assert mention_job.request_message_id == mention["id"]
    by_job = {p.json["content"].rsplit("job ", 1)[1]: p for p in posts}
    assert str(by_job["2"].json["message_reference"]["message_id"]) == mention["id"]
    for post in posts:
        # A 2:5 photo at the 8192-pixel budget: portrait 64x128 on the 64-pixel grid.
        assert decode_mp4(post.files[0].data) == (9, 64, 128)


async def test_a_replayed_mention_refreshes_its_card_instead_of_posting_another(
    make_harness: Callable[..., Any]
) -> None:
    h: Harness = await make_harness(limits={"max_queued_per_user": 1})
    fake = h.fake
    await h.answer_text(await fake.slash(ADMIN, "pause", group="admin"))
    photo = fake.attachment(image_bytes(), "cat.png")
    mention = await fake.post_message(CAROL, f"<@{fake.app_id}> the cat blinks", [photo], mention_bot=True)
    card = await fake.wait_for(lambda: h.find_card(1), timeout=30)
    edits = len(fake.find("PATCH", rf"/messages/{card['id']}$"))
    # Discord replays events missed during a reconnect: the same MESSAGE_CREATE arrives again.
    await fake.dispatch("MESSAGE_CREATE", fake._as_seen(mention))
    await fake.wait_for(lambda: len(fake.find("PATCH", rf"/messages/{card['id']}$")) > edits, timeout=30)
    replies = [m for m in fake.bot_messages()
               if str((m.get("message_reference") or {}).get("message_id")) == mention["id"]]
    assert [m["id"] for m in replies] == [card["id"]]  # no second card, and no refusal for "a second clip"
    assert len(await h.jobs()) == 1 and (await h.job(1)).status_message_id == card["id"]


async def test_users_see_and_cancel_only_their_own_jobs(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    await h.answer_text(await fake.slash(ADMIN, "pause", group="admin"))
    alice = await fake.slash(ALICE, "animate", {"prompt": "alice's secret"},
                             attachment=fake.attachment(image_bytes(), "a.png"))
    assert "Job 1 is queued" in await h.answer_text(alice)
    bob = await fake.slash(BOB, "animate", {"prompt": "bob's idea"},
                           attachment=fake.attachment(image_bytes(size=(300, 300)), "b.png"))
    assert "Job 2 is queued" in await h.answer_text(bob)

    listing = await fake.slash(BOB, "jobs")
    await fake.wait_for(lambda: fake.callbacks(listing))
    body = fake.callbacks(listing)[0].json["data"]
    text = str(body)
    assert "bob's idea" in text and "alice" not in text and body["flags"] & 64
    for command in ("job", "cancel"):
        attempt = await fake.slash(BOB, command, {"id": 1})
        assert "You have no job 1" in await h.answer_text(attempt)
    assert (await h.job(1)).status == JobStatus.QUEUED
    details = await fake.slash(ADMIN, "job", {"id": 1})
    await fake.wait_for(lambda: fake.callbacks(details))
    assert "alice's secret" in str(fake.callbacks(details)[0].json["data"]["embeds"])
    assert "cancelled" in await h.answer_text(await fake.slash(ADMIN, "cancel", {"id": 1}))
    assert (await h.job(1)).status == JobStatus.CANCELLED
    # Only admins may use the admin commands, whatever Discord's default permissions say.
    assert "Only the bot's admins" in await h.answer_text(await fake.slash(BOB, "resume", group="admin"))

    # Purge: Bob's image and job folder go, his row keeps no prompt or id.
    bob_image = Path((await h.job(2)).input_path)
    assert bob_image.is_file()
    purge = await fake.slash(ADMIN, "purge", {"user": BOB.id}, group="admin")
    assert "anonymised 1 jobs" in await h.answer_text(purge)
    purged = await h.job(2)
    assert purged.user_id == "purged" and purged.prompt == "" and purged.status == JobStatus.CANCELLED
    assert not bob_image.exists()
    assert Path((await h.job(1)).input_path).is_file()  # Alice's image stays


async def test_cancel_button_on_a_queued_and_on_a_running_job(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    await h.answer_text(await fake.slash(ADMIN, "pause", group="admin"))
    queued = await fake.slash(ALICE, "animate", {"prompt": "one"}, attachment=fake.attachment(image_bytes(), "a.png"))
    await h.answer_text(queued)
    card = await fake.wait_for(lambda: h.find_card(1))
    assert custom_ids(card) == ["ltxbot:cancel:1"]
    click = await fake.click(ALICE, card, "ltxbot:cancel:1")
    assert "Job 1 is cancelled" in await h.answer_text(click)
    assert (await h.job(1)).status == JobStatus.CANCELLED
    await fake.wait_for(lambda: "Job 1 · cancelled" in h.card_titles(card["id"]), timeout=10)

    await h.answer_text(await fake.slash(ADMIN, "resume", group="admin"))
    running = await fake.slash(ALICE, "animate", {"prompt": "two"}, attachment=fake.attachment(image_bytes(), "b.png"))
    await h.answer_text(running)
    job = await h.wait_job(2, lambda j: j.status == JobStatus.RUNNING and j.generator_pid is not None, timeout=60)
    pid = job.generator_pid
    card = h.card_for(2)
    click = await fake.click(ALICE, card, "ltxbot:cancel:2")
    assert "stopping" in await h.answer_text(click)
    done = await h.wait_job(2, lambda j: j.status == JobStatus.CANCELLED, timeout=60)
    assert done.output_path is None
    assert not Path(f"/proc/{pid}").exists() or "generator" not in Path(f"/proc/{pid}/cmdline").read_text()
    await fake.wait_for(lambda: "Job 2 · cancelled" in h.card_titles(card["id"]), timeout=10)
    await asyncio.sleep(1.0)
    assert h.clip_posts() == []


async def test_queued_limit_and_daily_quota_refuse_politely(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()  # max 2 queued per user, 3 a day
    fake = h.fake
    await h.answer_text(await fake.slash(ADMIN, "pause", group="admin"))

    async def animate(user: Any) -> tuple[dict[str, Any], str]:
        interaction = await fake.slash(user, "animate", {"prompt": "p"},
                                       attachment=fake.attachment(image_bytes(), "a.png"))
        return interaction, await h.answer_text(interaction)

    assert "Job 1 is queued" in (await animate(ALICE))[1]
    assert "Job 2 is queued" in (await animate(ALICE))[1]
    refused, text = await animate(ALICE)
    assert fake.is_ephemeral(refused) and "already have 2 clips waiting" in text
    for job_id in (1, 2):
        await h.answer_text(await fake.slash(ALICE, "cancel", {"id": job_id}))
    assert "Job 3 is queued" in (await animate(ALICE))[1]
    await h.answer_text(await fake.slash(ALICE, "cancel", {"id": 3}))
    refused, text = await animate(ALICE)
    assert "daily limit" in text
    assert "Job 4 is queued" in (await animate(BOB))[1]  # limits are per user
    assert len(await h.jobs()) == 4


@pytest.mark.parametrize(("limits", "allowed", "refusal"), [
    ({"max_queued_per_user": 2, "daily_quota": 10, "cooldown_seconds": 0}, 2, "already have 2 clips waiting"),
    ({"max_queued_per_user": 5, "daily_quota": 1, "cooldown_seconds": 0}, 1, "daily limit"),
    ({"max_queued_per_user": 5, "daily_quota": 10, "cooldown_seconds": 60}, 1, "wait a moment between clips"),
], ids=["queued", "daily", "cooldown"])
async def test_overlapping_requests_of_one_user_get_exactly_their_limit(
    make_harness: Callable[..., Any], limits: dict[str, Any], allowed: int, refusal: str
) -> None:
    """Three /animate at once with a slow image download: all pass the early check, the insert decides."""
    h: Harness = await make_harness(limits=limits)
    fake = h.fake
    await h.answer_text(await fake.slash(ADMIN, "pause", group="admin"))
    fake.cdn_delay = 1.5
    sent = [await fake.slash(ALICE, "animate", {"prompt": f"clip {i}"},
                             attachment=fake.attachment(image_bytes(), f"{i}.png")) for i in range(3)]
    texts = [await h.answer_text(interaction) for interaction in sent]
    assert len(fake.find("GET", r"^/cdn/")) == 3  # each passed the early check and was downloaded
    assert sum("is queued" in text for text in texts) == allowed, texts
    refused = [i for i, text in zip(sent, texts, strict=True) if "is queued" not in text]
    assert all(fake.is_ephemeral(i) and refusal in h.fake.original_content(i) for i in refused), texts
    assert len(await h.jobs()) == allowed


async def test_a_clip_over_the_upload_limit_is_reencoded_to_fit(make_harness: Callable[..., Any]) -> None:
    limit = 64 * 1024
    h: Harness = await make_harness(discord={"max_clip_bytes": limit})
    h.fake.upload_limit = limit  # the fake answers 413 above it, as Discord does
    fake = h.fake
    interaction = await fake.slash(ALICE, "animate", {"prompt": "noise", "width": 256, "height": 192, "frames": 25},
                                   attachment=fake.attachment(image_bytes(), "a.png"))
    await h.answer_text(interaction)
    post = (await h.wait_clip_post())[0]
    data = post.files[0].data
    assert len(data) <= limit
    assert decode_mp4(data) == (25, 256, 192)
    log = (h.data_dir / "jobs" / "1" / "generator.log").read_text()
    assert "clip re-encoded from" in log
    original = int(log.split("clip re-encoded from ")[1].split()[0])
    assert original > limit


async def test_restart_during_a_render_posts_the_clip_exactly_once(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness()
    fake = h.fake
    interaction = await fake.slash(ALICE, "animate", {"prompt": "again"},
                                   attachment=fake.attachment(image_bytes(), "a.png"))
    await h.answer_text(interaction)
    await h.wait_job(1, lambda j: j.status == JobStatus.RUNNING and j.generator_pid is not None, timeout=60)
    await h.kill_bot()
    assert h.clip_posts() == []

    await h.start_bot()
    await h.wait_clip_post()
    job = await h.wait_job(1, lambda j: j.posted_message_id is not None)
    await asyncio.sleep(3.0)
    assert len(h.clip_posts()) == 1
    assert job.status == JobStatus.SUCCEEDED
    assert [entry["code"] for entry in job.history or []] in (["interrupted"], [])
    # The card is still updated after the restart, through the channel (the old interaction is gone).
    card = h.card_for(1)
    await fake.wait_for(lambda: "Job 1 · done" in h.card_titles(card["id"]), timeout=15)
    edits = fake.find("PATCH", rf"^/channels/\d+/messages/{card['id']}$")
    assert edits, "after a restart the card is edited with the bot token"


async def test_purge_stops_a_running_job_before_deleting_its_folder(
    make_harness: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "hung-once"  # the render hangs in stage 2: its generator holds the folder open
    h: Harness = await make_harness(env={"LTXBOT_FAULT": "hang@stage_2", "LTXBOT_FAULT_ONCE": str(marker)})
    fake = h.fake
    await h.answer_text(await fake.slash(BOB, "animate", {"prompt": "bob's idea"},
                                         attachment=fake.attachment(image_bytes(), "b.png")))
    await h.wait_job(1, lambda j: marker.exists(), timeout=120)
    running = await h.job(1)
    assert running.status == JobStatus.RUNNING and running.generator_pid is not None
    folder = h.data_dir / "jobs" / "1"
    assert folder.is_dir()
    text = await h.answer_text(await fake.slash(ADMIN, "purge", {"user": BOB.id}, group="admin"), timeout=60)
    # By the time the admin hears back, the generator has ended, and only then did its folder go.
    purged = await h.job(1)
    assert purged.status == JobStatus.CANCELLED and purged.user_id == "purged"
    assert process_start_ticks(running.generator_pid) is None
    assert not folder.exists() and not Path(running.input_path).exists()
    assert "running clip was stopped first" in text, text


async def test_sigterm_ends_the_running_generator_and_the_job_waits_in_the_queue(
    make_harness: Callable[..., Any], tmp_path: Path
) -> None:
    marker = tmp_path / "hung-once"  # the first attempt hangs in stage 2, so SIGTERM finds it mid-render
    h: Harness = await make_harness(env={"LTXBOT_FAULT": "hang@stage_2", "LTXBOT_FAULT_ONCE": str(marker)})
    fake = h.fake
    interaction = await fake.slash(ALICE, "animate", {"prompt": "stop and go"},
                                   attachment=fake.attachment(image_bytes(), "a.png"))
    await h.answer_text(interaction)
    await h.wait_job(1, lambda j: marker.exists(), timeout=120)
    running = await h.job(1)
    assert running.status == JobStatus.RUNNING and running.generator_pid is not None
    assert h.proc is not None
    h.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(h.proc.wait(), 30)
    assert h.proc.returncode == 0
    assert process_start_ticks(running.generator_pid) is None  # no generator outlives the bot
    stopped = await h.job(1)
    assert stopped.status == JobStatus.QUEUED and stopped.attempts == 0 and stopped.generator_pid is None
    assert [entry["code"] for entry in stopped.history or []] == ["stopped"]
    assert h.clip_posts() == []

    await h.start_bot()
    await h.wait_clip_post()
    done = await h.wait_job(1, lambda j: j.posted_message_id is not None)
    assert done.status == JobStatus.SUCCEEDED and done.attempts == 1  # the stop cost no attempt
    assert len(h.clip_posts()) == 1


async def test_ctrl_c_during_a_discord_outage_stops_the_bot_at_once(make_harness: Callable[..., Any]) -> None:
    """discord.py sleeps out a reconnect backoff (up to minutes) inside start(); a stop must not wait for it."""
    h: Harness = await make_harness()
    await h.fake.outage()
    backoff = re.compile(r"Attempting a reconnect in (\d+(?:\.\d+)?)s")
    seen = 0
    while True:  # the backoff grows at random: wait until the bot sleeps long enough to tell
        line = await h.wait_log(backoff.pattern, timeout=180, since=seen)
        seen = h.log.index(line, seen) + 1
        match = backoff.search(line)
        assert match is not None
        if float(match[1]) >= 8:
            break
    assert h.fake.refused_connections >= 1 and h.proc is not None
    started = asyncio.get_running_loop().time()
    h.proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(h.proc.wait(), 30)
    assert asyncio.get_running_loop().time() - started < 5.0
    assert h.proc.returncode == 0


async def test_a_failed_job_is_reported_in_the_channel_with_the_reason(make_harness: Callable[..., Any]) -> None:
    h: Harness = await make_harness(env={"LTXBOT_FAULT": "oom@stage_1"})
    fake = h.fake
    interaction = await fake.slash(ALICE, "animate", {"prompt": "too big"},
                                   attachment=fake.attachment(image_bytes(), "a.png"))
    await h.answer_text(interaction)
    job = await h.wait_job(1, lambda j: j.posted_message_id is not None, timeout=120)
    assert job.status == JobStatus.FAILED and job.error_code == "oom" and job.attempts == 1  # not retried
    notice = fake.messages[job.posted_message_id]
    assert notice["attachments"] == []
    assert f"<@{ALICE.id}> job 1 could not be made" in notice["content"]
    assert "ran out of memory" in notice["content"] and "fewer frames" in notice["content"]
    card = h.card_for(1)
    await fake.wait_for(lambda: "Job 1 · failed" in h.card_titles(card["id"]), timeout=15)
    assert h.clip_posts() == []


async def test_the_servers_default_family_and_the_model_option_pick_the_interpreter(
    make_harness: Callable[..., Any], ltxv_python: Path, tiny_ltxv: dict[str, str]
) -> None:
    h: Harness = await make_harness(
        ltxv={"enabled": True, "python": str(ltxv_python), "pixel_budget": 8192, **tiny_ltxv},
        generation={"family": "ltxv"},
    )
    fake = h.fake
    options = {c["name"]: c for c in fake.commands["animate"]["options"]}
    assert [c["value"] for c in options["model"]["choices"]] == ["ltx2", "ltxv"]
    photo = image_bytes(size=(320, 240))
    silent = await fake.slash(ALICE, "animate", {"prompt": "waves roll in"},
                              attachment=fake.attachment(photo, "photo.png"))
    assert "is queued" in await h.answer_text(silent)
    first = (await h.wait_clip_post())[0]
    assert decode_mp4(first.files[0].data) == (9, 96, 64)  # LTX-Video: multiples of 32
    assert "LTX-Video · 96×64" in first.json["content"]
    job = await h.wait_job(1, lambda j: j.status == JobStatus.SUCCEEDED)
    assert job.params["family"] == "ltxv" and job.params["audio"] is False
    assert [p["name"] for p in job.phases or []][:2] == ["text_encode", "stage_1"]

    chosen = await fake.slash(BOB, "animate", {"prompt": "waves roll in", "model": "ltx2"},
                              attachment=fake.attachment(photo, "photo.png"))
    assert "is queued" in await h.answer_text(chosen)
    second = (await h.wait_clip_post(count=2))[1]
    assert "LTX-2 · " in second.json["content"]
    job = await h.wait_job(2, lambda j: j.status == JobStatus.SUCCEEDED)
    assert job.params["family"] == "ltx2"
    assert "embeddings" in [p["name"] for p in job.phases or []]  # the Gemma path: LTX-2's interpreter


async def test_a_clip_over_the_vram_budget_is_refused_with_the_size_that_fits(
    make_harness: Callable[..., Any],
) -> None:
    h: Harness = await make_harness(generator={"vram_budget_gib": 8})
    fake = h.fake
    asked = await fake.slash(ALICE, "animate", {"prompt": "go", "width": 2048, "height": 1536, "frames": 97},
                             attachment=fake.attachment(image_bytes(), "photo.png"))
    text = await h.answer_text(asked)
    assert fake.is_ephemeral(asked)
    assert "budget is 8 GiB" in text and "1792×1344 with 97 frames" in text, text
    assert await h.jobs() == []

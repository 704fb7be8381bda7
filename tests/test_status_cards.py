"""The status card: its text, the ETA, how it is edited (token, bot token, repost) and coalesced."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import discord
import pytest

from bot import cards
from bot.db.store import JobStore, NewJob
from bot.status_cards import CardRef, StatusCards


def test_estimate_ready_uses_the_median_and_the_running_job() -> None:
    now = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
    assert cards.estimate_ready(1, [], None, now) is None
    durations = [100.0, 60.0, 1000.0]  # median 100: one slow outlier does not move it
    assert cards.estimate_ready(1, durations, None, now) == now + timedelta(seconds=100)
    started = now - timedelta(seconds=40)
    assert cards.estimate_ready(2, durations, started, now) == now + timedelta(seconds=60 + 200)
    overdue = now - timedelta(seconds=500)
    assert cards.estimate_ready(1, durations, overdue, now) == now + timedelta(seconds=10 + 100)


def test_stage_text_and_shorten() -> None:
    assert cards.stage_text(None) == "starting"
    assert cards.stage_text({"stage": "refining", "step": 2, "total": 3}) == "refining 2/3"
    assert cards.stage_text({"stage": "encoding", "step": 0, "total": 1}) == "encoding"
    assert cards.shorten("a  b\nc", 10) == "a b c"
    assert cards.shorten("x" * 50, 10) == "x" * 9 + "…"


# --- how the card is edited ----------------------------------------------------------


def _http_error(cls: type[discord.HTTPException], status: int) -> discord.HTTPException:
    return cls(SimpleNamespace(status=status, reason="x"), {"message": "x", "code": 0})  # type: ignore[arg-type]


class FakeChannel:
    def __init__(self, fail_edit: bool = False) -> None:
        self.edits: list[int] = []
        self.sent: list[dict[str, Any]] = []
        self.fail_edit = fail_edit

    def get_partial_message(self, message_id: int) -> Any:
        async def edit(**kwargs: Any) -> None:
            if self.fail_edit:
                raise _http_error(discord.NotFound, 404)
            self.edits.append(message_id)

        return SimpleNamespace(edit=edit)

    async def send(self, **kwargs: Any) -> Any:
        self.sent.append(kwargs)
        return SimpleNamespace(id=999)


class FakeInteraction:
    def __init__(self, age: timedelta) -> None:
        self.created_at = discord.utils.utcnow() - age
        self.edits: list[int] = []

        async def edit_message(message_id: int, **kwargs: Any) -> None:
            self.edits.append(message_id)

        self.followup = SimpleNamespace(edit_message=edit_message)


@pytest.fixture
async def service(store: JobStore) -> Any:
    """The status cards of a bot whose channel records what it was asked to do."""
    channel = FakeChannel()
    bot = SimpleNamespace(get_partial_messageable=lambda *a, **k: channel, user=None)
    status = StatusCards(bot, store, interval=0.5)  # type: ignore[arg-type]
    status.channel_log = channel  # type: ignore[attr-defined]
    yield status
    status.close()


async def _card_job(store: JobStore) -> int:
    job = await store.create(NewJob(user_id="1", prompt="p", input_path="/x.png", input_sha256="0" * 64,
                                    channel_id="5", guild_id="6",
                                    params={"width": 64, "height": 64, "frames": 9, "fps": 24, "seed": 1}))
    await store.set_status_message(job.id, "42")
    return job.id


async def test_a_young_interaction_edits_through_its_token(service: Any, store: JobStore) -> None:
    job_id = await _card_job(store)
    interaction = FakeInteraction(timedelta(minutes=1))
    service._remember(job_id, CardRef(42, interaction))
    await service.edit(await store.get(job_id))
    assert interaction.edits == [42] and service.channel_log.edits == []


async def test_after_fourteen_minutes_the_bot_token_edits_the_card(service: Any, store: JobStore) -> None:
    job_id = await _card_job(store)
    interaction = FakeInteraction(timedelta(minutes=14, seconds=5))
    service._remember(job_id, CardRef(42, interaction))
    await service.edit(await store.get(job_id))
    assert interaction.edits == [] and service.channel_log.edits == [42]


async def test_a_card_that_cannot_be_edited_is_posted_again(service: Any, store: JobStore) -> None:
    job_id = await _card_job(store)
    service.channel_log.fail_edit = True
    await service.edit(await store.get(job_id))
    assert len(service.channel_log.sent) == 1
    assert (await store.get(job_id)).status_message_id == "999"


async def test_a_finished_jobs_card_is_forgotten_and_old_tokens_are_dropped(service: Any, store: JobStore) -> None:
    job_id = await _card_job(store)
    service._remember(job_id, CardRef(42, FakeInteraction(timedelta(minutes=1))))
    await store.cancel(job_id, None)
    await service.refresh(job_id)
    await asyncio.gather(*service._flushers.values())
    assert service.cards == {} and service._last_edit == {}  # its last state is shown; nothing is kept
    stale, fresh = await _card_job(store), await _card_job(store)
    service._remember(stale, CardRef(42, FakeInteraction(timedelta(minutes=15))))
    service._remember(fresh, CardRef(43, FakeInteraction(timedelta(minutes=1))))
    assert list(service.cards) == [fresh]  # a token past its life can edit nothing: not kept either


class SteppedClock:
    """Time that moves only when the test says so; ``asleep`` is set while something waits on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.asleep = asyncio.Event()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + seconds, wake))
        self.asleep.set()
        await wake

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for when, wake in list(self.sleepers):
            if when <= self.now:
                self.sleepers.remove((when, wake))
                wake.set_result(None)
        self.asleep.clear()


async def test_card_edits_are_coalesced_to_one_per_interval(service: Any, store: JobStore) -> None:
    clock = SteppedClock()
    service._clock, service._sleep = clock, clock.sleep
    job_id = await _card_job(store)

    async def settled() -> None:
        await asyncio.gather(*service._flushers.values())

    await service.refresh(job_id)
    await settled()
    assert len(service.channel_log.edits) == 1  # the first edit at once
    for _ in range(20):
        await service.refresh(job_id)
    await asyncio.wait_for(clock.asleep.wait(), 5)  # the rest wait out the interval (0.5 s here) ...
    assert len(service.channel_log.edits) == 1 and [w for w, _ in clock.sleepers] == [100.5]
    clock.advance(0.5)
    await settled()
    assert len(service.channel_log.edits) == 2  # ... and become one edit with the latest state
    clock.advance(0.5)
    await service.refresh(job_id)
    await settled()
    assert len(service.channel_log.edits) == 3 and clock.sleepers == []  # a refresh after the interval: at once




async def test_an_edit_asked_for_before_the_card_is_stored_happens_once_it_is(service: Any, store: JobStore) -> None:
    """A replayed mention can ask for its card's refresh while the first card is still being posted."""
    job = await store.create(NewJob(user_id="1", prompt="p", input_path="/x.png", input_sha256="0" * 64,
                                    channel_id="5", guild_id="6",
                                    params={"width": 64, "height": 64, "frames": 9, "fps": 24, "seed": 1}))
    await service.refresh(job.id)
    await asyncio.gather(*service._flushers.values())
    assert service.channel_log.edits == []  # no message to edit yet
    message = SimpleNamespace(reply=lambda **kw: asyncio.sleep(0, SimpleNamespace(id=42)))
    await service.post_reply(message, job)
    await asyncio.gather(*service._flushers.values())
    assert service.channel_log.edits == [42]


async def test_cards_and_captions_name_the_model_family(store: JobStore) -> None:
    params = {"width": 768, "height": 512, "frames": 97, "fps": 24, "seed": 5, "pipeline": "distilled",
              "audio": False, "family": "ltxv"}
    job = await store.create(NewJob(user_id="1", prompt="waves", input_path="/x.png", input_sha256="0" * 64,
                                    params=params))
    assert "LTX-Video · 768×512 · 4.0 s (97 frames) · seed 5" in cards.delivery_caption(job)
    fields = {f.name: f.value for f in cards.details_embed(job).fields}
    assert fields["Model"].startswith("LTX-Video distilled") and "audio off" in fields["Model"]
    older = await store.create(NewJob(user_id="1", prompt="waves", input_path="/x.png", input_sha256="0" * 64,
                                      params={k: v for k, v in params.items() if k != "family"}))
    assert "LTX-2 · 768×512" in cards.delivery_caption(older)  # jobs from before the second family

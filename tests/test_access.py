"""Who may use the bot and how much: guild, role and DM rules, admins, per-user limits."""

from __future__ import annotations

import asyncio

import pytest

from bot.access import Caller, Refusal, budget_gate, check_budget, check_place, is_admin
from bot.config import DiscordSettings, Limits
from bot.db.store import JobStore, NewJob


def caller(user: int = 1, guild: int | None = 10, roles: tuple[str, ...] = (), owner: bool = False) -> Caller:
    return Caller(user_id=user, guild_id=guild, role_names=frozenset(roles), role_ids=frozenset(), is_owner=owner)


def test_place_rules() -> None:
    open_bot = DiscordSettings()
    check_place(open_bot, caller())
    with pytest.raises(Refusal, match="direct messages"):
        check_place(open_bot, caller(guild=None))
    check_place(DiscordSettings(allow_dms=True), caller(guild=None))
    with pytest.raises(Refusal, match="allowed servers"):
        check_place(DiscordSettings(guilds=[11]), caller(guild=10))
    gated = DiscordSettings(required_role="artist", admin_role="mods")
    with pytest.raises(Refusal, match="artist"):
        check_place(gated, caller(roles=("everyone",)))
    check_place(gated, caller(roles=("artist",)))
    check_place(gated, caller(roles=("mods",)))  # admins need no extra role


def test_admins() -> None:
    settings = DiscordSettings(admin_role="mods", admin_user_ids=[7])
    assert is_admin(settings, caller(user=7))
    assert is_admin(settings, caller(roles=("mods",)))
    assert is_admin(settings, caller(owner=True))
    assert not is_admin(settings, caller(roles=("artist",)))
    assert not is_admin(settings, caller(roles=("mods",), guild=None))  # a role means nothing in DMs


def _job(user: str = "1") -> NewJob:
    return NewJob(user_id=user, prompt="p", params={}, input_path="/x.png", input_sha256="0" * 64)


async def test_budget_cooldown_quota_and_queue(store: JobStore) -> None:
    limits = Limits(max_queued_per_user=2, daily_quota=3, cooldown_seconds=60)
    await check_budget(limits, store, caller(), admin=False)
    first = await store.create(_job())
    with pytest.raises(Refusal, match="between clips") as info:
        await check_budget(limits, store, caller(), admin=False)
    assert "<t:" in info.value.message  # a Discord timestamp the user sees in their own time zone
    await check_budget(limits, store, caller(), admin=True)
    no_cooldown = Limits(max_queued_per_user=2, daily_quota=3, cooldown_seconds=0)
    await store.create(_job())
    with pytest.raises(Refusal, match="already have 2 clips waiting"):
        await check_budget(no_cooldown, store, caller(), admin=False)
    await store.cancel(first.id, "1")
    await check_budget(no_cooldown, store, caller(), admin=False)
    await store.create(_job())
    await store.cancel(3, "1")
    with pytest.raises(Refusal, match="daily limit"):
        await check_budget(no_cooldown, store, caller(), admin=False)
    await check_budget(Limits(daily_quota=0, cooldown_seconds=0, max_queued_per_user=5), store, caller(), admin=False)


async def test_the_insert_holds_the_limits_when_requests_of_one_user_overlap(store: JobStore) -> None:
    """Five creates at once under a queued limit of 2: the check inside the insert lets exactly two in."""
    gate = budget_gate(Limits(max_queued_per_user=2, daily_quota=0, cooldown_seconds=0), admin=False)
    results = await asyncio.gather(*(store.create(_job(), admit=gate) for _ in range(5)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 2
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, Refusal) and "already have 2 clips waiting" in r.message for r in refusals)
    assert (await store.usage("1")).active == 2
    assert budget_gate(Limits(), admin=True) is None  # admins are exempt
    await store.create(_job(), admit=None)

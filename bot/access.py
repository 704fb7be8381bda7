"""Who may use the bot, and how much: the guild allowlist, roles, DMs, admins and per-user limits.

Everything here is decided in code: Discord's ``default_member_permissions`` is only
a default that server admins can override, so it is never the authorisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from bot.config import DiscordSettings, Limits
    from bot.db.store import JobStore, UserUsage


class Refusal(Exception):
    """A request the bot will not take, with the sentence the user sees."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Caller:
    """The parts of a Discord user the rules look at, so they can be tested without Discord."""

    user_id: int
    guild_id: int | None
    role_names: frozenset[str]
    role_ids: frozenset[int]
    is_owner: bool = False


def _has_role(caller: Caller, role: str) -> bool:
    return role in caller.role_names or (role.isdigit() and int(role) in caller.role_ids)


def is_admin(settings: DiscordSettings, caller: Caller) -> bool:
    if caller.is_owner or caller.user_id in settings.admin_user_ids:
        return True
    return settings.admin_role is not None and caller.guild_id is not None and _has_role(caller, settings.admin_role)


def check_place(settings: DiscordSettings, caller: Caller) -> None:
    """Refuse callers outside the allowed guilds, in DMs when they are off, or without the required role."""
    if caller.guild_id is None:
        if not settings.allow_dms:
            raise Refusal("I only work in servers, not in direct messages.")
        return
    if settings.guilds and caller.guild_id not in settings.guilds:
        raise Refusal("This server is not on this bot's list of allowed servers.")
    if settings.required_role and not is_admin(settings, caller) and not _has_role(caller, settings.required_role):
        raise Refusal(f"You need the **{settings.required_role}** role to make clips here.")


async def check_budget(limits: Limits, store: JobStore, caller: Caller, *, admin: bool) -> None:
    """The early, cheap check before a download: the insert checks again (``budget_gate``) and decides."""
    if not admin:
        check_usage(limits, await store.usage(str(caller.user_id)))


def budget_gate(limits: Limits, *, admin: bool) -> Callable[[UserUsage], None] | None:
    """What ``JobStore.create`` runs inside its transaction to hold the limits; None for admins."""
    if admin:
        return None
    return lambda usage: check_usage(limits, usage)


def check_usage(limits: Limits, usage: UserUsage, now: datetime | None = None) -> None:
    """Per-user limits on new jobs: queued jobs, the daily quota, the daily GPU time and the cooldown."""
    active = usage.active
    if active >= limits.max_queued_per_user:
        raise Refusal(
            f"You already have {active} clip{'s' if active != 1 else ''} waiting (the limit is "
            f"{limits.max_queued_per_user}). Wait for one to finish, or cancel one with /cancel."
        )
    now = now or datetime.now(UTC)
    if limits.daily_quota and usage.created_last_day >= limits.daily_quota:
        raise Refusal(
            f"You have made {usage.created_last_day} clips in the last 24 hours, the daily limit here. "
            "Please try again tomorrow."
        )
    if limits.daily_gpu_seconds and usage.gpu_seconds_last_day >= limits.daily_gpu_seconds:
        raise Refusal(
            f"Your clips used {usage.gpu_seconds_last_day / 60:.0f} of your {limits.daily_gpu_seconds / 60:.0f} "
            "GPU minutes for the last 24 hours. Please try again later, when older clips drop out of that window."
        )
    if limits.cooldown_seconds and usage.last_created_at is not None:
        ready = usage.last_created_at + timedelta(seconds=limits.cooldown_seconds)
        if ready > now:
            when = f"<t:{int(ready.timestamp()) + 1}:R>"
            raise Refusal(f"Please wait a moment between clips: you can start the next one {when}.")

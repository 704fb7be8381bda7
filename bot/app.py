"""The Discord side of ltxbot: the Bot subclass, its worker task and start-up checks."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot.config import ConfigError
from bot.worker import Worker

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.db.store import JobStore

log = logging.getLogger(__name__)


class LtxBot(commands.Bot):
    def __init__(self, settings: Settings, store: JobStore) -> None:
        intents = discord.Intents.default()
        intents.message_content = settings.discord.message_content_intent
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.settings = settings
        self.store = store
        self.worker = Worker(settings, store)
        self._worker_task: asyncio.Task[None] | None = None

    async def setup_hook(self) -> None:
        self._worker_task = asyncio.create_task(self.worker.run_forever(), name="ltxbot-worker")

    async def close(self) -> None:
        if self._worker_task is not None:
            self._worker_task.cancel()
        await super().close()


async def _serve(settings: Settings, token: str) -> None:
    from bot.db.migrate import upgrade
    from bot.db.store import JobStore

    store = JobStore.from_url(settings.db_url)
    await upgrade(store.engine)
    try:
        async with LtxBot(settings, store) as bot:
            await bot.start(token)
    finally:
        await store.close()


def run_bot(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = settings.discord_token()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    settings.data_path.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_serve(settings, token))
    except discord.LoginFailure:
        print("Discord rejected the token: reset it in the developer portal and set DISCORD_TOKEN again.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0

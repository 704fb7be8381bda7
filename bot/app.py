"""The Discord side of ltxbot: the Bot subclass, its worker task and start-up checks.

Features are cogs in ``bot/cogs/``, loaded as extensions by name, so nothing here imports
them and they import this module only for its type.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.config import ConfigError
from bot.jobs_service import JobService
from bot.replies import apologise, tell
from bot.views import DYNAMIC_ITEMS
from bot.worker import Worker

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.db.store import JobStore

log = logging.getLogger(__name__)
EXTENSIONS = ("bot.cogs.animate", "bot.cogs.jobs", "bot.cogs.admin", "bot.cogs.lipsync")


class LtxBot(commands.Bot):
    def __init__(self, settings: Settings, store: JobStore, *, run_worker: bool = True) -> None:
        """``run_worker=False`` (``ltxbot run --no-worker``): the Discord front end alone; workers elsewhere render."""
        intents = discord.Intents.default()
        intents.message_content = settings.discord.message_content_intent
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
        )
        self.settings = settings
        self.store = store
        self.run_worker = run_worker
        self.worker = Worker(settings, store, standby=settings.generator.standby and run_worker)
        self.service = JobService(self, settings, store, self.worker)
        self._worker_task: asyncio.Task[None] | None = None
        self.tree.error(self._on_app_command_error)

    async def setup_hook(self) -> None:
        await self.service.start()
        for extension in EXTENSIONS:
            # One broken feature should not keep the others from starting (as RoboDanny loads its cogs).
            try:
                await self.load_extension(extension)
            except commands.ExtensionError:
                log.exception("the %s feature could not be loaded; the bot starts without it", extension)
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        await self._sync_commands()
        # Order matters: stop a generator left by a previous run and keep its clip, post what
        # was finished but never posted, then start taking jobs.
        if self.run_worker:
            await self.worker.recover()
        await self.service.deliver_pending()
        if self.run_worker:
            self._worker_task = self.worker.start()
        self.service.watch_workers()

    async def _sync_commands(self) -> None:
        guilds = self.settings.discord.guilds
        try:
            if guilds:
                for guild_id in guilds:
                    guild = discord.Object(guild_id)
                    self.tree.copy_global_to(guild=guild)
                    synced = await self.tree.sync(guild=guild)
                    log.info("%d commands synced to guild %s", len(synced), guild_id)
            else:
                synced = await self.tree.sync()
                log.info("%d commands synced globally (Discord may take up to an hour to show them)", len(synced))
        except discord.Forbidden:
            log.error("Discord refused the command sync: invite the bot with the applications.commands scope.")

    async def on_ready(self) -> None:
        log.info("ltxbot ready as %s in %d servers", self.user, len(self.guilds))

    async def _on_app_command_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.CommandInvokeError):
            await apologise(interaction, error.original)
        elif isinstance(error, app_commands.TransformerError | app_commands.CheckFailure):
            await tell(interaction, str(error))
        else:
            await apologise(interaction, error)

    async def on_error(self, event_method: str, /, *args: Any, **kwargs: Any) -> None:
        log.exception("error in %s; the bot carries on", event_method)

    async def close(self) -> None:
        if self._worker_task is not None and not self._worker_task.done():
            self._worker_task.cancel()
            # Wait for it: it ends the running generator's group and puts its job back in the queue.
            await asyncio.gather(self._worker_task, return_exceptions=True)
        await self.worker.close()
        await self.service.close()
        await super().close()


async def _serve(settings: Settings, token: str, run_worker: bool) -> None:
    from bot.db.migrate import upgrade
    from bot.db.store import JobStore

    store = JobStore.from_url(settings.db_url)
    await upgrade(store.engine)
    try:
        async with LtxBot(settings, store, run_worker=run_worker) as bot:
            loop = asyncio.get_running_loop()
            # A task, so a stop can end it: during an outage discord.py sleeps out its reconnect
            # backoff (minutes) inside start(), and close() alone does not wake it.
            running = asyncio.create_task(bot.start(token), name="ltxbot-discord")
            stopping: list[asyncio.Task[None]] = []

            async def close_then_end() -> None:
                await bot.close()
                running.cancel()

            def stop(name: str) -> None:
                # SIGTERM (systemd, docker stop) and Ctrl-C stop the bot the same way: the running
                # generator is ended at once, so no process outlives the bot holding GPU memory.
                if not stopping:
                    log.info("%s: stopping; the running clip goes back to the queue", name)
                    stopping.append(asyncio.create_task(close_then_end()))

            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop, signal.Signals(signum).name)
            try:
                await running
            except asyncio.CancelledError:
                if not stopping:
                    raise  # cancelled from outside, not by our stop
            if stopping:
                await stopping[0]
    finally:
        await store.close()


def run_bot(settings: Settings, *, run_worker: bool = True) -> int:
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    try:
        token = settings.discord_token()
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    settings.data_path.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_serve(settings, token, run_worker))
    except discord.LoginFailure:
        print("Discord rejected the token: reset it in the developer portal and set DISCORD_TOKEN again.",
              file=sys.stderr)
        return 2
    except discord.PrivilegedIntentsRequired:
        print("discord.message_content_intent is on, but the Message Content intent is off in the developer "
              "portal (Bot > Privileged Gateway Intents). Turn it on there, or set it to false.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0

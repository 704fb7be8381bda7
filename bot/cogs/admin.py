"""The ``/admin`` group: pause and resume the queue, purge a user's data, list and drain workers.

Admins only, decided in code.

Discord's ``default_permissions`` only hides the group by default; server admins can change
that, so every command checks the bot's own admin rules (``bot/access.py``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

if TYPE_CHECKING:
    from bot.app import LtxBot

log = logging.getLogger(__name__)


@app_commands.default_permissions(manage_guild=True)
class Admin(commands.GroupCog, group_name="admin", group_description="Bot administration"):
    def __init__(self, bot: LtxBot) -> None:
        self.bot = bot
        super().__init__()

    async def _admin_only(self, interaction: discord.Interaction[Any]) -> bool:
        if await self.bot.service.admin(interaction):
            return True
        await interaction.response.send_message("Only the bot's admins can do that.", ephemeral=True)
        return False

    @app_commands.command(name="pause", description="Stop starting new clips (the running one finishes).")
    async def pause(self, interaction: discord.Interaction[Any]) -> None:
        if await self._admin_only(interaction):
            await self.bot.store.set_paused(True)
            log.info("queue paused by an admin")
            await interaction.response.send_message("The queue is paused. `/admin resume` starts it again.",
                                                    ephemeral=True)

    @app_commands.command(name="resume", description="Start clips again.")
    async def resume(self, interaction: discord.Interaction[Any]) -> None:
        if await self._admin_only(interaction):
            await self.bot.store.set_paused(False)
            self.bot.worker.ring()
            await interaction.response.send_message("The queue is running.", ephemeral=True)

    @app_commands.command(name="purge", description="Delete a user's stored images and clips and anonymise their jobs.")
    @app_commands.describe(user="Whose data to delete", drafts="Delete every kept draft's latents (all users)")
    async def purge(
        self, interaction: discord.Interaction[Any], user: discord.User | None = None, drafts: bool = False
    ) -> None:
        if not await self._admin_only(interaction):
            return
        if user is None and not drafts:
            await interaction.response.send_message(
                "Say what to purge: `user:` for one user's data, or `drafts:True` for every kept draft.",
                ephemeral=True)
            return
        if user is None:
            text = await self.bot.service.purge_drafts()
            await interaction.response.send_message(text, ephemeral=True)
            return
        # A running clip is stopped before its folder goes, which can take longer than 3 seconds.
        await interaction.response.defer(ephemeral=True, thinking=True)
        text = await self.bot.service.purge_user(user.id)
        if drafts:
            text += " " + await self.bot.service.purge_drafts()
        await interaction.edit_original_response(content=text, allowed_mentions=discord.AllowedMentions.none())


    @app_commands.command(name="workers", description="Each worker's GPU, state, current clip and heartbeat.")
    async def workers(self, interaction: discord.Interaction[Any]) -> None:
        if await self._admin_only(interaction):
            await interaction.response.send_message(await self.bot.service.workers_summary(), ephemeral=True)

    @app_commands.command(name="drain", description="Let a worker finish its clip, then take no new ones.")
    @app_commands.describe(worker="The worker's name, as /admin workers shows it")
    async def drain(self, interaction: discord.Interaction[Any], worker: app_commands.Range[str, 1, 200]) -> None:
        if await self._admin_only(interaction):
            await interaction.response.send_message(await self.bot.service.drain_worker(worker), ephemeral=True)

    @drain.autocomplete("worker")
    async def _worker_names(
        self, interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        if not await self.bot.service.admin(interaction):
            return []
        names = sorted({w.name for w in await self.bot.store.workers() if w.state != "stopped"})
        return [app_commands.Choice(name=n[:100], value=n[:100]) for n in names if current.lower() in n.lower()][:25]


async def setup(bot: LtxBot) -> None:
    await bot.add_cog(Admin(bot))

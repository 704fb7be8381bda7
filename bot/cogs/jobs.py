"""``/jobs``, ``/job``, ``/cancel``, ``/queue`` and the ``/admin`` group."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import cards
from bot.access import Refusal, check_place

if TYPE_CHECKING:
    from bot.app import LtxBot

log = logging.getLogger(__name__)
PAGE_SIZE = 10


class Jobs(commands.Cog):
    admin_group = app_commands.Group(
        name="admin", description="Bot administration",
        default_permissions=discord.Permissions(manage_guild=True),
    )

    def __init__(self, bot: LtxBot) -> None:
        self.bot = bot

    async def _allowed(self, interaction: discord.Interaction[Any]) -> bool:
        service = self.bot.service
        try:
            check_place(self.bot.settings.discord, await service.caller(interaction.user, interaction.guild_id))
        except Refusal as refusal:
            await interaction.response.send_message(refusal.message, ephemeral=True)
            return False
        return True

    @app_commands.command(name="jobs", description="Your clips, newest first.")
    @app_commands.describe(page="Page number")
    async def jobs(self, interaction: discord.Interaction[Any], page: app_commands.Range[int, 1, 1000] = 1) -> None:
        if not await self._allowed(interaction):
            return
        mine = await self.bot.store.history(str(interaction.user.id), page=page, page_size=PAGE_SIZE)
        if not mine:
            text = "You have no clips yet: try /animate." if page == 1 else f"There is no page {page}."
            await interaction.response.send_message(text, ephemeral=True)
            return
        embed = discord.Embed(title=f"Your clips · page {page}", colour=discord.Colour.blurple(),
                              description="\n".join(cards.history_line(job) for job in mine))
        if len(mine) == PAGE_SIZE:
            embed.set_footer(text=f"More with /jobs page:{page + 1}")
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="job", description="One of your clips in detail.")
    @app_commands.describe(id="The job id (from /jobs)")
    async def job(self, interaction: discord.Interaction[Any], id: int) -> None:
        if not await self._allowed(interaction):
            return
        job = await self.bot.store.get(id, str(interaction.user.id), is_admin=await self.bot.service.admin(interaction))
        if job is None:
            await interaction.response.send_message(f"You have no job {id}. `/jobs` lists yours.", ephemeral=True)
            return
        await interaction.response.send_message(embed=cards.details_embed(job), ephemeral=True)

    @app_commands.command(name="cancel", description="Cancel one of your queued or running clips.")
    @app_commands.describe(id="The job id")
    async def cancel(self, interaction: discord.Interaction[Any], id: int) -> None:
        if not await self._allowed(interaction):
            return
        await interaction.response.send_message(await self.bot.service.cancel(interaction, id), ephemeral=True)

    @app_commands.command(name="queue", description="How busy the bot is, and where your clips are.")
    async def queue(self, interaction: discord.Interaction[Any]) -> None:
        if not await self._allowed(interaction):
            return
        store = self.bot.store
        queued = await store.queued_ids()
        running = await store.running()
        lines = [f"**{len(queued)}** waiting" + (" · the queue is **paused**" if await store.is_paused() else "")]
        for job in running:
            live = self.bot.service.live.get(job.id) or job.progress
            lines.append(f"Rendering job {job.id}: {cards.stage_text(live)}")
        mine = [
            f"job {job_id}: {queued.index(job_id) + 1} of {len(queued)}"
            for job_id in await store.queued_ids(str(interaction.user.id))
            if job_id in queued  # it may have started between the two queries
        ]
        if mine:
            lines.append("Yours: " + ", ".join(mine))
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    async def _admin_only(self, interaction: discord.Interaction[Any]) -> bool:
        if await self.bot.service.admin(interaction):
            return True
        await interaction.response.send_message("Only the bot's admins can do that.", ephemeral=True)
        return False

    @admin_group.command(name="pause", description="Stop starting new clips (the running one finishes).")
    async def pause(self, interaction: discord.Interaction[Any]) -> None:
        if await self._admin_only(interaction):
            await self.bot.store.set_paused(True)
            log.info("queue paused by an admin")
            await interaction.response.send_message("The queue is paused. `/admin resume` starts it again.",
                                                    ephemeral=True)

    @admin_group.command(name="resume", description="Start clips again.")
    async def resume(self, interaction: discord.Interaction[Any]) -> None:
        if await self._admin_only(interaction):
            await self.bot.store.set_paused(False)
            self.bot.worker.ring()
            await interaction.response.send_message("The queue is running.", ephemeral=True)

    @admin_group.command(name="purge", description="Delete a user's stored images and clips and anonymise their jobs.")
    @app_commands.describe(user="Whose data to delete")
    async def purge(self, interaction: discord.Interaction[Any], user: discord.User) -> None:
        if not await self._admin_only(interaction):
            return
        # A running clip is stopped before its folder goes, which can take longer than 3 seconds.
        await interaction.response.defer(ephemeral=True, thinking=True)
        text = await self.bot.service.purge_user(user.id)
        await interaction.edit_original_response(content=text, allowed_mentions=discord.AllowedMentions.none())

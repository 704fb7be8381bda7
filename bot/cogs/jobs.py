"""``/jobs``, ``/job``, ``/cancel`` and ``/queue``: a user's own clips and the queue.

A cog declares and answers; file work and multi-step store work are the job service's
(``bot/jobs_service.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import cards
from bot.access import Refusal, check_place

if TYPE_CHECKING:
    from bot.app import LtxBot

PAGE_SIZE = 10


class Jobs(commands.Cog):
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
        text = await self.bot.service.queue_summary(interaction.user.id)
        await interaction.response.send_message(text, ephemeral=True)


async def setup(bot: LtxBot) -> None:
    await bot.add_cog(Jobs(bot))

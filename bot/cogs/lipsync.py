"""``/lipsync``: an image that moves to the user's own audio track (docs/DESIGN.md, 'Lip-sync').

The cog declares and answers; the audio and image intakes and the job are the job service's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.intake.request import RequestOptions
from generator.protocol import MAX_PROMPT_CHARS

if TYPE_CHECKING:
    from bot.app import LtxBot


class Lipsync(commands.Cog):
    def __init__(self, bot: LtxBot) -> None:
        self.bot = bot

    @app_commands.command(name="lipsync", description="Animate an image to your audio track (speech or song).")
    @app_commands.describe(
        image="A JPEG, PNG or WebP picture (a face for speech)",
        audio="An MP3, WAV, M4A or OGG track; the clip is as long as the track, up to this server's limit",
        prompt="What happens in the clip, e.g. 'a woman sings to the camera'",
        size="A size preset (default: the image's own shape)",
        seed="Seed, to repeat a result",
    )
    async def lipsync(
        self,
        interaction: discord.Interaction[Any],
        image: discord.Attachment,
        audio: discord.Attachment,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        size: str | None = None,
        seed: app_commands.Range[int, 0, 4294967295] | None = None,
    ) -> None:
        options = RequestOptions(preset=size, seed=seed)
        await self.bot.service.lipsync_from_command(interaction, image, audio, prompt, options)

    @lipsync.autocomplete("size")
    async def _sizes(self, interaction: discord.Interaction[Any], current: str) -> list[app_commands.Choice[str]]:
        presets = self.bot.settings.generation.presets
        return [
            app_commands.Choice(name=f"{name} ({p.width}×{p.height})", value=name)
            for name, p in presets.items()
            if current.lower() in name
        ][:25]


async def setup(bot: LtxBot) -> None:
    await bot.add_cog(Lipsync(bot))

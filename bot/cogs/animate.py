"""``/animate``, the **Animate image** context menu and ``@ltxbot <prompt>`` with an image.

A cog declares and answers; what a request does (limits, download, the job, its card)
is the job service's (``bot/jobs_service.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.intake.request import RequestOptions
from generator.protocol import (
    MAX_LORA_STRENGTH,
    MAX_PROMPT_CHARS,
    MIN_LORA_STRENGTH,
    MODEL_FAMILIES,
    ModelFamily,
)

if TYPE_CHECKING:
    from bot.app import LtxBot

FAMILIES: dict[str, ModelFamily] = {family: family for family in MODEL_FAMILIES}


class Animate(commands.Cog):
    def __init__(self, bot: LtxBot) -> None:
        self.bot = bot
        self.menu = app_commands.ContextMenu(name="Animate image", callback=self.animate_image)
        bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    @app_commands.command(name="animate", description="Turn an image into a short video clip.")
    @app_commands.describe(
        image="A JPEG, PNG or WebP picture",
        prompt="What happens in the clip",
        size="A size preset (default: the image's own shape)",
        seconds="Clip length in seconds",
        frames="Exact frame count instead of seconds (8k+1: 9, 17, …, 97, …)",
        width="Exact width in pixels (with height)",
        height="Exact height in pixels (with width)",
        seed="Seed, to repeat a result",
        audio="Generate a sound track",
        pipeline="two_stage (best), distilled (fast), one_stage, or two_stage_hq (finest, slower)",
        model="LTX-2 (sound, best quality) or LTX-Video (silent, lighter); default: this server's choice",
        end_image="A picture for the last frame: the clip moves from the first image to this one",
        loop="End on the first image, so the clip loops",
        lora="A LoRA this bot offers (camera moves, styles)",
        lora_strength="How strongly the LoRA applies (default: the owner's; -2 to 2)",
        draft="A quick half-size draft first, then Finalize or Rerun (two-stage LTX-2 only)",
    )
    @app_commands.choices(model=[
        app_commands.Choice(name="LTX-2", value="ltx2"),
        app_commands.Choice(name="LTX-Video", value="ltxv"),
    ])
    async def animate(
        self,
        interaction: discord.Interaction[Any],
        image: discord.Attachment,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        size: str | None = None,
        seconds: app_commands.Range[float, 0.1, 60.0] | None = None,
        frames: app_commands.Range[int, 1, 10000] | None = None,
        width: app_commands.Range[int, 1, 8192] | None = None,
        height: app_commands.Range[int, 1, 8192] | None = None,
        seed: app_commands.Range[int, 0, 4294967295] | None = None,
        audio: bool | None = None,
        pipeline: Literal["two_stage", "distilled", "one_stage", "two_stage_hq"] | None = None,
        model: app_commands.Choice[str] | None = None,
        end_image: discord.Attachment | None = None,
        loop: bool | None = None,
        lora: str | None = None,
        lora_strength: app_commands.Range[float, MIN_LORA_STRENGTH, MAX_LORA_STRENGTH] | None = None,
        draft: bool | None = None,
    ) -> None:
        options = RequestOptions(
            preset=size, seconds=seconds, frames=frames, width=width, height=height, seed=seed, audio=audio,
            pipeline=pipeline, family=FAMILIES[model.value] if model is not None else None, loop=loop,
            lora=lora, lora_strength=lora_strength,
        )
        await self.bot.service.animate_from_command(interaction, image, prompt, options, end_image, draft)

    @animate.autocomplete("size")
    async def _sizes(self, interaction: discord.Interaction[Any], current: str) -> list[app_commands.Choice[str]]:
        presets = self.bot.settings.generation.presets
        return [
            app_commands.Choice(name=f"{name} ({p.width}×{p.height})", value=name)
            for name, p in presets.items()
            if current.lower() in name
        ][:25]

    @animate.autocomplete("lora")
    async def _loras(self, interaction: discord.Interaction[Any], current: str) -> list[app_commands.Choice[str]]:
        choices = []
        for name, entry in sorted(self.bot.settings.loras.items()):
            if current.lower() not in name.lower():
                continue
            about = f" — {entry.description}" if entry.description else ""
            choices.append(app_commands.Choice(name=f"{name}{about}"[:100], value=name))
        return choices[:25]

    async def animate_image(self, interaction: discord.Interaction[Any], message: discord.Message) -> None:
        await self.bot.service.animate_from_context(interaction, message)

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        await self.bot.service.animate_from_mention(message)


async def setup(bot: LtxBot) -> None:
    await bot.add_cog(Animate(bot))

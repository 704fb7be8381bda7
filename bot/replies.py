"""How the bot answers an interaction privately: a short sentence, or an apology with an error id."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Coroutine
from typing import Any

import discord

log = logging.getLogger(__name__)


async def guarded(interaction: discord.Interaction[Any], work: Coroutine[Any, Any, None]) -> None:
    """Run a handler; any exception answers the user with an apology and an error id."""
    try:
        await work
    except Exception as exc:
        await apologise(interaction, exc)


async def apologise(interaction: discord.Interaction[Any], exc: BaseException) -> None:
    """Log the unexpected with an error id, and give the user that id (never the exception's text)."""
    error_id = secrets.token_hex(4)
    log.error("error %s while handling an interaction", error_id, exc_info=exc)
    text = f"Sorry, something went wrong on my side (error id `{error_id}`). Please try again in a moment."
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException:
        log.warning("could not tell the user about error %s", error_id)


async def tell(interaction: discord.Interaction[Any], text: str) -> None:
    """A short private answer, whether or not the interaction was already deferred."""
    if interaction.response.is_done():
        await interaction.edit_original_response(content=text, embed=None, view=None)
    else:
        await interaction.response.send_message(text, ephemeral=True)

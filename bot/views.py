"""Buttons and modals. Buttons carry the job id in their custom id (DynamicItem), so they keep
working after a restart without any per-message state.

They declare and hand over: what a click or a form does is ``JobActions``, which the bot's
job service provides (``bot/jobs_service.py``); this module does not import it.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import discord

from bot.intake.request import RequestOptions
from bot.replies import guarded
from bot.retake import parse_second
from generator.protocol import MAX_PROMPT_CHARS


class JobActions(Protocol):
    """What the buttons and forms ask of the bot."""

    async def cancel_from_button(self, interaction: discord.Interaction[Any], job_id: int) -> None: ...

    async def rerun(self, interaction: discord.Interaction[Any], job_id: int, prompt: str | None = None) -> None: ...

    async def open_tweak(self, interaction: discord.Interaction[Any], job_id: int) -> None: ...

    async def finalize(self, interaction: discord.Interaction[Any], job_id: int) -> None: ...

    async def animate_from_modal(self, interaction: discord.Interaction[Any], modal: AnimateModal) -> None: ...

    async def open_extend(self, interaction: discord.Interaction[Any], job_id: int) -> None: ...

    async def extend(self, interaction: discord.Interaction[Any], job_id: int, prompt: str) -> None: ...

    async def open_retake(self, interaction: discord.Interaction[Any], job_id: int) -> None: ...

    async def retake_from_modal(self, interaction: discord.Interaction[Any], modal: RetakeModal) -> None: ...


def actions_of(interaction: discord.Interaction[Any]) -> JobActions:
    """The bot's job service: every ``LtxBot`` has one as ``service``."""
    actions: JobActions = interaction.client.service  # type: ignore[attr-defined]
    return actions


class _JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"ltxbot:(?P<action>[a-z]+):(?P<job>\d+)"):
    """A button whose custom id names its action and job; subclasses say which action and what it does."""

    action = ""
    label = ""
    emoji: str | None = None
    style = discord.ButtonStyle.secondary

    def __init__(self, job_id: int) -> None:
        super().__init__(discord.ui.Button(label=self.label, emoji=self.emoji, style=self.style,
                                           custom_id=f"ltxbot:{self.action}:{job_id}"))
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: re.Match[str]
    ) -> _JobButton:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await guarded(interaction, self.run(actions_of(interaction), interaction))

    async def run(self, actions: JobActions, interaction: discord.Interaction[Any]) -> None:
        raise NotImplementedError


class CancelButton(_JobButton, template=r"ltxbot:cancel:(?P<job>\d+)"):
    action, label = "cancel", "Cancel"

    async def run(self, actions: JobActions, interaction: discord.Interaction[Any]) -> None:
        await actions.cancel_from_button(interaction, self.job_id)


class RerunButton(_JobButton, template=r"ltxbot:rerun:(?P<job>\d+)"):
    action, label, emoji, style = "rerun", "Rerun", "🔁", discord.ButtonStyle.primary

    async def run(self, actions: JobActions, interaction: discord.Interaction[Any]) -> None:
        await actions.rerun(interaction, self.job_id)


class TweakButton(_JobButton, template=r"ltxbot:tweak:(?P<job>\d+)"):
    action, label, emoji = "tweak", "Tweak", "✏️"

    async def run(self, actions: JobActions, interaction: discord.Interaction[Any]) -> None:
        await actions.open_tweak(interaction, self.job_id)


class FinalizeButton(_JobButton, template=r"ltxbot:finalize:(?P<job>\d+)"):
    action, label, emoji, style = "finalize", "Finalize", "✨", discord.ButtonStyle.success

    async def run(self, actions: JobActions, interaction: discord.Interaction[Any]) -> None:
        await actions.finalize(interaction, self.job_id)


class ExtendButton(_JobButton, template=r"ltxbot:extend:(?P<job>\d+)"):
    """Continue a delivered clip (docs/DESIGN.md, 'Extend'): opens a form for the next segment's prompt."""

    action, label, emoji = "extend", "Extend", "⏩"

    async def run(self, actions: JobActions, interaction: discord.Interaction[Any]) -> None:
        await actions.open_extend(interaction, self.job_id)


class RetakeButton(_JobButton, template=r"ltxbot:retake:(?P<job>\d+)"):
    """Under a delivered clip: make a part of it again (docs/DESIGN.md, 'Retake')."""

    action, label, emoji = "retake", "Retake", "🎬"

    async def run(self, actions: JobActions, interaction: discord.Interaction[Any]) -> None:
        await actions.open_retake(interaction, self.job_id)


DYNAMIC_ITEMS = (CancelButton, RerunButton, TweakButton, FinalizeButton, ExtendButton, RetakeButton)


def cancel_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    return view


def card_view(job_id: int, active: bool) -> discord.ui.View | None:
    """The card's buttons: Cancel while the job can still be cancelled, none after."""
    return cancel_view(job_id) if active else None


def delivery_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(RerunButton(job_id))
    view.add_item(TweakButton(job_id))
    view.add_item(ExtendButton(job_id))
    view.add_item(RetakeButton(job_id))
    return view


def draft_view(job_id: int) -> discord.ui.View:
    """Under a posted draft: render the rest of it, or try another seed."""
    view = discord.ui.View(timeout=None)
    view.add_item(FinalizeButton(job_id))
    view.add_item(RerunButton(job_id))
    return view


def _optional_number(raw: str, name: str, *, integer: bool) -> float | int | None:
    raw = raw.strip()
    if not raw:
        return None
    try:
        return int(raw) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{name} must be {kind}; got {raw!r}.") from None


class AnimateModal(discord.ui.Modal, title="Animate image"):
    prompt: discord.ui.TextInput[AnimateModal] = discord.ui.TextInput(
        label="Prompt", style=discord.TextStyle.paragraph, placeholder="What happens in the clip?",
        max_length=MAX_PROMPT_CHARS,
    )
    seconds: discord.ui.TextInput[AnimateModal] = discord.ui.TextInput(
        label="Seconds (optional)", required=False, max_length=6, placeholder="4"
    )
    seed: discord.ui.TextInput[AnimateModal] = discord.ui.TextInput(
        label="Seed (optional)", required=False, max_length=10
    )
    last_frame: discord.ui.TextInput[AnimateModal] = discord.ui.TextInput(
        label="Last frame (optional)", required=False, max_length=10,
        placeholder="loop, or second (the message's 2nd image)",
    )

    def __init__(self, message: discord.Message, attachment: discord.Attachment, max_prompt_chars: int) -> None:
        super().__init__(timeout=600)
        self.prompt.max_length = max_prompt_chars  # the owner's limit, so Discord counts down to it
        self.message = message
        self.attachment = attachment

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await guarded(interaction, actions_of(interaction).animate_from_modal(interaction, self))

    def options(self) -> RequestOptions:
        seconds = _optional_number(self.seconds.value, "Seconds", integer=False)
        seed = _optional_number(self.seed.value, "Seed", integer=True)
        return RequestOptions(seconds=seconds, seed=None if seed is None else int(seed),
                              loop=self._last_frame() == "loop" or None)

    def _last_frame(self) -> str:
        value = self.last_frame.value.strip().lower()
        if value not in {"", "loop", "second"}:
            raise ValueError(f"Last frame must be loop, second or empty; got {self.last_frame.value.strip()!r}.")
        return value

    def end_attachment(self, images: list[discord.Attachment]) -> discord.Attachment | None:
        """``second``: the message's second image ends the clip."""
        if self._last_frame() != "second":
            return None
        if len(images) < 2:
            raise ValueError("Last frame: that message has only one image; use loop, or a message with two.")
        return images[1]


class TweakModal(discord.ui.Modal, title="Tweak the prompt"):
    prompt: discord.ui.TextInput[TweakModal] = discord.ui.TextInput(
        label="Prompt", style=discord.TextStyle.paragraph, max_length=MAX_PROMPT_CHARS
    )

    def __init__(self, job_id: int, prompt: str, max_prompt_chars: int) -> None:
        super().__init__(timeout=600)
        self.job_id = job_id
        self.prompt.max_length = max_prompt_chars
        self.prompt.default = prompt[:max_prompt_chars]

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await guarded(interaction, actions_of(interaction).rerun(interaction, self.job_id, prompt=self.prompt.value))


class ExtendModal(discord.ui.Modal, title="Extend the clip"):
    """What happens next: prefilled with the clip's prompt, so a plain Submit continues the same scene."""

    prompt: discord.ui.TextInput[ExtendModal] = discord.ui.TextInput(
        label="What happens next", style=discord.TextStyle.paragraph, max_length=MAX_PROMPT_CHARS
    )

    def __init__(self, job_id: int, prompt: str, max_prompt_chars: int) -> None:
        super().__init__(timeout=600)
        self.job_id = job_id
        self.prompt.max_length = max_prompt_chars
        self.prompt.default = prompt[:max_prompt_chars]

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await guarded(interaction, actions_of(interaction).extend(interaction, self.job_id, self.prompt.value))


class RetakeModal(discord.ui.Modal, title="Retake part of the clip"):
    """The region to make again and what should happen in it; the prompt starts as the clip's own."""

    start: discord.ui.TextInput[RetakeModal] = discord.ui.TextInput(label="Start second", max_length=8)
    end: discord.ui.TextInput[RetakeModal] = discord.ui.TextInput(label="End second", max_length=8)
    prompt: discord.ui.TextInput[RetakeModal] = discord.ui.TextInput(
        label="Prompt", style=discord.TextStyle.paragraph, placeholder="What happens in that part?",
        max_length=MAX_PROMPT_CHARS,
    )

    def __init__(self, job_id: int, prompt: str, seconds: float, max_prompt_chars: int) -> None:
        super().__init__(timeout=600)
        self.job_id = job_id
        self.start.placeholder = "0"
        self.end.placeholder = f"{seconds:.2f} (the clip is {seconds:.2f} s long)"
        self.prompt.max_length = max_prompt_chars
        self.prompt.default = prompt[:max_prompt_chars]

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await guarded(interaction, actions_of(interaction).retake_from_modal(interaction, self))

    def region(self) -> tuple[float, float]:
        """The two seconds as numbers; raises ValueError naming the field. Their range is the request's check."""
        return parse_second(self.start.value, "Start second"), parse_second(self.end.value, "End second")

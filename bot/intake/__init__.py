"""Intake: turn a stranger's upload into a clean conditioning image and a validated request."""

from bot.intake.errors import IntakeError

__all__ = ["IntakeError"]

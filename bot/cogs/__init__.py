"""Slash commands, the message context menu and the mention listener."""

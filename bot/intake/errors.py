"""The one error type intake raises: a stable code and a sentence for the user."""

from __future__ import annotations

from typing import Literal

IntakeCode = Literal[
    "empty",
    "unsupported_type",
    "truncated",
    "corrupt",
    "too_large",
    "too_small",
    "too_many_bytes",
    "host_not_allowed",
    "download_failed",
    "timeout",
    "invalid_request",
]


class IntakeError(Exception):
    def __init__(self, code: IntakeCode, message: str) -> None:
        super().__init__(message)
        self.code: IntakeCode = code
        self.message = message

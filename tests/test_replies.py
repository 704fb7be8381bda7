"""The reply helpers: a failing handler answers privately with an error id that is in the log."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from bot.replies import guarded


async def test_a_failing_handler_answers_with_an_error_id_that_is_in_the_log(
    caplog: pytest.LogCaptureFixture
) -> None:
    answers: list[str] = []

    async def send_message(text: str, **kwargs: Any) -> None:
        assert kwargs.get("ephemeral") is True
        answers.append(text)

    interaction = SimpleNamespace(response=SimpleNamespace(is_done=lambda: False, send_message=send_message))

    async def broken() -> None:
        raise RuntimeError("boom")

    await guarded(interaction, broken())  # type: ignore[arg-type]
    assert len(answers) == 1 and "error id" in answers[0]
    error_id = answers[0].split("`")[1]
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)

"""docs/DESIGN.md, 'Scope': the lazy decoder must be consumed inside the no-grad scope.

The decoded chunks are uint8 and can never carry a grad, so the guard records
``torch.is_grad_enabled()`` in a forward hook on a decoder submodule (the tiled
path calls ``self.forward`` and bypasses hooks on the decoder itself). The same
run with the scope removed must record True: that is what proves the guard.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from tests.test_generator import make_spec

pytestmark = pytest.mark.slow


def _run_in_process(tmp_path: Path, tiny_models: Path, scope: Any) -> list[bool]:
    from generator.ltx2 import pipeline

    records: list[bool] = []

    def observe(decoder: Any) -> None:
        import torch

        decoder.conv_out.register_forward_hook(lambda *_: records.append(torch.is_grad_enabled()))

    spec = make_spec(tmp_path, tiny_models, audio=False, frames=33)
    pipeline.DECODER_OBSERVERS.append(observe)
    try:
        kwargs = {} if scope is None else {"scope": scope}
        pipeline.generate(spec, lambda event: None, **kwargs)
    finally:
        pipeline.DECODER_OBSERVERS.remove(observe)
    return records


def test_decoder_runs_with_grad_disabled_inside_the_scope(tmp_path: Path, tiny_models: Path) -> None:
    records = _run_in_process(tmp_path, tiny_models, scope=None)
    assert len(records) >= 2  # several tiles decoded
    assert not any(records)


def test_guard_has_teeth_decode_outside_the_scope_is_detected(tmp_path: Path, tiny_models: Path) -> None:
    records = _run_in_process(tmp_path, tiny_models, scope=contextlib.nullcontext)
    assert records and all(records)

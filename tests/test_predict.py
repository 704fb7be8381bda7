"""The memory predictor (``generator/predict.py``) against the benchmark's recorded results, and the
refusal it drives at intake (``bot/intake/request.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot.intake.errors import IntakeError
from bot.intake.request import check_fits_budget
from generator import predict
from generator.protocol import GenerationRequest

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _rows(name: str) -> list[dict[str, Any]]:
    path = RESULTS / name if name.endswith(".json") else RESULTS / name / "results.json"
    return [c for c in json.loads(path.read_text())["configs"]
            if not c.get("error") and c.get("fp8_cast", True) and (c.get("guidance_batch") or 1) == 1]


def test_predictor_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, generator.predict, bot.intake.request; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("results", ["h100", "h200-guidance", "h200-vram-budget",
                                     *(f"h200-vram-budget-3/results-{n}.json" for n in range(1, 6))])
def test_each_rows_peak_is_predicted_within_5_percent(results: str) -> None:
    rows = _rows(results)
    assert rows
    for row in rows:
        found = predict.predict("ltx2", "two_stage", row["width"], row["height"], row["frames"], True,
                                row.get("vram_budget_gib"))
        assert found is not None
        measured = max(p["peak_allocated_gib"] for p in row["phases"] if p["peak_allocated_gib"] is not None)
        assert abs(found.peak_gib - measured) <= 0.05 * measured, (row["name"], found.peak_gib, measured)
        if row.get("process_peak_gib") is not None:  # nvidia-smi's whole-process figure
            assert abs(found.process_peak_gib - row["process_peak_gib"]) <= 0.05 * row["process_peak_gib"]


def test_a_budget_streams_blocks_and_lowers_the_peak_to_it() -> None:
    free = predict.predict("ltx2", "two_stage", 1024, 768, 97, True, None)
    assert free is not None and free.plans["text_encode"].streamed == 0
    for budget in (8.0, 12.0, 16.0):
        found = predict.predict("ltx2", "two_stage", 1024, 768, 97, True, budget)
        assert found is not None and found.fits(budget)
        assert found.plans["stage_1"].streamed > 0 and found.plans["text_encode"].streamed > 0
        # A streamed plan leaves its headroom free (rows planned to the last MiB ran out of memory).
        limit = predict.allocator_budget(budget)
        assert limit is not None
        assert predict.stream_headroom_gib(limit) == predict.STREAM_HEADROOM_GIB
        for name, plan in found.plans.items():
            if plan.streamed:
                assert found.phases[name] <= limit - predict.stream_headroom_gib(limit) + 1e-6, (budget, name)
        # One transformer for stage 1, the upsample and stage 2: one plan.
        assert found.plans["stage_1"] == found.plans["stage_2"] or (
            found.plans["stage_1"].resident == found.plans["stage_2"].resident)
    assert predict.predict("ltxv", "distilled", 768, 512, 97, False, 8.0) is None


def _request(width: int, height: int, frames: int) -> GenerationRequest:
    return GenerationRequest(prompt="waves", width=width, height=height, frames=frames, seed=1)


def test_intake_refuses_an_over_budget_request_naming_what_fits(make_settings: Any) -> None:
    settings = make_settings(generator={"vram_budget_gib": 8})
    check_fits_budget(settings, _request(1024, 768, 97))  # fits: no error
    with pytest.raises(IntakeError) as refused:
        check_fits_budget(settings, _request(2048, 1536, 97))
    text = str(refused.value)
    assert "budget is 8 GiB" in text and "1792×1344 with 97 frames" in text, text
    # Longer than fits at its size: the same size with fewer frames is offered first.
    with pytest.raises(IntakeError) as longer:
        check_fits_budget(make_settings(generator={"vram_budget_gib": 12}), _request(2048, 1536, 481))
    assert "2048×1536 with up to 241 frames" in str(longer.value)
    check_fits_budget(make_settings(generator={"vram_budget_gib": "auto"}), _request(2048, 1536, 241))

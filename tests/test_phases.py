"""The phase tracker: one event per phase, in order, and leaks of models past their phase are caught."""

from __future__ import annotations

from typing import Any

import torch

from generator.phases import PhaseTracker


def test_tracker_reports_each_phase_and_catches_a_model_kept_alive() -> None:
    events: list[Any] = []
    tracker = PhaseTracker(torch.device("cpu"), events.append)
    kept: list[torch.nn.Module] = []
    with tracker.phase("first"):
        freed = tracker.watch(torch.nn.Linear(4, 4), "freed model")
        del freed
    with tracker.phase("second"):
        kept.append(tracker.watch(torch.nn.Linear(4, 4), "leaky model"))
    with tracker.phase("third"):
        pass
    assert [e.name for e in events] == ["first", "second", "third"]
    assert all(e.seconds >= 0 and e.peak_rss_gib > 0 and e.peak_allocated_gib is None for e in events)
    assert tracker.leaks == ["leaky model (from second)"]


def test_a_model_may_live_until_a_named_later_phase() -> None:
    tracker = PhaseTracker(torch.device("cpu"), lambda e: None)
    with tracker.phase("stage_1"):
        model = tracker.watch(torch.nn.Linear(2, 2), "transformer", until="stage_2")
    with tracker.phase("upsample"):
        pass
    assert tracker.leaks == []
    with tracker.phase("stage_2"):
        del model
    with tracker.phase("decode"):
        pass
    assert tracker.leaks == []


def test_a_phase_that_raises_reports_its_figures_marked_failed_before_the_error_goes_on() -> None:
    events: list[Any] = []
    tracker = PhaseTracker(torch.device("cpu"), events.append)
    with tracker.phase("text_encode"):
        pass
    try:
        with tracker.phase("stage_2"):
            raise torch.OutOfMemoryError("CUDA out of memory")
    except torch.OutOfMemoryError:
        pass
    else:
        raise AssertionError("the phase swallowed its error")
    assert [(e.name, e.failed) for e in events] == [("text_encode", False), ("stage_2", True)]
    assert events[-1].peak_rss_gib > 0 and events[-1].seconds >= 0
    assert tracker.current is None

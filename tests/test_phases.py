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


class _Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _streamed(tracker: PhaseTracker) -> tuple[_Blocks, Any]:
    """As ``BudgetedLedger._streamed`` does: a host model streamed, its counters noted in the plan."""
    import weakref

    from generator.ltx2.streaming import stream, streamers_of

    model = _Blocks()
    stream(model, model, model.blocks, torch.device("cpu"), resident=1)
    streamers = streamers_of(model)
    tracker.note_plan(bytes_copied=lambda: sum(s.stats.bytes_copied for s in streamers))
    return model, weakref.ref(streamers[0].slots[0])


def test_a_streamed_models_slots_are_gone_when_its_phase_ends() -> None:
    """A streamer sits in a hook cycle and the plan's counters close over it: the phase's own release
    must free it (its device slots would otherwise count in the next phase's peak)."""
    import gc

    tracker = PhaseTracker(torch.device("cpu"), lambda e: None)
    gc.disable()  # only the tracker's own collection may free the cycle
    try:
        with tracker.phase("text_encode"):
            model, slot = _streamed(tracker)
            model(torch.ones(1, 4))
            del model
        assert slot() is None
        assert tracker.phases[0].plan is not None and tracker.phases[0].plan["bytes_copied"] > 0
    finally:
        gc.enable()

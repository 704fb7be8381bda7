"""Phase boundaries: per-phase time and memory peaks, and the one memory release helper.

At every boundary the tracker synchronizes, reads ``max_memory_allocated`` and
``max_memory_reserved`` and resets the peak, so each phase reports its own peak
(docs/DESIGN.md, "Phases"). On CPU it reports the phase's peak RSS
instead. A phase that raises still reports, marked failed, before its error goes on.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from generator import faults
from generator.loadstats import LoadCounter
from generator.protocol import PhaseEvent

if TYPE_CHECKING:
    from generator.protocol import DoneEvent, JobSpec

log = logging.getLogger("generator")
GIB = 2**30
M = TypeVar("M")


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def release_memory(device: torch.device) -> None:
    """Drop garbage and hand cached blocks back; the caller must already have dropped its references."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_rss_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM, so each phase gets its own RSS peak (Linux).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_peak_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PhaseTracker:
    """Times phases, records their memory peaks, and checks that their models died with them."""

    def __init__(self, device: torch.device, emit: Callable[[PhaseEvent], None]) -> None:
        self.device = device
        self.emit = emit
        self.phases: list[PhaseEvent] = []
        self.current: str | None = None
        self.leaks: list[str] = []
        self._watched: list[tuple[str, str, weakref.ref[object]]] = []
        self._plan: dict[str, Any] = {}
        # Set by a backend that loads through a counting store: each phase reports its weight reads.
        self.loads: LoadCounter | None = None
        self._loads_at_start: LoadCounter | None = None

    def note_plan(self, **values: Any) -> None:
        """Record what the budget's planner chose for the current phase (reported with its figures)."""
        self._plan.update(values)

    def watch(self, model: M, name: str, until: str | None = None) -> M:
        """Remember ``model`` by weak reference; it must be gone once phase ``until`` (default: this one) ends."""
        self._watched.append((name, until or self.current or "", weakref.ref(model)))
        return model

    def _check_freed(self) -> None:
        ended = {p.name for p in self.phases}
        alive = [f"{name} (from {phase})" for name, phase, ref in self._watched if phase in ended and ref() is not None]
        self.leaks.extend(a for a in alive if a not in self.leaks)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._check_freed()
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _reset_rss_peak()
        self._loads_at_start = None if self.loads is None else self.loads.snapshot()
        self.current = name
        self._plan = {}
        start = time.perf_counter()
        log.info("phase %s started", name)  # the job's log then shows where a hung generator stopped
        try:
            faults.at_phase_start(name)
            yield
        except BaseException:
            # The peak of the phase that ran out of memory is what its owner needs most: report it
            # before the error goes on, and let nothing here hide that error.
            with contextlib.suppress(Exception):
                self._end(name, start, failed=True)
            raise
        self._end(name, start, failed=False)
        self._check_freed()

    def _end(self, name: str, start: float, *, failed: bool) -> None:
        self.current = None
        # The plan's figures are read, and its references dropped, before the release: a streamer's
        # counters close over the streamer, whose device slots would otherwise live on (held by a
        # hook cycle) until the next phase's release, inside that phase's peak (0.84 GiB of Gemma's
        # slots in the embeddings phase on the H200, enough to run an 8 GiB budget out of memory).
        plan = {k: v() if callable(v) else v for k, v in self._plan.items()} or None
        self._plan = {}
        if not failed:
            release_memory(self.device)
        seconds = time.perf_counter() - start
        allocated = reserved = None
        if self.device.type == "cuda":
            allocated = torch.cuda.max_memory_allocated(self.device) / GIB
            reserved = torch.cuda.max_memory_reserved(self.device) / GIB
        event = PhaseEvent(
            name=name,
            seconds=round(seconds, 4),
            device=self.device.type,
            peak_allocated_gib=None if allocated is None else round(allocated, 4),
            peak_reserved_gib=None if reserved is None else round(reserved, 4),
            peak_rss_gib=round(_rss_peak_bytes() / GIB, 4),
            failed=failed,
            plan=plan,
            weights=None if self.loads is None or self._loads_at_start is None
            else self.loads.since(self._loads_at_start),
        )
        self.phases.append(event)
        self.emit(event)


def run_scoped(
    spec: JobSpec,
    emit: Callable[[Any], None],
    scope: Callable[[], contextlib.AbstractContextManager[Any]],
    body: Callable[[torch.device, PhaseTracker], DoneEvent],
) -> DoneEvent:
    """Every backend's ``generate``: pick the device, track the phases, and run the whole job,
    encoder included, inside one scope (docs/DESIGN.md, 'Scope')."""
    device = pick_device(spec.device)
    tracker = PhaseTracker(device, emit)
    with scope():
        return body(device, tracker)

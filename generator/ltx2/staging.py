"""Staging: the standby generator reads the next job's weights into host memory before the job exists.

The standby does not know its job until the spec arrives, so it stages what the last job
of this bot read, in the order that job read it (``next-reads.json`` in the prepared dir,
written by every job at its end): with one configured checkpoint every job reads the same
tensors, and the prepared fp8 transformer stands in for its bf16 source once it exists.
Entries are taken in that order while they fit ``generator.host_ram_budget_gib``; the rest
is left to the page cache and read at job time.

Staged bytes go into one anonymous memory map, read with ``pread`` straight from the
files' data offsets. Page-locking it needs a CUDA context (``cudaHostRegister``), which a
waiting standby must not create (it would hold GPU memory while another job renders), so
the standby stages into ordinary memory and the job registers the map once it has CUDA,
then copies at pinned speed (``JobSpec.pin_staged``). The store hands staged tensors out by
(file, key), the interface the VRAM budget's block streaming reads too
(``WeightStore.host_tensor``); docs/DESIGN.md, 'Prepared weights and staging'.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from generator.ltx2.prepared import ST_DTYPES, PreparedCache, safetensors_header
from generator.protocol import STAGING_ENV

if TYPE_CHECKING:
    from generator.ltx2.weights import WeightStore
    from generator.protocol import JobSpec

log = logging.getLogger(__name__)
PLAN_NAME = "next-reads.json"
# Readers filling the staging map; the render beside them needs few host cores.
STAGING_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
GIB = 2**30


def _identity(path: str) -> tuple[int, int] | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def write_plan(directory: Path, reads: list[tuple[str, str, int]]) -> None:
    """What this job read, in order, each (file, key) once: what the next standby stages."""
    seen: set[tuple[str, str]] = set()
    entries: list[tuple[str, str, int]] = []
    for path, key, nbytes in reads:
        if (path, key) in seen:
            continue
        seen.add((path, key))
        entries.append((path, key, nbytes))
    files = {path: _identity(path) for path, _, _ in entries}
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{PLAN_NAME}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps({"files": files, "reads": entries}))
    temporary.replace(directory / PLAN_NAME)


def read_plan(directory: Path) -> list[tuple[str, str, int]]:
    """The last job's reads whose files are unchanged since; [] without a plan."""
    try:
        plan = json.loads((directory / PLAN_NAME).read_text())
    except (OSError, ValueError):
        return []
    fresh = {path for path, ident in plan.get("files", {}).items()
             if ident is not None and _identity(path) == tuple(ident)}
    return [(path, key, int(nbytes)) for path, key, nbytes in plan.get("reads", []) if path in fresh]


@dataclass
class StagedWeights:
    """Tensors in host memory by (file, key), views into one anonymous map of ``capacity`` bytes."""

    capacity: int
    tensors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    identities: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    staged_bytes: int = 0
    seconds: float = 0.0
    pinned: bool = False
    pin_seconds: float = 0.0
    _arena: mmap.mmap | None = None
    _base: torch.Tensor | None = None

    def take(self, path: str, key: str) -> torch.Tensor | None:
        """The staged tensor for (file, key), once; None if not staged or the file changed since."""
        found = self.tensors.pop((path, key), None)
        if found is not None and self.identities.get(path) != _identity(path):
            return None
        return found

    def pin(self) -> None:
        """Page-lock the map (needs the job's CUDA context); ordinary memory stays usable if it fails."""
        if self.pinned or self._base is None or not torch.cuda.is_available():
            return
        start = time.perf_counter()
        cudart: Any = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        register = getattr(cudart, "cudaHostRegister", None)
        if register is not None:
            status = register(self._base.data_ptr(), self._base.numel(), 0)
            self.pinned = int(getattr(status, "value", status)) == 0
            if not self.pinned:
                log.warning("staged weights not pinned: cudaHostRegister returned %s", status)
        self.pin_seconds = time.perf_counter() - start

    def release(self) -> None:
        """Drop what is left; unpin first (the caller has synchronized its copies)."""
        if self.pinned and self._base is not None:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self._base.data_ptr())  # type: ignore[no-untyped-call]
            self.pinned = False
        self.tensors.clear()
        self._base = None
        self._arena = None  # unmapped when the last view that aliases it dies


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def stage(reads: list[tuple[str, str, int]], budget_bytes: int, stop: threading.Event | None = None,
          threads: int | None = None) -> StagedWeights:
    """Read ``reads``, each that still fits the budget in plan order, into one map; stop early when ``stop`` is set.

    One reader filled about 1 GB/s on the H200 machine with the files in the page cache (the
    copy faults in fresh pages one by one), which a 60-second render barely hides: several
    readers share the work and the map asks for huge pages.
    """
    chosen: list[tuple[str, str, int]] = []
    total = 0
    for path, key, nbytes in reads:
        room = _aligned(nbytes)  # a view as bf16 or float32 needs its offset aligned
        if total + room <= budget_bytes:
            chosen.append((path, key, nbytes))
            total += room
    staged = StagedWeights(capacity=total)
    if not chosen:
        return staged
    start = time.perf_counter()
    arena = mmap.mmap(-1, total)  # anonymous, page-aligned, committed only as it is filled
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            arena.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(arena, dtype=torch.uint8)
    staged._arena, staged._base = arena, base
    headers: dict[str, tuple[dict[str, Any], int]] = {}
    pieces: list[tuple[str, str, int, int, int, dict[str, Any]]] = []  # path, key, bytes, file offset, map offset
    offset = 0
    for path, key, nbytes in chosen:
        if path not in headers:
            try:
                header, data_start, _ = safetensors_header(path)
            except (OSError, ValueError) as exc:
                log.info("staging skips %s: %s", Path(path).name, exc)
                header, data_start = {}, 0
            headers[path] = (header, data_start)
            staged.identities[path] = _identity(path)
        header, data_start = headers[path]
        info = header.get(key)
        if info is None or info["data_offsets"][1] - info["data_offsets"][0] != nbytes:
            continue
        pieces.append((path, key, nbytes, data_start + info["data_offsets"][0], offset, info))
        offset += _aligned(nbytes)
    view = memoryview(arena)
    files = {path: os.open(path, os.O_RDONLY) for path in {p[0] for p in pieces}}

    def read(piece: tuple[str, str, int, int, int, dict[str, Any]]) -> bool:
        path, _, nbytes, at, into, _ = piece
        done = 0
        while done < nbytes:
            if stop is not None and stop.is_set():
                return False
            got = os.preadv(files[path], [view[into + done : into + nbytes]], at + done)
            if got <= 0:
                return False
            done += got
        return True

    try:
        with ThreadPoolExecutor(threads or STAGING_THREADS) as pool:
            done = list(pool.map(read, pieces))
    finally:
        for descriptor in files.values():
            os.close(descriptor)
    for (path, key, nbytes, _, into, info), ok in zip(pieces, done, strict=True):
        if ok:
            staged.tensors[(path, key)] = base[into : into + nbytes].view(ST_DTYPES[info["dtype"]]).reshape(
                info["shape"])
            staged.staged_bytes += nbytes
    staged.seconds = time.perf_counter() - start
    log.info("staged %.2f GiB of weights in %.1f s (budget %.2f GiB)", staged.staged_bytes / GIB, staged.seconds,
             budget_bytes / GIB)
    return staged


class Stager:
    """The standby's staging, on a thread while it waits for its spec; ``finish`` stops it and keeps what it read."""

    def __init__(self, directory: Path, budget_bytes: int) -> None:
        self.stop = threading.Event()
        self.result: StagedWeights | None = None
        self.thread = threading.Thread(target=self._run, args=(directory, budget_bytes), name="staging", daemon=True)
        self.thread.start()

    def _run(self, directory: Path, budget_bytes: int) -> None:
        try:
            self.result = stage(read_plan(directory), budget_bytes, self.stop)
        except Exception:  # staging is an optimisation: the job reads from the files instead
            log.exception("staging failed")

    def finish(self) -> StagedWeights | None:
        self.stop.set()
        self.thread.join()
        return self.result

    def hand_over(self) -> None:
        """The spec has come: stop reading and leave what was staged to the job."""
        hand_over(self.finish())

    @classmethod
    def from_env(cls) -> Stager | None:
        raw = os.environ.get(STAGING_ENV)
        if not raw:
            return None
        try:
            settings = json.loads(raw)
            budget = int(float(settings["budget_gib"]) * GIB)
            directory = Path(settings["dir"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s is not valid staging settings; nothing staged", STAGING_ENV)
            return None
        return cls(directory, budget) if budget > 0 else None


# The standby's staged weights, handed to the job it was started for (generator/run.py).
_handed: list[StagedWeights] = []


def hand_over(staged: StagedWeights | None) -> None:
    _handed.clear()
    if staged is not None:
        _handed.append(staged)


def take_handed() -> StagedWeights | None:
    return _handed.pop() if _handed else None


def weight_store_for(spec: JobSpec) -> WeightStore:
    """The job's store: its prepared cache, and what its standby staged."""
    from generator.ltx2.weights import WeightStore

    prepared = None
    if spec.prepared_dir is not None and spec.prepared_cache_gib > 0:
        prepared = PreparedCache(Path(spec.prepared_dir), int(spec.prepared_cache_gib * GIB))
    return WeightStore(prepared=prepared, staged=take_handed(), pin=spec.pin_staged)

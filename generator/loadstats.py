"""Where a job's weights came from, counted as they are handed out; no torch, so phases of any family can report it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from generator.protocol import WeightReads


def storage_read_bytes() -> int | None:
    """Bytes this process has made the kernel fetch from storage (``read_bytes`` of /proc/self/io)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class LoadCounter:
    """Running totals; a phase reports the difference between its end and its start."""

    checkpoint_bytes: int = 0
    checkpoint_seconds: float = 0.0
    prepared_bytes: int = 0
    prepared_seconds: float = 0.0
    staged_bytes: int = 0
    pinned_bytes: int = 0
    staged_seconds: float = 0.0
    pin_seconds: float = 0.0
    written_bytes: int = 0
    written_seconds: float = 0.0
    storage_bytes: int | None = None

    def snapshot(self) -> LoadCounter:
        return replace(self, storage_bytes=storage_read_bytes())

    def since(self, start: LoadCounter) -> WeightReads | None:
        """What was handed out since ``start``; None when no weight was."""
        now = self.snapshot()
        files = (now.checkpoint_bytes - start.checkpoint_bytes) + (now.prepared_bytes - start.prepared_bytes)
        staged = now.staged_bytes - start.staged_bytes
        if files == 0 and staged == 0 and now.written_bytes == start.written_bytes:
            return None
        disk = None
        if now.storage_bytes is not None and start.storage_bytes is not None:
            disk = now.storage_bytes - start.storage_bytes
        return WeightReads(
            checkpoint_bytes=now.checkpoint_bytes - start.checkpoint_bytes,
            checkpoint_seconds=round(now.checkpoint_seconds - start.checkpoint_seconds, 4),
            prepared_bytes=now.prepared_bytes - start.prepared_bytes,
            prepared_seconds=round(now.prepared_seconds - start.prepared_seconds, 4),
            staged_bytes=staged,
            pinned_bytes=now.pinned_bytes - start.pinned_bytes,
            staged_seconds=round(now.staged_seconds - start.staged_seconds, 4),  # the pinning included
            disk_bytes=disk,
            # A file byte the kernel did not fetch from storage came from the page cache.
            page_cache_bytes=None if disk is None else max(0, files - disk),
            written_bytes=now.written_bytes - start.written_bytes,
        )

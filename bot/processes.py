"""Telling processes apart across restarts: a pid plus its start time, and ending a process group.

A pid alone is not an identity: the kernel reuses pids. The start time in clock ticks since
boot (``/proc/<pid>/stat`` field 22) tells a process from a later one that got its pid, so
every pid the store records comes with it. See docs/DESIGN.md, "Supervising the generator".
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat; None when no such process exists (or it is a zombie's leftover)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, only waiting for its parent to collect the status
        return None
    return int(fields[19])


def host_name() -> str:
    return socket.gethostname()


@dataclass(frozen=True)
class ProcessId:
    """One process on one host, as the store records it."""

    host: str
    pid: int
    start_ticks: int | None

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(host_name(), pid, process_start_ticks(pid))

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        return cls(host_name(), pid, process_start_ticks(pid))

    @property
    def on_this_host(self) -> bool:
        return self.host == host_name()

    def is_alive(self) -> bool:
        """Only answerable on this host; a process elsewhere is taken to be alive (its host recovers it)."""
        if not self.on_this_host:
            return True
        return self.start_ticks is not None and process_start_ticks(self.pid) == self.start_ticks


def is_our_generator(pid: int, start_ticks: int | None) -> bool:
    """The same process we started (start time matches) and still running ``python -m generator``."""
    if start_ticks is None or process_start_ticks(pid) != start_ticks:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"generator" in cmdline


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)

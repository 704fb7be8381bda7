"""Fault injection for tests only. Off unless LTXBOT_FAULT is set.

``LTXBOT_FAULT`` is ``KIND@PHASE`` with KIND one of:
  oom   raise CUDA out-of-memory when the phase starts
  hang  sleep forever when the phase starts
  kill  SIGKILL this process; in video_decode, after the first frames were written
  fail  raise RuntimeError when the phase starts
  slow  sleep LTXBOT_FAULT_SECONDS (default 5) when the phase starts, then go on
With ``LTXBOT_FAULT_ONCE=PATH`` the fault fires only while PATH does not exist
(it is created just before firing), so a retried job succeeds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch


def _armed(phase: str, kinds: set[str]) -> str | None:
    spec = os.environ.get("LTXBOT_FAULT", "")
    kind, _, where = spec.partition("@")
    if not spec or where != phase or kind not in kinds:
        return None
    once = os.environ.get("LTXBOT_FAULT_ONCE")
    if once:
        marker = Path(once)
        if marker.exists():
            return None
        marker.write_text(kind)
    return kind


def at_phase_start(phase: str) -> None:
    kind = _armed(phase, {"oom", "hang", "fail", "slow"} | ({"kill"} if phase != "video_decode" else set()))
    if kind == "slow":
        time.sleep(float(os.environ.get("LTXBOT_FAULT_SECONDS", "5")))
    if kind == "oom":
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {phase})")
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "fail":
        raise RuntimeError(f"injected failure at {phase}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def mid_decode() -> None:
    if _armed("video_decode", {"kill"}):
        os.kill(os.getpid(), signal.SIGKILL)

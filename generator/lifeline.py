"""The generator ends with the process that supervises it.

An orphaned generator keeps its GPU memory and renders beside the next job's, so it must not
outlive a kill -9 of the bot or of ``ltxbot animate``. Two lines, each covering what the other
cannot:

- ``PR_SET_PDEATHSIG(SIGKILL)``: the kernel kills this process the moment its parent dies, even
  while the interpreter is stuck importing torch or inside a long C call. It is armed first thing,
  before the slow imports (a standby killed mid-import is the case it exists for), and only covers
  this process with this parent: it is armed, then the parent is checked, so a supervisor that died
  before the arming is noticed too.
- The supervisor holds the write end of our stdin open until we end. When every holder is gone
  the kernel gives end-of-input, and a watcher thread ends our whole process group, so children
  of ours and interpreters behind a wrapper script end too. A standby reads its spec line first,
  so its watcher starts after that line.

Both are armed only when the worker started us (``LTXBOT_SUPERVISOR`` holds its pid and start
ticks): a generator run by hand is tied to nothing. Imports nothing slow, never torch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

SUPERVISOR_ENV = "LTXBOT_SUPERVISOR"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
EXIT_SUPERVISOR_GONE = 1


def supervisor(environ: Mapping[str, str] = os.environ) -> tuple[int, int | None] | None:
    """The supervising process's pid and start ticks, when a worker started us."""
    value = environ.get(SUPERVISOR_ENV, "")
    pid, _, ticks = value.partition(":")
    if not pid.isdigit():
        return None
    return int(pid), int(ticks) if ticks.isdigit() else None


def _start_ticks(pid: int) -> int | None:
    """/proc/<pid>/stat field 22 (the same reading as bot/processes.py, which the generator cannot import)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)) == 0


def hold_on_to_supervisor(environ: Mapping[str, str] = os.environ) -> None:
    """Die with the parent; exit at once if the supervisor is already gone."""
    found = supervisor(environ)
    if found is None:
        return
    pid, ticks = found
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() == pid:
        return  # armed while our parent is the supervisor: its death kills us from now on
    # Our parent is not the supervisor: it died before the arming (we were re-parented), or a
    # wrapper script sits between us. The stdin watch covers the wrapper; a dead supervisor ends us now.
    if ticks is None or _start_ticks(pid) != ticks:
        os._exit(EXIT_SUPERVISOR_GONE)


def watch_supervisor_pipe(environ: Mapping[str, str] = os.environ) -> None:
    """End our process group once stdin reaches end of input (the supervisor closed it, or died)."""
    if supervisor(environ) is None:
        return

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        # We lead our group (the worker starts us in a new session); otherwise end only ourselves.
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="supervisor-pipe", daemon=True).start()

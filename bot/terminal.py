"""What the owner's terminal shows: the job list, one job's view, the per-phase table, the render progress.

rich decides from the stream itself: on a terminal the tables fit its width and the progress redraws in
place; over a pipe or into a file there are no escape codes and the progress prints once, when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from generator.protocol import PhaseEvent, ProgressEvent

if TYPE_CHECKING:
    from bot.db.models import Job, WorkerRecord

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """Prompts and paths print as typed: no markup (``[b]``), no emoji codes (``:fire:``), no highlighting."""
    return Console(stderr=stderr, file=file, markup=False, emoji=False, highlight=False)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime(TIME_FORMAT)


def _stamp(value: Any) -> str:
    """An attempt's end as stored in the history (ISO text), shown like the other times."""
    try:
        return _when(datetime.fromisoformat(str(value)))
    except ValueError:
        return str(value or "-")


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def jobs_table(jobs: list[Job], width: int) -> Table:
    """One line per job where ``width`` allows; the prompt gives way first, then the time wraps under the date.

    The list is for finding a job; ``ltxbot job ID`` shows everything.
    """
    rows = [(str(job.id), job.status, job.user_id, _when(job.created_at),
             "-" if job.duration_seconds is None else f"{job.duration_seconds:.1f}", job.prompt) for job in jobs]
    headers = ("id", "status", "user", "created", "secs", "prompt")
    fixed = sum(max(len(headers[i]), *(len(row[i]) for row in rows)) for i in (0, 1, 2, 4))
    others = fixed + 2 * (len(headers) - 1)  # two spaces between columns
    created = 19 if width - others - 19 >= 16 else 10
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("user", no_wrap=True)
    table.add_column("created", width=created)
    table.add_column("secs", justify="right", no_wrap=True)
    table.add_column("prompt", width=max(6, width - others - created), no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    return table


def phase_table(phases: list[dict[str, Any]], predicted: dict[str, float] | None = None) -> Table:
    """Time and peak memory per phase: what an owner compares against their GPU.

    ``predicted`` (peak allocated GiB by phase, from ``generator/predict.py``) adds a column
    beside the measured peak, and the blocks each phase kept on the GPU when it streamed."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("phase", no_wrap=True)
    names = ["seconds", "peak GiB", *(["predicted GiB"] if predicted else []), "reserved GiB", "RSS GiB"]
    streamed = any((p.get("plan") or {}).get("streamed") for p in phases)
    if streamed:
        names.append("blocks on GPU")
    for name in names:
        table.add_column(name, justify="right")
    for p in phases:
        row = [p["name"], f"{p['seconds']:.2f}", _gib(p.get("peak_allocated_gib"))]
        if predicted:
            row.append(_gib(predicted.get(p["name"])))
        row += [_gib(p.get("peak_reserved_gib")), _gib(p.get("peak_rss_gib"))]
        if streamed:
            plan = p.get("plan") or {}
            row.append(f"{plan['resident']}/{plan['resident'] + plan['streamed']}"
                       if "resident" in plan and "streamed" in plan else "")
        table.add_row(*row)
    return table


def _read(nbytes: int | None, seconds: float | None = None) -> str:
    if not nbytes:
        return "-"
    text = f"{nbytes / 1e9:.2f}" if nbytes >= 1e7 else f"{nbytes / 1e6:.2f} MB"
    return text if seconds is None else f"{text} ({seconds:.2f} s)"


def weights_table(phases: list[dict[str, Any]]) -> Table | None:
    """Per phase, where its weights came from (GB, seconds): model files, prepared cache, staged memory;
    and of the file bytes, how many came from the disk and how many from the page cache. None without reads."""
    rows = [(p["name"], p["weights"]) for p in phases if p.get("weights")]
    if not rows:
        return None
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column("phase", no_wrap=True)
    for name in ("model files GB", "prepared GB", "staged GB", "pinned GB", "disk GB", "page cache GB", "written GB"):
        table.add_column(name, justify="right")
    for name, w in rows:
        table.add_row(name, _read(w.get("checkpoint_bytes"), w.get("checkpoint_seconds")),
                      _read(w.get("prepared_bytes"), w.get("prepared_seconds")),
                      _read(w.get("staged_bytes"), w.get("staged_seconds")), _read(w.get("pinned_bytes")),
                      _read(w.get("disk_bytes")), _read(w.get("page_cache_bytes")), _read(w.get("written_bytes")))
    return table


def _fields(rows: list[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")  # long paths and URLs break rather than run off the edge
    for key, value in rows:
        grid.add_row(key, Text(value))
    return grid


def job_view(job: Job, queue_position: int | None = None,
             predicted: dict[str, float] | None = None) -> RenderableType:
    """``ltxbot job ID``: what was asked, what happened to each attempt, and what each phase cost."""
    took = job.duration_seconds
    rows: list[tuple[str, str]] = [("status", job.status), ("user", job.user_id)]
    if job.guild_id or job.channel_id:
        rows.append(("where", f"guild {job.guild_id or '-'}, channel {job.channel_id or '-'}"))
    rows.append(("prompt", job.prompt))
    if job.negative_prompt:
        rows.append(("negative prompt", job.negative_prompt))
    if queue_position is not None:
        rows.append(("queue position", str(queue_position)))
    if job.progress:
        rows.append(("progress", f"{job.progress.get('stage', '?')} "
                                 f"{job.progress.get('step', '?')}/{job.progress.get('total', '?')}"))
    rows += [("created", _when(job.created_at)), ("started", _when(job.started_at)),
             ("finished", _when(job.finished_at)), ("took", "-" if took is None else f"{took:.1f} s"),
             ("attempts", str(job.attempts))]
    if job.error_code or job.error_message:
        rows.append(("error", f"{job.error_code or '-'}: {job.error_message or ''}".rstrip(": ")))
    if job.output_path:
        size = "" if job.output_bytes is None else f" ({job.output_bytes / 2**20:.1f} MiB)"
        rows.append(("clip", job.output_path + size))
    if job.posted_message_url:
        rows.append(("posted", job.posted_message_url))
    parts: list[RenderableType] = [Text(f"Job {job.id}", style="bold"), _fields(rows)]

    params = {k: v for k, v in (job.params or {}).items() if k not in {"prompt", "negative_prompt"}}
    if params:
        parts += [Text("\nParameters", style="bold"),
                  _fields([(key, "-" if value is None else str(value)) for key, value in params.items()])]
    if job.history:
        history = Table(box=box.SIMPLE_HEAD, show_edge=False)
        history.add_column("attempt", justify="right", no_wrap=True)
        history.add_column("ended")
        history.add_column("code", no_wrap=True)
        history.add_column("message", ratio=1, overflow="fold")
        for entry in job.history:
            history.add_row(str(entry.get("attempt", "?")), _stamp(entry.get("at")),
                            str(entry.get("code") or "-"), str(entry.get("message") or ""))
        parts += [Text("\nAttempts", style="bold"), history]
    if job.phases:
        parts += [Text("\nPhases", style="bold"), phase_table(job.phases, predicted)]
        weights = weights_table(job.phases)
        if weights is not None:
            parts += [Text("\nWeights read (GB, seconds)", style="bold"), weights]
    return Group(*parts)


class StageProgress:
    """A worker listener: one progress row per generator stage, with step/total, elapsed and remaining time.

    Use as a context manager around the run; the rows stay on screen when it ends.
    """

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("elapsed"),
            TimeRemainingColumn(),
            TextColumn("left"),
            console=console,
            get_time=clock,
        )
        # The stage being drawn: its name, its row and its step count.
        self._current: tuple[str, TaskID, int] | None = None

    def __enter__(self) -> StageProgress:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._end_stage(finished=False)
        self.progress.stop()

    def _end_stage(self, *, finished: bool) -> None:
        if self._current is None:
            return
        _, task, total = self._current
        if finished:  # the generator moved on, so the stage is done even if its last step was not reported
            self.progress.update(task, completed=total)
        self.progress.stop_task(task)
        self._current = None

    async def __call__(self, job: Job, event: Any) -> None:
        if isinstance(event, ProgressEvent):
            if self._current is None or self._current[0] != event.stage:
                self._end_stage(finished=True)
                task = self.progress.add_task(event.stage, total=event.total)
            else:
                task = self._current[1]
            self._current = (event.stage, task, event.total)
            self.progress.update(task, completed=event.step, total=event.total)
        elif isinstance(event, PhaseEvent) and event.name == "finalize":
            self._end_stage(finished=True)


def workers_table(workers: list[WorkerRecord]) -> RenderableType:
    """``ltxbot workers``: what /admin workers shows, for a terminal."""
    if not workers:
        return Text("No worker has registered yet: `ltxbot run` or `ltxbot worker` starts one.")
    from bot.cards import worker_status

    table = Table(box=box.SIMPLE_HEAD)
    for column in ("name", "GPU", "families", "state", "job", "clips", "heartbeat"):
        table.add_column(column, overflow="fold")
    for w in workers:
        gpu = (w.gpu_name or "-") if w.gpu is None else f"{w.gpu}: {w.gpu_name or '-'}"
        table.add_row(w.name, gpu, ",".join(w.families), worker_status(w),
                      str(w.current_job_id or "-"), str(w.clips_rendered), _when(w.heartbeat_at))
    return table

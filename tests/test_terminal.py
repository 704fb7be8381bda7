"""What ``ltxbot jobs`` / ``ltxbot job`` print, and the render progress: readable on a terminal, clean in a pipe."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from bot.db.migrate import upgrade
from bot.db.store import JobStore, NewJob
from bot.terminal import StageProgress, make_console
from generator.protocol import PhaseEvent, ProgressEvent
from tests.conftest import clean_env

# Brackets and colons that rich would read as markup or emoji codes if it were allowed to.
PROMPT = "[bold]waves[/bold] roll in :fire: under a long slow evening sky, gulls circling over the pier"
PHASES = [
    {"name": "text_encode", "seconds": 4.5, "device": "cuda", "peak_allocated_gib": 11.2,
     "peak_reserved_gib": 11.9, "peak_rss_gib": 3.1},
    {"name": "stage_1", "seconds": 61.25, "device": "cuda", "peak_allocated_gib": 21.5,
     "peak_reserved_gib": 22.78, "peak_rss_gib": 3.4,
     "weights": {"checkpoint_bytes": 0, "prepared_bytes": 19_450_911_232, "prepared_seconds": 3.53,
                 "staged_bytes": 6_344_455_168, "pinned_bytes": 6_344_455_168, "staged_seconds": 0.35,
                 "disk_bytes": 2_000_000_000, "page_cache_bytes": 17_450_911_232}},
    {"name": "video_decode", "seconds": 9.0, "device": "cuda", "peak_allocated_gib": None,
     "peak_reserved_gib": None, "peak_rss_gib": 3.4},
]
PARAMS = {"prompt": PROMPT, "family": "ltx2", "width": 768, "height": 512, "frames": 121, "fps": 24,
          "seed": 4242, "pipeline": "two_stage", "audio": True}
# Whatever the outer shell says, the tests decide what a terminal is.
FORCING = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "NO_COLOR")


async def seed_jobs(data: Path) -> None:
    """Job 1 ran out of memory once, then succeeded; job 2 waits in the queue."""
    data.mkdir()
    store = JobStore.from_url(f"sqlite+aiosqlite:///{data / 'ltxbot.db'}")
    await upgrade(store.engine)
    try:
        first = await store.create(NewJob("123456789012345678", PROMPT, PARAMS, "in.png", "0" * 64))
        await store.create(NewJob("local", "a second clip", PARAMS, "in.png", "1" * 64))
        await store.claim_next(first.id)
        await store.fail(first.id, 1, code="oom", message="Out of GPU memory in stage_1.", retry=True, max_attempts=3)
        await store.claim_next(first.id)
        assert await store.finish(first.id, 2, output_path=str(data / "jobs" / "1" / "clip.mp4"),
                                  output_bytes=3 * 2**20, phases=PHASES)
    finally:
        await store.close()


def ltxbot(tmp_path: Path, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in clean_env().items() if k not in FORCING}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    done = subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


async def test_job_json_carries_the_stored_fields(tmp_path: Path) -> None:
    await seed_jobs(tmp_path / "data")
    detail = json.loads(ltxbot(tmp_path, "job", "1", "--json").stdout)
    assert detail["status"] == "succeeded" and detail["attempts"] == 2 and detail["prompt"] == PROMPT
    assert [entry["code"] for entry in detail["history"]] == ["oom"]
    assert [p["name"] for p in detail["phases"]] == ["text_encode", "stage_1", "video_decode"]
    assert detail["params"]["seed"] == 4242 and "queue_position" not in detail
    queued = json.loads(ltxbot(tmp_path, "job", "2", "--json").stdout)
    assert queued["status"] == "queued" and queued["queue_position"] == 1
    page = json.loads(ltxbot(tmp_path, "jobs", "--json").stdout)
    assert [job["id"] for job in page] == [2, 1]


async def test_job_shows_a_readable_view_by_default(tmp_path: Path) -> None:
    await seed_jobs(tmp_path / "data")
    out = ltxbot(tmp_path, "job", "1", columns=200).stdout
    assert not out.lstrip().startswith("{") and "\x1b" not in out
    assert PROMPT in out  # printed as typed: no markup, no emoji
    for text in ("succeeded", "attempts", "2", "Out of GPU memory in stage_1.", "seed", "4242", "3.0 MiB",
                 "text_encode", "stage_1", "video_decode", "22.78", "61.25"):
        assert text in out, text
    # Where stage 1's weights came from: the prepared cache (mostly from the page cache) and staged memory.
    weights = out[out.index("Weights read"):]
    for text in ("19.45 (3.53 s)", "6.34 (0.35 s)", "2.00", "17.45"):
        assert text in weights, text
    queued = ltxbot(tmp_path, "job", "2").stdout
    assert "queue position" in queued and "queued" in queued
    assert PROMPT in ltxbot(tmp_path, "jobs", columns=200).stdout


async def test_tables_fit_a_narrow_terminal(tmp_path: Path) -> None:
    await seed_jobs(tmp_path / "data")
    for args in (("jobs",), ("job", "1"), ("job", "2")):
        out = ltxbot(tmp_path, *args, columns=60).stdout
        too_wide = [line for line in out.splitlines() if len(line) > 60]
        assert not too_wide, (args, too_wide)
        assert "\x1b" not in out
    listing = ltxbot(tmp_path, "jobs", columns=60).stdout.splitlines()
    # One row per job however long its prompt; the id stays whole at the left.
    assert [line.split()[0] for line in listing if "succeeded" in line or "queued" in line] == ["2", "1"]
    phases = [line for line in ltxbot(tmp_path, "job", "1", columns=60).stdout.splitlines() if "stage_1" in line]
    assert any("61.25" in line and "22.78" in line for line in phases)  # the phase row stays one line


async def feed(progress: StageProgress, clock: list[float]) -> None:
    for stage, total in (("reading the prompt", 1), ("denoising", 8), ("refining", 3)):
        steps = [0] if total == 1 else range(total + 1)  # the prompt stage reports only its start
        for step in steps:
            await progress(None, ProgressEvent(stage=stage, step=step, total=total))  # type: ignore[arg-type]
            clock[0] += 2.5
    await progress(None, PhaseEvent(name="finalize", seconds=1.0, device="cpu", peak_rss_gib=1.0))  # type: ignore[arg-type]


async def test_progress_into_a_pipe_prints_each_stage_once_without_escape_codes() -> None:
    out, clock = io.StringIO(), [0.0]
    with StageProgress(make_console(file=out), clock=lambda: clock[0]) as progress:
        await feed(progress, clock)
    text = out.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 3, text  # one final row per stage, no redraws
    assert "reading the prompt" in lines[0] and "1/1" in lines[0]  # a stage that moved on counts as done
    assert "denoising" in lines[1] and "8/8" in lines[1] and "0:00:20 elapsed" in lines[1]  # 8 steps at 2.5 s
    assert "refining" in lines[2] and "3/3" in lines[2]


async def test_progress_estimates_the_time_left_in_the_stage() -> None:
    out, clock = io.StringIO(), [0.0]
    progress = StageProgress(make_console(file=out), clock=lambda: clock[0])
    for step in range(5):  # 2.5 s a step, 4 of 8 done
        await progress(None, ProgressEvent(stage="denoising", step=step, total=8))  # type: ignore[arg-type]
        clock[0] += 2.5
    console = make_console(file=out)
    console.print(progress.progress.make_tasks_table(progress.progress.tasks))
    assert "4/8" in out.getvalue() and "0:00:10 left" in out.getvalue()

"""The worker supervising real generator subprocesses on the tiny checkpoint (CPU)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from bot.db.models import EndCode, JobStatus
from bot.db.store import JobStore, NewJob
from bot.intake.image import normalise_image
from bot.processes import process_start_ticks
from bot.worker import Worker
from tests.conftest import ROOT, clean_env, image_bytes

pytestmark = pytest.mark.slow


async def queue_job(settings: Settings, store: JobStore, frames: int = 9, **params: Any) -> int:
    image = normalise_image(image_bytes(), lambda w, h: (128, 128), settings.uploads_dir, max_pixels=10**7)
    request = {"prompt": "waves", "width": 128, "height": 128, "frames": frames, "fps": 24, "steps": 2, "seed": 1,
               "pipeline": "two_stage", "audio": False, "image_strength": 1.0, "negative_prompt": None} | params
    job = await store.create(NewJob(user_id="u", prompt="waves", params=request, input_path=str(image.path),
                                    input_sha256=image.sha256))
    return job.id


def alive(pid: int) -> bool:
    return process_start_ticks(pid) is not None


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


async def test_five_jobs_run_strictly_one_at_a_time_and_succeed(
    settings: Settings, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [await queue_job(settings, store) for _ in range(5)]
    worker = Worker(settings, store)
    spans: list[tuple[float, float, int]] = []
    seen_pids: list[int] = []

    async def watch(job: Any, event: Any) -> None:
        if getattr(event, "event", None) == "started":
            assert worker.current is not None
            seen_pids.append(worker.current[1].pid)

    worker.listeners.append(watch)
    for _ in ids:
        start = time.monotonic()
        job = await worker.step()
        assert job is not None
        spans.append((start, time.monotonic(), job.id))
        # The generator of a finished step is gone before the next one starts.
        assert not alive(seen_pids[-1])
    assert [s[2] for s in spans] == ids
    assert len(set(seen_pids)) == 5
    for (_s1, e1, _), (s2, _e2, _) in itertools.pairwise(spans):
        assert e1 <= s2
    for job_id in ids:
        job = await store.get(job_id)
        assert job is not None and job.status == JobStatus.SUCCEEDED and Path(job.output_path or "").is_file()
        assert [p["name"] for p in job.phases or []][-1] == "finalize"
    assert await worker.step() is None


async def test_cancel_queued_and_running_job(settings: Settings, store: JobStore) -> None:
    running_id = await queue_job(settings, store, frames=49)
    queued_id = await queue_job(settings, store)
    assert await store.cancel(queued_id, "u") == "cancelled"
    worker = Worker(settings, store)
    pids: list[int] = []

    async def cancel_when_started(job: Any, event: Any) -> None:
        if getattr(event, "event", None) == "started":
            assert worker.current is not None
            pids.append(worker.current[1].pid)
            await store.cancel(running_id, "u")

    worker.listeners.append(cancel_when_started)
    job = await worker.step()
    assert job is not None and job.id == running_id and job.status == JobStatus.CANCELLED
    assert pids and not alive(pids[0])
    with pytest.raises(ProcessLookupError):
        os.killpg(pids[0], 0)
    assert not (settings.jobs_dir / str(running_id) / "clip.mp4").exists()
    queued = await store.get(queued_id)
    assert queued is not None and queued.status == JobStatus.CANCELLED
    assert await worker.step() is None


async def test_timeout_kills_the_group_and_retries_up_to_the_limit(
    make_settings: Callable[..., Settings], store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LTXBOT_FAULT", "hang@stage_1")
    settings = make_settings(generator={"timeout_base_seconds": 8, "timeout_seconds_per_mpx_frame": 0,
                                        "max_attempts": 2, "kill_grace_seconds": 1})
    job_id = await queue_job(settings, store)
    worker = Worker(settings, store)
    first = await worker.step()
    assert first is not None and first.status == JobStatus.QUEUED and first.error_code == "timeout"
    second = await worker.step()
    assert second is not None and second.status == JobStatus.FAILED and second.error_code == "timeout"
    assert [h["code"] for h in second.history or []] == ["timeout", "timeout"]
    assert second.id == job_id


async def test_crash_mid_decode_is_retried_then_succeeds(
    settings: Settings, store: JobStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LTXBOT_FAULT", "kill@video_decode")
    monkeypatch.setenv("LTXBOT_FAULT_ONCE", str(tmp_path / "fired"))
    job_id = await queue_job(settings, store, frames=33)
    worker = Worker(settings, store)
    crashed = await worker.step()
    assert crashed is not None and crashed.status == JobStatus.QUEUED and crashed.error_code == "crashed"
    assert "signal 9" in (crashed.error_message or "")
    done = await worker.step()
    assert done is not None and done.id == job_id and done.status == JobStatus.SUCCEEDED
    assert [h["code"] for h in done.history or []] == ["crashed"] and done.attempts == 2
    log = (settings.jobs_dir / str(job_id) / "generator.log").read_text()
    assert "attempt 1" in log and "attempt 2" in log


async def test_oom_is_not_retried_and_carries_the_hint(
    settings: Settings, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LTXBOT_FAULT", "oom@stage_2")
    await queue_job(settings, store)
    job = await Worker(settings, store).step()
    assert job is not None and job.status == JobStatus.FAILED and job.error_code == "oom"
    assert "fewer frames" in (job.error_message or "") and job.attempts == 1
    # The phase that ran out of memory still reports its time and peak: what the owner needs to size the next try.
    phases = [(p["name"], p["failed"]) for p in job.phases or []]
    assert phases[-1] == ("stage_2", True) and ("stage_1", False) in phases[:-1]
    assert job.phases is not None and job.phases[-1]["peak_rss_gib"] > 0


async def test_generator_environment_has_no_discord_token(
    settings: Settings, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.worker import child_env

    monkeypatch.setenv("DISCORD_TOKEN", "SECRET-TOKEN")
    env = child_env(settings)
    assert "DISCORD_TOKEN" not in env and "SECRET-TOKEN" not in env.values()


def test_spec_and_standby_carry_the_loading_settings(settings: Settings, tmp_path: Path) -> None:
    """The prepared cache lives under the data dir; a standby learns its staging budget from its environment."""
    from bot.worker import child_env
    from generator.protocol import STAGING_ENV

    assert STAGING_ENV not in child_env(settings)  # the default budget is 0: nothing staged
    generator = settings.generator.model_copy(update={"host_ram_budget_gib": 8.0, "prepared_cache_gib": 30.0})
    staged = settings.model_copy(update={"generator": generator})
    assert json.loads(child_env(staged)[STAGING_ENV]) == {"dir": str(settings.data_path / "prepared"),
                                                           "budget_gib": 8.0}


HOST = """
import asyncio, sys
from bot.config import load_settings
from bot.db.migrate import upgrade
from bot.db.store import JobStore
from bot.worker import Worker

async def main():
    settings = load_settings(None)
    store = JobStore.from_url(settings.db_url)
    await upgrade(store.engine)
    worker = Worker(settings, store)
    await worker.recover()
    while await worker.step() is not None:
        pass
    await store.close()

asyncio.run(main())
"""


async def test_bot_killed_mid_job_completes_it_exactly_once_after_restart(
    settings: Settings, tmp_path: Path
) -> None:
    env = clean_env() | {
        "LTXBOT_DATA_DIR": str(settings.data_path),
        "LTXBOT_DATABASE_URL": settings.db_url,
        "LTXBOT_MODELS": settings.models.model_dump_json(),
        "LTXBOT_VAE_TILING": settings.vae_tiling.model_dump_json(),
        "LTXBOT_GENERATOR": settings.generator.model_dump_json(),
    }
    # The test and the host process share one database file.
    shared = JobStore.from_url(settings.db_url)
    from bot.db.migrate import upgrade

    await upgrade(shared.engine)
    job_id = await queue_job(settings, shared, frames=57)
    host = subprocess.Popen([sys.executable, "-c", HOST], cwd=ROOT, env=env)
    generator_pid = None
    for _ in range(600):
        job = await shared.get(job_id)
        if job is not None and job.generator_pid and (job.progress or {}).get("stage") in {"generating", "refining"}:
            generator_pid = job.generator_pid
            break
        await asyncio.sleep(0.1)
    assert generator_pid is not None, "the generator never started"
    host.send_signal(signal.SIGKILL)
    host.wait()
    # The generator ends with its supervisor instead of rendering on, orphaned, holding its (GPU) memory.
    deadline = time.monotonic() + 5
    while alive(generator_pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not alive(generator_pid)
    restarted = subprocess.run([sys.executable, "-c", HOST], cwd=ROOT, env=env, timeout=240)
    assert restarted.returncode == 0
    assert not alive(generator_pid)
    job = await shared.get(job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED and job.attempts == 2
    clips = list((settings.jobs_dir / str(job_id)).glob("*.mp4"))
    assert [c.name for c in clips] == ["clip.mp4"]
    assert [h["code"] for h in job.history or []] == ["interrupted"]
    await shared.close()


async def test_clip_written_before_the_bot_died_is_kept_not_rendered_again(
    settings: Settings, store: JobStore
) -> None:
    job_id = await queue_job(settings, store)
    claimed = await store.claim_next()
    assert claimed is not None and claimed.id == job_id
    clip = settings.jobs_dir / str(job_id) / "clip.mp4"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"rendered before the crash")
    worker = Worker(settings, store)
    await worker.recover()
    job = await store.get(job_id)
    assert job is not None and job.status == JobStatus.SUCCEEDED and job.attempts == 1
    assert job.output_path == str(clip) and job.output_bytes == clip.stat().st_size
    assert await worker.step() is None  # nothing left to render


async def test_standby_generator_takes_the_next_job_and_exits_when_released(
    settings: Settings, store: JobStore
) -> None:
    first, second = await queue_job(settings, store), await queue_job(settings, store)
    worker = Worker(settings, store, standby=True)
    recorded: dict[int, tuple[int | None, int]] = {}

    async def pin(job: Any, event: Any) -> None:
        if getattr(event, "event", None) == "started":
            row = await store.get(job.id)
            assert row is not None
            recorded[job.id] = (row.generator_pid, event.pid)

    worker.listeners.append(pin)
    await worker.prepare_standby()
    assert worker._standby is not None
    waiting = worker._standby.pid
    line = await asyncio.wait_for(worker._standby.stdout.readline(), 120)  # type: ignore[union-attr]
    assert b'"event":"ready"' in line  # imports done before the job exists
    started = time.monotonic()
    await worker.step(only_job=first)
    job = await store.get(first)
    assert job is not None and job.status == JobStatus.SUCCEEDED
    assert recorded[first] == (waiting, waiting)  # the standby rendered it, not a fresh process
    assert job.phases and (time.monotonic() - started) < 60
    assert not alive(waiting)  # the standby ran exactly one job and exited
    assert worker._standby is not None and worker._standby.pid != waiting  # the next one is already up
    following = worker._standby.pid
    await worker.step(only_job=second)
    job2 = await store.get(second)
    assert job2 is not None and job2.status == JobStatus.SUCCEEDED
    assert recorded[second] == (following, following)
    log = (settings.jobs_dir / str(second) / "generator.log").read_text()
    assert "=== job" in log
    assert not alive(following)
    last = worker._standby.pid
    assert alive(last)
    await worker.close()
    assert worker._standby is None and not alive(last)


async def wait_until(check: Callable[[], Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


async def test_a_missing_interpreter_fails_its_job_and_the_worker_goes_on(
    make_settings: Callable[..., Settings], store: JobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``generator.python`` pointing at a missing file: each job fails clearly, nothing stays running."""
    settings = make_settings(generator={"python": str(tmp_path / "no-such-python")})
    ids = [await queue_job(settings, store) for _ in range(2)]
    is_paused = store.is_paused
    calls = 0

    async def flaky_is_paused() -> bool:  # one database hiccup in the loop itself
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk I/O error")
        return await is_paused()

    monkeypatch.setattr(store, "is_paused", flaky_is_paused)
    worker = Worker(settings, store)
    task = worker.start()

    async def settled() -> bool:
        jobs = [await store.get(job_id) for job_id in ids]
        return task.done() or all(j is not None and j.status == JobStatus.FAILED for j in jobs)

    try:
        await wait_until(settled, 30)
        assert not task.done(), task.exception()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for job_id in ids:
        job = await store.get(job_id)
        assert job is not None and job.status == JobStatus.FAILED and job.error_code == EndCode.MODEL_MISSING
        assert "could not start its LTX-2 generator" in (job.error_message or "") and job.attempts == 1
        assert "no-such-python" not in (job.error_message or "")  # no owner paths in what users read


async def test_an_unexpected_error_ends_the_attempt_with_an_error_id(
    settings: Settings, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = await queue_job(settings, store)
    worker = Worker(settings, store)

    async def broken(job: Any) -> Any:
        raise RuntimeError("something internal")

    monkeypatch.setattr(worker, "_attempt", broken)
    job = await worker.step()
    assert job is not None and job.id == job_id
    assert job.status == JobStatus.QUEUED and job.error_code == EndCode.CRASHED  # retried, not stuck running
    assert "(error " in (job.error_message or "") and "internal" not in (job.error_message or "")


async def test_invalid_job_settings_are_told_in_sentences_not_pydantic_text(
    settings: Settings, store: JobStore
) -> None:
    await queue_job(settings, store, frames=10, fps=0)
    job = await Worker(settings, store).step()
    assert job is not None and job.status == JobStatus.FAILED and job.error_code == EndCode.INVALID
    message = job.error_message or ""
    assert "validation error" not in message and "GenerationRequest" not in message
    assert "Frames must be one more than a multiple of 8" in message and "fps must be between 1 and 60" in message


def test_the_generator_log_is_on_disk_line_by_line_and_keeps_its_head_and_tail(tmp_path: Path) -> None:
    from bot.worker import BoundedLog

    path = tmp_path / "generator.log"
    log = BoundedLog(path, limit=4096)
    log.write("=== job 1 attempt 1 ===\n")
    assert path.read_text() == "=== job 1 attempt 1 ===\n"  # before close: a kill -9 keeps it
    for n in range(2000):
        log.write(f"line {n:04d} of the generator's stderr\n")
        assert path.stat().st_size <= 4096 + 64
    text = path.read_text()
    assert text.startswith("=== job 1 attempt 1 ===\nline 0000")
    assert text.endswith("line 1999 of the generator's stderr\n") and "lines dropped ..." in text
    assert log.close()[-1] == "line 1999 of the generator's stderr\n"
    assert path.read_text() == text


def test_a_compiling_workers_standby_imports_the_compiler_without_touching_cuda(
    settings: Settings, tmp_path: Path
) -> None:
    from bot.worker import child_env
    from generator.protocol import WARM_COMPILER_ENV

    assert WARM_COMPILER_ENV not in child_env(settings)
    compiling = settings.model_copy(
        update={"generator": settings.generator.model_copy(update={"compile_blocks": True})})
    env = child_env(compiling)
    assert env[WARM_COMPILER_ENV] == "1"
    probe = (
        "import json, sys, torch\n"
        "from generator import run\n"
        "sys.argv = ['generator', '--standby']\n"
        "sys.stdin = open(__import__('os').devnull)\n"  # no job comes: the standby exits after ready
        "code = run.main()\n"
        "print('PROBE ' + json.dumps({'compiler': 'torch._inductor.compile_fx' in sys.modules,"
        " 'cuda': torch.cuda.is_initialized(), 'code': code}), file=sys.stderr)\n"
    )
    for extra, warmed in (({WARM_COMPILER_ENV: "1"}, True), ({}, False)):
        proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=clean_env() | extra,
                              capture_output=True, text=True, timeout=300)
        ready = json.loads(proc.stdout.splitlines()[0])
        seen = json.loads(next(line for line in proc.stderr.splitlines() if line.startswith("PROBE "))[6:])
        assert ready["event"] == "ready" and ready["compiler_warmed"] is warmed, (ready, proc.stderr[-2000:])
        assert seen["compiler"] is warmed and not seen["cuda"], seen


async def test_a_stale_pause_check_takes_nothing_from_the_paused_queue(
    settings: Settings, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Discord end-to-end run caught it: the loop read "not paused", an admin paused, a Rerun was
    # queued, and the claim that followed took the Rerun from the paused queue.
    job_id = await queue_job(settings, store)
    await store.set_paused(True)

    async def read_before_the_pause() -> bool:
        return False

    monkeypatch.setattr(store, "is_paused", read_before_the_pause)
    worker = Worker(settings, store)
    assert await worker.step() is None
    job = await store.get(job_id)
    assert job is not None and job.status == JobStatus.QUEUED and job.attempts == 0
